"""Reading the outbox: events in sequence ranges, durable consumers' progress, retention.

The outbox table is the truth; everything in memory (the hub's ring, subscribers' queues) is a cache of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, case, delete, func, select
from sqlalchemy.dialects import postgresql

from server.domain.errors import InvalidArgument
from server.ledger.db import as_utc, utcnow
from server.ledger.schema import event_consumers, event_stream_state, outbox_events

MAX_CONSUMER_CHARS = 100
MAX_FILTER_ITEMS = 50  # route codes or kinds in one Subscribe
PRUNED_THROUGH = "pruned_through"
PRUNE_BATCH_ROWS = 5_000

_COLUMNS = (
    outbox_events.c.sequence, outbox_events.c.kind, outbox_events.c.route_code, outbox_events.c.route_payload,
    outbox_events.c.payment_id, outbox_events.c.member_id, outbox_events.c.organisation_id,
    outbox_events.c.other_member_id, outbox_events.c.amount_cents, outbox_events.c.balance_cents,
    outbox_events.c.reference, outbox_events.c.reason, outbox_events.c.event_id, outbox_events.c.session_id,
    outbox_events.c.created_at,
)


@dataclass(eq=False)
class StoredEvent:
    sequence: int
    kind: str
    route_code: str
    route_payload: str
    payment_id: str
    member_id: int
    organisation_id: int
    other_member_id: int
    amount_cents: int
    balance_cents: int
    reference: str
    reason: str
    event_id: int
    session_id: int
    created_at: datetime
    wire: object = field(default=None, repr=False)  # the encoded message, built once for all subscribers


@dataclass(frozen=True)
class EventFilter:
    """Empty sets match everything."""

    route_codes: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    def matches(self, ev: StoredEvent) -> bool:
        return (not self.route_codes or ev.route_code in self.route_codes) and (
            not self.kinds or ev.kind in self.kinds)

    def where(self):  # noqa: ANN201 - a SQLAlchemy clause
        clauses = []
        if self.route_codes:
            clauses.append(outbox_events.c.route_code.in_(sorted(self.route_codes)))
        if self.kinds:
            clauses.append(outbox_events.c.kind.in_(sorted(self.kinds)))
        return and_(*clauses) if clauses else None


MATCH_ALL = EventFilter()


# read_range without a filter, as driver SQL (%(name)s values) for a connection outside SQLAlchemy
READ_RANGE_SQL = (f"SELECT {', '.join(c.name for c in _COLUMNS)} FROM {outbox_events.name} "
                  "WHERE sequence > %(after)s AND sequence <= %(through)s ORDER BY sequence LIMIT %(limit)s")


def event_from_row(row) -> StoredEvent:  # noqa: ANN001 - a row of _COLUMNS
    ev = StoredEvent(*row)
    ev.created_at = as_utc(ev.created_at)
    return ev


def read_range(conn: Connection, after: int, through: int, flt: EventFilter = MATCH_ALL,
               limit: int = 1_000) -> list[StoredEvent]:
    """Events with after < sequence ≤ through that match, in sequence order, at most `limit`."""
    query = select(*_COLUMNS).where(outbox_events.c.sequence > after, outbox_events.c.sequence <= through)
    where = flt.where()
    if where is not None:
        query = query.where(where)
    return [event_from_row(r) for r in conn.execute(query.order_by(outbox_events.c.sequence).limit(limit))]


def last_sequence(conn: Connection) -> int:
    return conn.execute(select(func.coalesce(func.max(outbox_events.c.sequence), 0))).scalar_one()


def pruned_through(conn: Connection) -> int:
    value = conn.execute(
        select(event_stream_state.c.value).where(event_stream_state.c.name == PRUNED_THROUGH)).scalar()
    return value or 0


def acked_sequence(conn: Connection, principal: str, consumer: str) -> int:
    value = conn.execute(select(event_consumers.c.acked_sequence).where(
        event_consumers.c.principal == principal, event_consumers.c.consumer == consumer)).scalar()
    return value or 0


def check_consumer(consumer: str, *, required: bool) -> None:
    if not consumer:
        if required:
            raise InvalidArgument.field("consumer", "is required")
        return
    if len(consumer) > MAX_CONSUMER_CHARS:
        raise InvalidArgument.field("consumer", f"is longer than {MAX_CONSUMER_CHARS} characters")
    if not consumer.isprintable() or consumer.strip() != consumer:
        raise InvalidArgument.field("consumer", "must be printable with no leading or trailing spaces")


def _insert_for(conn: Connection):  # noqa: ANN202
    return postgresql.insert


def ack(conn: Connection, principal: str, consumer: str, sequence: int) -> int:
    """Record that `consumer` (of `principal`) has processed everything up to `sequence`. Never moves back.
    Returns the stored acknowledged sequence."""
    check_consumer(consumer, required=True)
    if sequence <= 0:
        raise InvalidArgument.field("sequence", "must be a delivered event's sequence (> 0)")
    newest = last_sequence(conn)
    if sequence > newest:
        raise InvalidArgument.field("sequence", f"no event has sequence {sequence} yet (newest is {newest})")
    stmt = _insert_for(conn)(event_consumers).values(
        principal=principal, consumer=consumer, acked_sequence=sequence, updated_at=utcnow())
    stmt = stmt.on_conflict_do_update(
        index_elements=[event_consumers.c.principal, event_consumers.c.consumer],
        set_={
            "acked_sequence": case(
                (stmt.excluded.acked_sequence > event_consumers.c.acked_sequence, stmt.excluded.acked_sequence),
                else_=event_consumers.c.acked_sequence),
            "updated_at": stmt.excluded.updated_at,
        },
    )
    conn.execute(stmt)
    return acked_sequence(conn, principal, consumer)


def prune(conn: Connection, retention_days: int, now: datetime | None = None) -> int:
    """Delete the oldest events older than the retention, at most PRUNE_BATCH_ROWS per call and never the
    newest event, and raise `pruned_through` to the highest sequence deleted. Returns how many rows went.
    Works from the oldest row up along the primary key, so a run costs the same however big the table."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    newest = last_sequence(conn)
    oldest = (select(outbox_events.c.sequence, outbox_events.c.created_at)
              .where(outbox_events.c.sequence < newest)
              .order_by(outbox_events.c.sequence).limit(PRUNE_BATCH_ROWS).subquery())
    first_kept, last_old = conn.execute(select(
        func.min(case((oldest.c.created_at >= cutoff, oldest.c.sequence))),
        func.max(oldest.c.sequence))).one()
    upto = last_old if first_kept is None else first_kept - 1
    if not upto:
        return 0
    deleted = conn.execute(delete(outbox_events).where(outbox_events.c.sequence <= upto)).rowcount
    if not deleted:
        return 0
    stmt = _insert_for(conn)(event_stream_state).values(name=PRUNED_THROUGH, value=upto)
    stmt = stmt.on_conflict_do_update(
        index_elements=[event_stream_state.c.name],
        set_={"value": case((stmt.excluded.value > event_stream_state.c.value, stmt.excluded.value),
                            else_=event_stream_state.c.value)},
    )
    conn.execute(stmt)
    return deleted
