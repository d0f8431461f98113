"""Input checks shared by the use cases. Each raises InvalidArgument naming the field.

Text rules (SPEC §4: every string field is validated in one place). Every string field of every
request is checked against `TEXT_RULES` before any work is done (server.api.request_check walks the
request); the services then check shape and meaning (a BSB's digits, a PaymentIntent's `pi_`).
Three kinds of text:
- IDENTIFIER (idempotency keys, ids, codes, tokens, consumer names, bank details): printable
  characters only (no control, format, separator other than space, private-use or unassigned
  character), and never blank when given.
- TEXT (descriptions, names): one line a person reads: no C0 or C1 control character (TAB, LF and
  CR included), no DEL, no line or paragraph separator, no bidirectional embedding, override or
  isolate control (they can make a statement line read other than it is stored), no BOM or other
  invisible annotation character.
- MULTILINE (route_payload): as TEXT, but TAB, LF and CR are allowed.
- DOCUMENT (a Stripe event's JSON, forwarded by the bridge): Stripe's own text, which may quote
  what people typed anywhere; its parser decides what it holds, so only NUL is refused here.
NUL is refused everywhere (PostgreSQL text cannot hold it).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from server.domain.errors import InvalidArgument
from server.domain.money import (
    MAX_AMOUNT_CENTS,
    MAX_DESCRIPTION_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_NAME_CHARS,
    MAX_ROUTE_CODE_CHARS,
    MAX_ROUTE_PAYLOAD_CHARS,
)
from server.domain.types import PostingType

# Account ids are ext_id * 4 + kind in a signed 64-bit column: larger ids cannot be stored.
MAX_ID = (2**63 - 1) // 4 - 1

MAX_STRIPE_ID_CHARS = 100
MAX_STRIPE_PAYLOAD_CHARS = 512 * 1024
MAX_CONSUMER_CHARS = 100
MAX_PAGE_TOKEN_CHARS = 200
MAX_BANK_FIELD_CHARS = 32
DEFAULT_MAX_CHARS = 255


class TextKind(enum.Enum):
    IDENTIFIER = "identifier"
    TEXT = "text"
    MULTILINE = "multiline"
    DOCUMENT = "document"


@dataclass(frozen=True)
class TextRule:
    kind: TextKind
    max_chars: int
    required: bool = False
    trimmed: bool = False  # stored with surrounding spaces cut: they do not count towards max_chars


# C0 and C1 controls, DEL, line and paragraph separators, bidi embedding/override/isolate
# controls, BOM, interlinear annotation characters, and the two noncharacters U+FFFE/U+FFFF.
_UNSAFE = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ufff9-\ufffb\ufffe\uffff"
_TEXT_BAD = re.compile(f"[\x00-\x1f{_UNSAFE}]")
_MULTILINE_BAD = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f{_UNSAFE}]")

# By field name, whichever request carries it; `TEXT_RULE_OVERRIDES` names (message, field) pairs
# that differ. A string field named in neither gets DEFAULT_TEXT_RULE, so a new field is covered.
TEXT_RULES: dict[str, TextRule] = {
    "idempotency_key": TextRule(TextKind.IDENTIFIER, MAX_IDEMPOTENCY_KEY_CHARS, required=True),
    "description": TextRule(TextKind.TEXT, MAX_DESCRIPTION_CHARS, trimmed=True),
    "name": TextRule(TextKind.TEXT, MAX_NAME_CHARS, trimmed=True),
    "route_code": TextRule(TextKind.IDENTIFIER, MAX_ROUTE_CODE_CHARS, trimmed=True),
    "route_codes": TextRule(TextKind.IDENTIFIER, MAX_ROUTE_CODE_CHARS, required=True),  # each item
    "route_payload": TextRule(TextKind.MULTILINE, MAX_ROUTE_PAYLOAD_CHARS),
    "payment_intent_id": TextRule(TextKind.IDENTIFIER, MAX_STRIPE_ID_CHARS),
    "page_token": TextRule(TextKind.IDENTIFIER, MAX_PAGE_TOKEN_CHARS),
    "consumer": TextRule(TextKind.IDENTIFIER, MAX_CONSUMER_CHARS),
    "bsb": TextRule(TextKind.IDENTIFIER, MAX_BANK_FIELD_CHARS, trimmed=True),
    "account_number": TextRule(TextKind.IDENTIFIER, MAX_BANK_FIELD_CHARS, trimmed=True),
    "event_id": TextRule(TextKind.IDENTIFIER, MAX_STRIPE_ID_CHARS, required=True),
    "type": TextRule(TextKind.IDENTIFIER, MAX_STRIPE_ID_CHARS, required=True),
    "payload_json": TextRule(TextKind.DOCUMENT, MAX_STRIPE_PAYLOAD_CHARS, required=True),
}
TEXT_RULE_OVERRIDES: dict[tuple[str, str], TextRule] = {
    # a dry run books and records nothing: its key is optional (checked for shape when given)
    ("SettleRequest", "idempotency_key"): TextRule(TextKind.IDENTIFIER, MAX_IDEMPOTENCY_KEY_CHARS),
}
DEFAULT_TEXT_RULE = TextRule(TextKind.TEXT, DEFAULT_MAX_CHARS)


def text_rule(message_name: str, field_name: str) -> TextRule:
    return TEXT_RULE_OVERRIDES.get((message_name, field_name)) or TEXT_RULES.get(field_name) or DEFAULT_TEXT_RULE


def check_text(field: str, value: str, rule: TextRule) -> None:
    """Raise InvalidArgument naming `field` unless `value` keeps `rule`."""
    if not value:
        if rule.required:
            raise InvalidArgument.field(field, "is required")
        return
    if rule.kind is TextKind.IDENTIFIER:
        if not value.isprintable():
            raise InvalidArgument.field(field, "contains control or invisible characters")
        if value.isspace():
            raise InvalidArgument.field(field, "is blank")
    elif rule.kind is TextKind.DOCUMENT:
        if "\x00" in value:
            raise InvalidArgument.field(field, "contains a NUL character")
    else:
        bad = (_TEXT_BAD if rule.kind is TextKind.TEXT else _MULTILINE_BAD).search(value)
        if bad is not None:
            raise InvalidArgument.field(field, f"contains a control character (U+{ord(bad.group()):04X})")
    if (len(value.strip()) if rule.trimmed else len(value)) > rule.max_chars:
        raise InvalidArgument.field(field, f"is longer than {rule.max_chars} characters")


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
    """Free text as stored: surrounding spaces cut, `required` means not blank."""
    text = text.strip()
    if required and not text:
        raise InvalidArgument.field(field, "is required")
    check_text(field, text, TextRule(TextKind.TEXT, max_chars, trimmed=True))
    return text


def description(text: str, *, required: bool = False) -> str:
    return bounded_text("description", text, MAX_DESCRIPTION_CHARS, required=required)


def caller_payment_type(field: str, payment_type: PostingType) -> PostingType:
    """A type a caller may book; the system's own types would forge an administrator's or Stripe's line."""
    if not payment_type.caller_may_book:
        raise InvalidArgument.field(field, f"{payment_type.value} is booked by the system only, never by a caller")
    return payment_type
