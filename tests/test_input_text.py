"""Every string field of every request is checked in one place before any work (SPEC §4): control
characters, invisible characters, length, blank keys. The cases are made from the proto descriptors,
so a string field added to any request is covered here from its first day.

Each bad value must answer INVALID_ARGUMENT with a google.rpc.BadRequest field violation naming the
field, and change nothing: not a balance, posting, event, idempotency record or Stripe event."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from conftest import TOKENS, RunningServer
from ledger_invariants import bad_fields, check_invariants, snapshot
from sqlalchemy import func, select

from cobalt.payments.v1 import payments_pb2 as pb
from cobalt.payments.v1 import payments_pb2_grpc as pb_grpc
from server.api import request_check
from server.domain import validation
from server.domain.errors import InvalidArgument
from server.domain.validation import TextKind, TextRule
from server.ledger.schema import card_payments, stripe_events

SERVICE = pb.DESCRIPTOR.services_by_name["PaymentsService"]
ORG, MEMBER = 7, 1



def key() -> str:
    return uuid.uuid4().hex


def _member() -> pb.AccountRef:
    return pb.AccountRef(member_id=MEMBER)


def _transfer() -> pb.TransferRequest:
    req = pb.TransferRequest(idempotency_key=key(), to_member_id=3, amount_cents=100, description="share")
    getattr(req, "from").member_id = MEMBER
    return req


_EVENT = json.dumps({"id": "evt_text_1", "type": "customer.created", "data": {"object": {"id": "cus_1"}}})

# A valid request per method, so that the one bad field is the only thing wrong with it. A method not
# named here is sent as its empty message (its fields are still all covered).
BASE: dict[str, Callable[[], object]] = {
    "Pay": lambda: pb.PayRequest(idempotency_key=key(), member_id=MEMBER, organisation_id=ORG, amount_cents=100,
                                 description="entry", route_code="EVT", route_payload='{"entry": 1}'),
    "GetStatement": lambda: pb.GetStatementRequest(account=_member()),
    "Transfer": _transfer,
    "StartTopUp": lambda: pb.StartTopUpRequest(idempotency_key=key(), member_id=MEMBER, amount_cents=50_00),
    "ConfirmCardPayment": lambda: pb.ConfirmCardPaymentRequest(payment_intent_id="pi_123"),
    "SetupAutoTopUp": lambda: pb.SetupAutoTopUpRequest(idempotency_key=key(), member_id=MEMBER),
    "UpdateAutoTopUp": lambda: pb.UpdateAutoTopUpRequest(idempotency_key=key(), member_id=MEMBER,
                                                         amount_cents=50_00),
    "CancelAutoTopUp": lambda: pb.CancelAutoTopUpRequest(idempotency_key=key(), member_id=MEMBER),
    "Refund": lambda: pb.RefundRequest(idempotency_key=key(), payment_intent_id="pi_123", amount_cents=100,
                                       member_id=MEMBER),
    "Subscribe": lambda: pb.SubscribeRequest(route_codes=["EVT", "M2M"], consumer="ledger-feed"),
    "Ack": lambda: pb.AckRequest(consumer="ledger-feed", sequence=1),
    "Adjust": lambda: pb.AdjustRequest(idempotency_key=key(), account=_member(), amount_cents=100,
                                       description="correction"),
    "Settle": lambda: pb.SettleRequest(idempotency_key=key(), organisation_ids=[ORG]),
    "UpsertOrganisation": lambda: pb.UpsertOrganisationRequest(idempotency_key=key(), organisation_id=8,
                                                               name="New Club", bsb="123-456",
                                                               account_number="12345678"),
    "UpsertMember": lambda: pb.UpsertMemberRequest(idempotency_key=key(), member_id=5, name="Cy"),
    "SetFeeSettings": lambda: pb.SetFeeSettingsRequest(idempotency_key=key(), refund_fee_bp=300),
    "ListBalances": lambda: pb.ListBalancesRequest(),
    "HandleStripeEvent": lambda: pb.HandleStripeEventRequest(event_id="evt_text_1", type="customer.created",
                                                             payload_json=_EVENT),
}


def bad_values(rule: TextRule) -> Iterator[tuple[str, str]]:
    """(name, value) of what `rule` refuses."""
    yield "nul", "ab\x00cd"
    yield "too-long", "x" * (rule.max_chars + 1)
    if rule.kind is TextKind.DOCUMENT:
        return
    yield "escape", "ab\x1b[2Jcd"
    yield "delete", "ab\x7fcd"
    yield "c1-control", "ab\x85cd"
    yield "bidi-override", "ab\u202ecd"
    yield "line-separator", "ab\u2028cd"
    if rule.kind is not TextKind.MULTILINE:
        yield "newline", "ab\ncd"
        yield "tab", "ab\tcd"
    if rule.kind is TextKind.IDENTIFIER:
        yield "blank", "   "
        yield "zero-width-space", "ab\u200bcd"


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # the field violation expected
    value: str

    @property
    def id(self) -> str:
        return f"{self.method}.{self.path}"


def _cases() -> list[tuple[Case, str]]:
    found = []
    for method in SERVICE.methods:
        for path, rule, repeated in request_check.string_fields(method.input_type):
            for name, value in bad_values(rule):
                found.append((Case(method.name, f"{path}[0]" if repeated else path, value), name))
            if rule.required and not repeated:
                found.append((Case(method.name, path, ""), "missing"))
    return found


CASES = _cases()


def _with(method: str, path: str, value: str):  # noqa: ANN202
    request = BASE[method]() if method in BASE else getattr(pb, SERVICE.methods_by_name[method].input_type.name)()
    *outer, last = path.split(".")
    target = request
    for part in outer:
        target = getattr(target, part.split("[")[0])
    if last.endswith("[0]"):
        items = getattr(target, last[:-3])
        del items[:]
        items.append(value)
    else:
        setattr(target, last, value)
    return request


def _call(server: RunningServer, method: str, request) -> None:  # noqa: ANN001
    role = "bridge" if method == "HandleStripeEvent" else "admin"
    metadata = (("authorization", f"Bearer {TOKENS[role]}"),)
    with server.channel() as channel:
        answer = getattr(pb_grpc.PaymentsServiceStub(channel), method)(request, metadata=metadata, timeout=10)
        if SERVICE.methods_by_name[method].server_streaming:
            next(iter(answer))


def _side_tables(server: RunningServer) -> tuple[int, int]:
    with server.db.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()  # type: ignore[return-value]
                     for t in (card_payments, stripe_events))


def test_the_cases_cover_every_request_string_field() -> None:
    """The descriptor walk finds the fields this suite knows of (and every other one)."""
    covered = {(case.method, case.path) for case, _ in CASES}
    for expected in [("Pay", "idempotency_key"), ("Pay", "route_payload"), ("Pay", "description"),
                     ("Subscribe", "route_codes[0]"), ("HandleStripeEvent", "payload_json"),
                     ("UpsertOrganisation", "bsb"), ("GetStatement", "page_token"), ("Ack", "consumer")]:
        assert expected in covered
    every = {(m.name, f.name) for m in SERVICE.methods for f in m.input_type.fields
             if f.type == f.TYPE_STRING}
    assert every <= {(method, path.removesuffix("[0]")) for method, path in covered}


@pytest.mark.parametrize(("case", "what"), CASES, ids=[f"{c.id}-{what}" for c, what in CASES])
def test_bad_text_is_invalid_argument_with_a_field_violation_and_changes_nothing(
        server: RunningServer, admin, case: Case, what: str) -> None:  # noqa: ANN001
    admin.upsert_organisation(ORG, "Club")
    admin.adjust(10_000, "opening", member_id=MEMBER)
    before, side_before = snapshot(server.db), _side_tables(server)
    with pytest.raises(grpc.RpcError) as err:
        _call(server, case.method, _with(case.method, case.path, case.value))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    fields = bad_fields(err.value)
    assert case.path in fields, f"expected a field violation for {case.path}, got {fields}"
    assert snapshot(server.db) == before and _side_tables(server) == side_before, "a refused request changes nothing"
    check_invariants(server.db)


def test_a_multiline_payload_keeps_its_line_breaks(server: RunningServer, admin, app) -> None:  # noqa: ANN001
    """route_payload is opaque and may be pretty-printed JSON: TAB, LF and CR pass; a description may not."""
    admin.upsert_organisation(ORG, "Club")
    admin.adjust(10_000, "opening", member_id=MEMBER)
    payload = '{\n\t"entry": 1\r\n}'
    assert app.pay(MEMBER, 100, organisation_id=ORG, route_payload=payload).status == pb.SUCCEEDED
    with server.db.engine.connect() as conn:
        from server.ledger.schema import outbox_events
        stored = conn.execute(select(outbox_events.c.route_payload)
                              .where(outbox_events.c.kind == "PAYMENT_SUCCEEDED")).scalar_one()
    assert stored == payload


# ---------------------------------------------------------------- the rules themselves (pure)
@pytest.mark.parametrize("value", ["Entrée — club night", "Zoë 🂡 ♠♥", "名前", "   padded   ", "שלום עולם",
                                   "family 👨\u200d👩\u200d👧"])
def test_text_a_person_writes_passes(value: str) -> None:
    validation.check_text("description", value, TextRule(TextKind.TEXT, 80, trimmed=True))


@pytest.mark.parametrize("value", ["6f1c-44aa", "key with spaces", "Ключ-1", "a" * 255])
def test_printable_keys_pass(value: str) -> None:
    validation.check_text("idempotency_key", value, validation.text_rule("PayRequest", "idempotency_key"))


@pytest.mark.parametrize(("value", "kind"), [("\u00a0\u00a0", TextKind.IDENTIFIER), ("\t", TextKind.IDENTIFIER),
                                             ("a\u0000", TextKind.MULTILINE), ("a\u2066b", TextKind.MULTILINE),
                                             ("a\rb", TextKind.TEXT), ("a\ufeffb", TextKind.TEXT)])
def test_refused(value: str, kind: TextKind) -> None:
    with pytest.raises(InvalidArgument) as err:
        validation.check_text("f", value, TextRule(kind, 100))
    assert err.value.field_violations[0][0] == "f"


def test_settle_dry_run_needs_no_key_but_a_given_key_is_checked() -> None:
    rule = validation.text_rule("SettleRequest", "idempotency_key")
    validation.check_text("idempotency_key", "", rule)
    with pytest.raises(InvalidArgument):
        validation.check_text("idempotency_key", "  ", rule)


def test_printable_text_breaks_no_rule() -> None:
    """The check's fast path passes printable text at once: every character a text rule refuses
    must be one `str.isprintable()` refuses too (else the fast path would let it through)."""
    refused_by_rules = [cp for cp in range(0x110000) if validation._TEXT_BAD.match(chr(cp))]
    assert len(refused_by_rules) > 70
    assert [f"U+{cp:04X}" for cp in refused_by_rules if chr(cp).isprintable()] == []
