"""The outbox writer: events are rows written in the transaction of the money they report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import Connection, insert

from server.domain.types import EventKind
from server.ledger.db import utcnow
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


# Called after every commit that wrote events (the event stream's wake-up); set by the app.
_after_commit_hooks: list = []


def on_events_committed(hook) -> None:  # noqa: ANN001
    _after_commit_hooks.append(hook)


def emit(conn: Connection, *events: NewEvent) -> None:
    """Write events in the caller's transaction. Nothing is written if it rolls back."""
    if not events:
        return
    now = utcnow()
    rows = []
    for ev in events:
        row = asdict(ev)
        row["kind"] = ev.kind.value
        row["created_at"] = now
        rows.append(row)
    conn.execute(insert(outbox_events), rows)
    conn.info["events_written"] = conn.info.get("events_written", 0) + len(rows)
