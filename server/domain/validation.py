"""Input checks shared by the use cases. Each raises InvalidArgument naming the field."""

from __future__ import annotations

from server.domain.errors import InvalidArgument
from server.domain.money import MAX_AMOUNT_CENTS, MAX_DESCRIPTION_CHARS

# Account ids are ext_id * 4 + kind in a signed 64-bit column: larger ids cannot be stored.
MAX_ID = (2**63 - 1) // 4 - 1


def positive_id(field: str, value: int) -> int:
    if value <= 0:
        raise InvalidArgument.field(field, "must be a positive id")
    if value > MAX_ID:
        raise InvalidArgument.field(field, f"must be at most {MAX_ID}")
    return value


def positive_amount(field: str, cents: int, limit_cents: int = MAX_AMOUNT_CENTS) -> int:
    if cents <= 0:
        raise InvalidArgument.field(field, "must be greater than zero")
    if cents > limit_cents:
        raise InvalidArgument.field(field, f"must be at most {limit_cents} cents")
    return cents


def bounded_text(field: str, text: str, max_chars: int, *, required: bool = False) -> str:
    text = text.strip()
    if required and not text:
        raise InvalidArgument.field(field, "is required")
    if len(text) > max_chars:
        raise InvalidArgument.field(field, f"is longer than {max_chars} characters")
    if any(ord(ch) < 32 for ch in text):
        raise InvalidArgument.field(field, "contains control characters")
    return text


def description(text: str, *, required: bool = False) -> str:
    return bounded_text("description", text, MAX_DESCRIPTION_CHARS, required=required)
