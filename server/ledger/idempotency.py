"""Idempotency records (SPEC §3): the first request with a key runs and the data of its result is
stored, in the same transaction as its effect, with a hash of the request; a retry of the same
request gets the stored result back; the same key with another request is refused. Keys are per
principal.

A record holds data, not wire bytes: the result dataclass of the use case (ids, balances, status),
as JSON. The API layer builds the response from it, for the first answer and every replay alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Connection

from server.domain.errors import AlreadyExists, InvalidArgument
from server.domain.money import MAX_IDEMPOTENCY_KEY_CHARS
from server.ledger import ledger

_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def encode(result: Any) -> dict:
    """The stored form of a result dataclass: its type's name and its fields as JSON."""
    cls = type(result)
    assert dataclasses.is_dataclass(cls) and cls.__module__.startswith("server."), f"{cls} is not a result"
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "data": _adapter(cls).dump_python(result, mode="json")}


def decode(document: dict) -> Any:
    module, _, name = document["type"].partition(":")
    if not module.startswith("server."):
        raise ValueError(f"not a result type: {document['type']}")
    cls = getattr(importlib.import_module(module), name)
    return _adapter(cls).validate_python(document["data"])


def request_hash(method: str, request_bytes: bytes) -> str:
    return hashlib.sha256(method.encode() + b"\0" + request_bytes).hexdigest()


def check_key(key: str) -> None:
    if not key or not key.strip():
        raise InvalidArgument.field("idempotency_key", "is required (1-255 characters, not blank)")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument.field("idempotency_key", f"is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")


@dataclass(frozen=True)
class Pending:
    """The record a first request will leave: whose key, for which request."""

    principal: str
    key: str
    method: str
    request_hash: str

    def record(self, conn: Connection, result: Any) -> None:
        ledger.record(conn, self.principal, self.key, self.method, self.request_hash, encode(result))


@dataclass(frozen=True)
class Replayed:
    """The stored result of an earlier identical request."""

    result: Any


_LOOKUP = ("SELECT principal, key, method, request_hash, result FROM idempotency_keys "
           "WHERE (principal, key) IN (SELECT * FROM unnest(%(principals)s::varchar[], %(keys)s::varchar[]))")


def lookup_many(conn: Connection, pendings: Sequence[Pending], *,
                before: str | None = None) -> list[Replayed | AlreadyExists | None]:
    """For each request: its stored result, the refusal of a key used for another request, or None.
    `before`: a statement (without values) sent ahead of the lookup in the same round trip."""
    if not pendings:
        if before:
            conn.exec_driver_sql(before)
        return []
    sql = _LOOKUP if before is None else f"{before}; {_LOOKUP}"
    rows = conn.exec_driver_sql(sql, {"principals": [p.principal for p in pendings],
                                      "keys": [p.key for p in pendings]}).fetchall()
    found = {(row.principal, row.key): row for row in rows}
    out: list[Replayed | AlreadyExists | None] = []
    for p in pendings:
        row = found.get((p.principal, p.key))
        if row is None:
            out.append(None)
        elif row.method != p.method or row.request_hash != p.request_hash:
            out.append(AlreadyExists(f"idempotency key {p.key!r} was already used for a different request "
                                     f"({row.method}); use a new key"))
        else:
            out.append(Replayed(decode(row.result)))
    return out


def lookup(conn: Connection, pending: Pending) -> Replayed | None:
    """The stored result of this request, None for a first request; raises for a reused key."""
    (found,) = lookup_many(conn, [pending])
    if isinstance(found, AlreadyExists):
        raise found
    return found
