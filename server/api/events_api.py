"""The event stream: Subscribe and Ack (SPEC §6)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy import Connection

from cobalt.payments.v1 import payments_pb2 as pb
from server.api.base import ApiBase
from server.domain.errors import InvalidArgument, OutOfRange, Unavailable
from server.domain.money import MAX_ROUTE_CODE_CHARS
from server.events import store
from server.events.hub import EventHub, HubLimits
from server.events.store import EventFilter, StoredEvent


def event_filter(request: pb.SubscribeRequest) -> EventFilter:
    if len(request.route_codes) > store.MAX_FILTER_ITEMS:
        raise InvalidArgument.field("route_codes", f"at most {store.MAX_FILTER_ITEMS} route codes")
    if len(request.kinds) > store.MAX_FILTER_ITEMS:
        raise InvalidArgument.field("kinds", f"at most {store.MAX_FILTER_ITEMS} kinds")
    for i, code in enumerate(request.route_codes):
        if not code or len(code) > MAX_ROUTE_CODE_CHARS:
            raise InvalidArgument.field(f"route_codes[{i}]", f"must be 1 to {MAX_ROUTE_CODE_CHARS} characters")
    kinds = []
    for i, kind in enumerate(request.kinds):
        if kind == pb.EVENT_KIND_UNSPECIFIED or kind not in pb.EventKind.values():
            raise InvalidArgument.field(f"kinds[{i}]", f"{kind} is not an event kind")
        kinds.append(pb.EventKind.Name(kind))
    return EventFilter(frozenset(request.route_codes), frozenset(kinds))


def event_message(ev: StoredEvent) -> pb.Event:
    """The wire form, built once per event however many streams carry it."""
    if ev.wire is None:
        msg = pb.Event(
            sequence=ev.sequence, kind=pb.EventKind.Value(ev.kind) if ev.kind in pb.EventKind.keys() else 0,
            route_code=ev.route_code, route_payload=ev.route_payload, payment_id=ev.payment_id,
            member_id=ev.member_id, organisation_id=ev.organisation_id, amount_cents=ev.amount_cents,
            reference=ev.reference, reason=ev.reason, balance_cents=ev.balance_cents,
            other_member_id=ev.other_member_id, event_id=ev.event_id, session_id=ev.session_id,
        )
        msg.time.FromDatetime(ev.created_at)
        ev.wire = msg
    return ev.wire


def start_cursor(conn: Connection, principal: str, request: pb.SubscribeRequest) -> int:
    """`after_sequence`, or a durable consumer's acknowledged sequence when it is 0; negative = only new events.
    A cursor before the oldest kept event is OUT_OF_RANGE."""
    after = request.after_sequence
    if after == 0 and request.consumer:
        after = store.acked_sequence(conn, principal, request.consumer)
    if after > 0:
        newest = store.last_sequence(conn)
        if after > newest:
            raise InvalidArgument.field("after_sequence", f"no event has sequence {after} (newest is {newest})")
    pruned = store.pruned_through(conn)
    if 0 < after < pruned:
        raise OutOfRange(f"events after sequence {after} were pruned (retention); the oldest kept follow "
                         f"sequence {pruned}: subscribe with after_sequence >= {pruned} to accept the loss")
    return after


class EventsApi(ApiBase):
    event_hub: EventHub

    async def on_server_start(self) -> None:
        await super().on_server_start()
        limits = HubLimits.from_extra(
            {"event_poll_interval_s": max(self.settings.event_poll_interval_ms, 10) / 1000, **self.settings.extra})
        self.event_hub = EventHub(self.db, self.read, self.settings.event_retention_days, limits)
        await self.event_hub.start()

    async def on_server_stop(self) -> None:
        hub = getattr(self, "event_hub", None)
        if hub is not None:
            await hub.stop()
        await super().on_server_stop()

    async def Subscribe(self, request: pb.SubscribeRequest, context) -> AsyncIterator[pb.Event]:  # noqa: ANN001, N802
        flt = event_filter(request)
        store.check_consumer(request.consumer, required=False)
        hub = getattr(self, "event_hub", None)
        if hub is None:
            raise Unavailable("the event stream is starting; retry in a moment")
        principal = self.principal().name
        after = await self.read(lambda conn: start_cursor(conn, principal, request))
        async for ev in hub.stream(flt, after):
            yield event_message(ev)

    async def Ack(self, request: pb.AckRequest, context) -> pb.AckResponse:  # noqa: ANN001, N802
        principal = self.principal().name
        acked = await self.write(lambda conn: store.ack(conn, principal, request.consumer, request.sequence))
        return pb.AckResponse(consumer=request.consumer, acked_sequence=acked)
