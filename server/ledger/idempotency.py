"""Idempotency records (SPEC §3): the first request with a key runs and its response is stored,
in the same transaction as its effect, with a hash of the request; a retry of the same request
gets the stored response; the same key with another request is refused. Keys are per principal."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf.message import Message
from sqlalchemy import Connection, bindparam, insert, select

from server.domain.errors import AlreadyExists, InvalidArgument
from server.domain.money import MAX_IDEMPOTENCY_KEY_CHARS
from server.ledger.db import defer_write, utcnow
from server.ledger.schema import idempotency_keys


def request_hash(method: str, request_bytes: bytes) -> str:
    return hashlib.sha256(method.encode() + b"\0" + request_bytes).hexdigest()


def check_key(key: str) -> None:
    if not key:
        raise InvalidArgument.field("idempotency_key", "is required (1-255 characters)")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument.field("idempotency_key", f"is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")


@dataclass(frozen=True)
class Pending:
    """The record a first request will leave: whose key, for which request."""

    principal: str
    key: str
    method: str
    request_hash: str


@dataclass(frozen=True)
class Stored:
    response: bytes


_LOOKUP = select(idempotency_keys.c.method, idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
    idempotency_keys.c.principal == bindparam("idem_principal"), idempotency_keys.c.key == bindparam("idem_key")
)
_RECORD = insert(idempotency_keys)


def lookup(conn: Connection, principal: str, key: str, method: str, req_hash: str) -> Stored | None:
    row = conn.execute(_LOOKUP, {"idem_principal": principal, "idem_key": key}).first()
    if row is None:
        return None
    if row.method != method or row.request_hash != req_hash:
        raise AlreadyExists(
            f"idempotency key {key!r} was already used for a different request ({row.method}); use a new key"
        )
    return Stored(bytes(row.response))


def record(conn: Connection, principal: str, key: str, method: str, req_hash: str, response: bytes) -> None:
    # with the COMMIT on PostgreSQL (nobody reads it back in this transaction); a concurrent
    # request with the same key still fails this one's commit with an IntegrityError
    defer_write(
        conn,
        _RECORD,
        {"principal": principal, "key": key, "method": method, "request_hash": req_hash, "response": response,
         "created_at": utcnow()},
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 127:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def response_around(response: Message, *fields: str) -> tuple[bytes, ...]:
    """The stored form of `response` with integer `fields` the database fills in (balances after),
    in field-number order: the bytes before the first field's value, between each value and the
    next, and after the last. The values go between them as varints; with values that are not zero
    the parts and values together are the response's deterministic serialisation (fields in number
    order)."""
    numbers = [response.DESCRIPTOR.fields_by_name[field].number for field in fields]
    assert numbers == sorted(set(numbers)), "fields in number order, each once"
    parts = []
    for low, high in zip([0, *numbers], [*numbers, None], strict=True):
        part = type(response)()
        part.CopyFrom(response)
        for descriptor, _ in response.ListFields():  # keep what lies strictly between low and high
            if descriptor.number <= low or (high is not None and descriptor.number >= high):
                part.ClearField(descriptor.name)
        parts.append(part.SerializeToString(deterministic=True) + (_varint(high << 3) if high is not None else b""))
    return tuple(parts)
