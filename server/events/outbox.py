"""The outbox writer: events are rows written in the transaction of the money they report."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import Connection, insert

from server.domain.types import EventKind
from server.ledger.db import EVENTS_WRITTEN, defer_write, utcnow
from server.ledger.schema import outbox_events


@dataclass(frozen=True)
class NewEvent:
    kind: EventKind
    member_id: int = 0
    organisation_id: int = 0
    other_member_id: int = 0
    amount_cents: int = 0
    balance_cents: int = 0
    payment_id: str = ""
    reference: str = ""
    route_code: str = ""
    route_payload: str = ""
    reason: str = ""
    event_id: int = 0
    session_id: int = 0


_INSERT_EVENT = insert(outbox_events)
_EVENT_FIELDS = tuple(f.name for f in fields(NewEvent))


def emit(conn: Connection, *events: NewEvent) -> None:
    """Write events in the caller's transaction. Nothing is written if it rolls back.

    Each row takes the next number of the global `sequence` (on PostgreSQL through
    `outbox_next_sequence()`, see migration 0002); `Database.run` wakes the stream after the commit."""
    if not events:
        return
    now = utcnow()
    rows = []
    for ev in events:
        row = {name: getattr(ev, name) for name in _EVENT_FIELDS}  # flat: no deep copy as asdict() makes
        row["kind"] = ev.kind.value
        row["created_at"] = now
        rows.append(row)
    # written with the COMMIT on PostgreSQL (one round trip with it), at once elsewhere
    for row in rows:
        defer_write(conn, _INSERT_EVENT, row)
    conn.info[EVENTS_WRITTEN] = conn.info.get(EVENTS_WRITTEN, 0) + len(rows)
