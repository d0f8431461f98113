"""Watching the event stream from a client: `tail` follows Subscribe across reconnects, `print_events`
shows it one line per event (used by `payments-admin events tail`).

    with PaymentsClient(target, token) as client:
        for event in tail(client, route_codes=["EVT"], kinds=["PAYMENT_SUCCEEDED"]):
            handle(event)
            client.call("Ack", pb.AckRequest(consumer="entries", sequence=event.sequence))
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import grpc

from clients.payments_client import PaymentsClient
from cobalt.payments.v1 import payments_pb2 as pb

# Statuses after which subscribing again from the last sequence seen is the right move.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def kind_numbers(kinds: Iterable[str | int]) -> list[int]:
    """Event kinds by name (`PAYMENT_SUCCEEDED`, case-insensitive) or number."""
    out = []
    for kind in kinds:
        if isinstance(kind, int):
            out.append(kind)
        else:
            try:
                out.append(pb.EventKind.Value(kind.strip().upper()))
            except ValueError:
                names = ", ".join(n for n in pb.EventKind.keys() if n != "EVENT_KIND_UNSPECIFIED")
                raise ValueError(f"unknown event kind {kind!r} (kinds: {names})") from None
    return out


Reconnecting = Callable[[grpc.RpcError, float, int], None]


def tail(client: PaymentsClient, route_codes: Iterable[str] = (), kinds: Iterable[str | int] = (),
         after_sequence: int = 0, consumer: str = "", *, reconnect: bool = True,
         max_reconnects: int = 100, give_up_after_s: float | None = None,
         on_reconnect: Reconnecting | None = None) -> Iterator[pb.Event]:
    """Events in sequence order, resubscribing after the last one seen when the stream breaks
    (server restart, a connection aged out behind a load balancer, fell behind). Never yields a
    sequence twice. `after_sequence`: 0 = from the oldest kept event, or after `consumer`'s
    acknowledged one; -1 = only new events.

    This loop resumes a stream (each attempt asks from a later sequence), which gRPC's retryPolicy
    cannot do; a first attempt that meets UNAVAILABLE was already retried by the channel, so a stream
    that never opened raises at once. `on_reconnect(error, delay_s, attempt)` is called before each
    wait; reconnecting stops after `max_reconnects` attempts in a row or `give_up_after_s` seconds
    without a stream, raising the last error."""
    request = pb.SubscribeRequest(route_codes=list(route_codes), kinds=kind_numbers(kinds),
                                  after_sequence=after_sequence, consumer=consumer)
    last_seen = after_sequence if after_sequence > 0 else 0
    failures = 0
    opened_once = False
    broken_since: float | None = None
    while True:
        call = client.stream("Subscribe", request)
        try:
            if call.initial_metadata():  # the server answered: the stream is open
                opened_once = True
                broken_since = None
            for event in call:
                opened_once = True
                if event.sequence <= last_seen:
                    continue  # already seen before a reconnect
                last_seen = event.sequence
                failures = 0
                yield event
            return
        except grpc.RpcError as exc:
            now = time.monotonic()
            broken_since = now if broken_since is None else broken_since
            gave_up = (failures >= max_reconnects
                       or (give_up_after_s is not None and now - broken_since >= give_up_after_s))
            if not reconnect or not opened_once or exc.code() not in RESUMABLE or gave_up:
                raise
            delay = RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S) - 1)]
            failures += 1
            if on_reconnect is not None:
                on_reconnect(exc, delay, failures)
            time.sleep(delay)
            if last_seen > 0:
                request.after_sequence = last_seen  # otherwise ask again exactly as before
        finally:
            call.cancel()


def format_event(event: pb.Event) -> str:
    """One line: sequence, time, kind, then the fields that are set."""
    fields = {
        "route": event.route_code, "member": event.member_id, "organisation": event.organisation_id,
        "other_member": event.other_member_id, "amount_cents": event.amount_cents,
        "balance_cents": event.balance_cents, "payment": event.payment_id, "ref": event.reference,
        "reason": event.reason, "event_id": event.event_id, "session_id": event.session_id,
    }
    parts = [f"{k}={v}" for k, v in fields.items() if v]
    if event.route_payload:
        parts.append(f"payload={json.dumps(event.route_payload)}")
    when = event.time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ") if event.HasField("time") else "-"
    return f"{event.sequence:>10}  {when}  {pb.EventKind.Name(event.kind):<18} " + " ".join(parts)


def print_events(events: Iterable[pb.Event], out: TextIO = sys.stdout, *, as_json: bool = False,
                 line: Callable[[pb.Event], str] = format_event) -> int:
    """Print until the stream ends, one `line(event)` (or JSON object) per event; returns how many."""
    from google.protobuf.json_format import MessageToDict

    count = 0
    for event in events:
        if as_json:
            out.write(json.dumps(MessageToDict(event, preserving_proto_field_name=True)) + "\n")
        else:
            out.write(line(event) + "\n")
        out.flush()
        count += 1
    return count
