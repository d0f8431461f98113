"""Idempotency records (SPEC §3): the first request with a key runs and its response is stored,
in the same transaction as its effect, with a hash of the request; a retry of the same request
gets the stored response; the same key with another request is refused. Keys are per principal."""

from __future__ import annotations

import functools
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
    order). Each field must be set (not zero) in `response`: its place is found in the serialisation
    itself, which is walked once (three times faster than building the parts as messages)."""
    numbers = [_field_number(type(response), field) for field in fields]
    assert numbers == sorted(set(numbers)), "fields in number order, each once"
    wire = response.SerializeToString(deterministic=True)
    parts, cut, pos, wanted = [], 0, 0, iter(numbers)
    number = next(wanted)
    while pos < len(wire):
        key, pos = _read_varint(wire, pos)
        field, wire_type = key >> 3, key & 7
        if field == number:
            assert wire_type == 0, f"{fields} must be integers"
            parts.append(wire[cut:pos])  # up to and including the field's tag
            _, pos = _read_varint(wire, pos)
            cut = pos
            number = next(wanted, None)
            if number is None:
                break
        elif wire_type == 0:
            _, pos = _read_varint(wire, pos)
        elif wire_type == 2:
            length, pos = _read_varint(wire, pos)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type} in a response")
    assert number is None, f"{fields} must be set (not zero) in the response"
    parts.append(wire[cut:])
    return tuple(parts)


@functools.cache
def _field_number(message_type: type, field: str) -> int:
    return message_type.DESCRIPTOR.fields_by_name[field].number


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 127) << shift
        if byte < 128:
            return value, pos
        shift += 7
