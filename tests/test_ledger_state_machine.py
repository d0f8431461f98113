"""A hypothesis state machine over random Pay / Transfer / Adjust sequences (and requests that must
fail) against a real server, holding the ledger invariants of SPEC §2 after every step: money is
conserved, each transaction's postings sum to zero, every balance equals its postings, no member
below zero except through Adjust, a refused request leaves every balance byte-identical, replays
book nothing, and statement balance-after chains add up."""

from __future__ import annotations

import uuid

import grpc
import pytest
from conftest import _truncate_all, record_backend
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from ledger_invariants import check_invariants, snapshot

from cobalt.payments.v1 import payments_pb2 as pb
from server.domain.money import TRANSFER_LIMIT_CENTS
from server.domain.types import member_account, organisation_account

MEMBERS = [1, 2, 3, 4]
ORGS = [7, 8]
UNKNOWN_ORG = 99

members = st.sampled_from(MEMBERS)
orgs = st.sampled_from(ORGS)
amounts = st.integers(min_value=1, max_value=6_000)


class LedgerMachine(RuleBasedStateMachine):
    server = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        srv = type(self).server
        _truncate_all(srv.db)
        self.db = srv.db
        self.app = srv.client("app")
        self.admin = srv.client("admin")
        for org in ORGS:
            self.admin.upsert_organisation(org, f"Club {org}")
        self.model: dict[int, int] = {}  # account id -> expected balance
        self.done: list[tuple[str, object, object]] = []  # successful mutating requests, for replays

    def teardown(self) -> None:
        self.app.close()
        self.admin.close()

    # ---------------------------------------------------------------- helpers
    def bal(self, acct: int) -> int:
        return self.model.get(acct, 0)

    def move(self, source: int, dest: int, cents: int) -> None:
        self.model[source] = self.bal(source) - cents
        self.model[dest] = self.bal(dest) + cents

    def refused(self, method: str, request, code: grpc.StatusCode, client=None) -> None:  # noqa: ANN001
        before = snapshot(self.db)
        with pytest.raises(grpc.RpcError) as err:
            (client or self.app).call(method, request)
        assert err.value.code() == code, err.value.details()
        assert snapshot(self.db) == before, "a refused request leaves everything byte-identical"

    @staticmethod
    def key() -> str:
        return uuid.uuid4().hex

    # ---------------------------------------------------------------- rules
    @rule(payer=members, org=orgs, cents=amounts)
    def pay_organisation(self, payer: int, org: int, cents: int) -> None:
        req = pb.PayRequest(idempotency_key=self.key(), member_id=payer, organisation_id=org, amount_cents=cents,
                            description="entry")
        src, dst = member_account(payer), organisation_account(org)
        if self.bal(src) < cents:
            self.refused("Pay", req, grpc.StatusCode.FAILED_PRECONDITION)
            return
        resp = self.app.call("Pay", req)
        self.move(src, dst, cents)
        assert resp.status == pb.SUCCEEDED and resp.balance_cents == self.bal(src)
        self.done.append(("Pay", req, resp))

    @rule(payer=members, payee=members, cents=amounts)
    def pay_member(self, payer: int, payee: int, cents: int) -> None:
        req = pb.PayRequest(idempotency_key=self.key(), member_id=payer, other_member_id=payee, amount_cents=cents)
        src, dst = member_account(payer), member_account(payee)
        if payer == payee:
            self.refused("Pay", req, grpc.StatusCode.INVALID_ARGUMENT)
        elif self.bal(src) < cents:
            self.refused("Pay", req, grpc.StatusCode.FAILED_PRECONDITION)
        else:
            resp = self.app.call("Pay", req)
            self.move(src, dst, cents)
            assert resp.balance_cents == self.bal(src)
            self.done.append(("Pay", req, resp))

    @rule(payer=members, payee=members, cents=st.one_of(amounts, st.just(TRANSFER_LIMIT_CENTS + 1)))
    def transfer(self, payer: int, payee: int, cents: int) -> None:
        req = pb.TransferRequest(idempotency_key=self.key(), to_member_id=payee, amount_cents=cents)
        getattr(req, "from").member_id = payer
        src, dst = member_account(payer), member_account(payee)
        if payer == payee or cents > TRANSFER_LIMIT_CENTS:
            self.refused("Transfer", req, grpc.StatusCode.INVALID_ARGUMENT)
        elif self.bal(src) < cents:
            self.refused("Transfer", req, grpc.StatusCode.FAILED_PRECONDITION)
        else:
            resp = self.app.call("Transfer", req)
            self.move(src, dst, cents)
            assert (resp.from_balance_cents, resp.to_balance_cents) == (self.bal(src), self.bal(dst))
            self.done.append(("Transfer", req, resp))

    @rule(org=orgs, payee=members, cents=amounts)
    def transfer_from_organisation(self, org: int, payee: int, cents: int) -> None:
        req = pb.TransferRequest(idempotency_key=self.key(), to_member_id=payee, amount_cents=cents)
        getattr(req, "from").organisation_id = org
        src, dst = organisation_account(org), member_account(payee)
        self.refused("Transfer", req, grpc.StatusCode.PERMISSION_DENIED)  # not for applications
        if self.bal(src) < cents:
            self.refused("Transfer", req, grpc.StatusCode.FAILED_PRECONDITION, self.admin)
            return
        resp = self.admin.call("Transfer", req)
        self.move(src, dst, cents)
        assert resp.from_balance_cents == self.bal(src)
        self.done.append(("Transfer", req, resp))

    @rule(member=members, cents=st.integers(-8_000, 8_000).filter(bool))
    def adjust_member(self, member: int, cents: int) -> None:
        req = pb.AdjustRequest(idempotency_key=self.key(), account=pb.AccountRef(member_id=member),
                               amount_cents=cents, description="correction")
        self.refused("Adjust", req, grpc.StatusCode.PERMISSION_DENIED)
        resp = self.admin.call("Adjust", req)
        self.model[member_account(member)] = self.bal(member_account(member)) + cents
        self.model[-1] = self.bal(-1) - cents  # the adjustments account, tracked by the sum
        assert resp.balance_cents == self.bal(member_account(member))
        assert resp.balance_negative == (resp.balance_cents < 0)
        self.done.append(("Adjust", req, resp))

    @rule(org=orgs, cents=st.integers(-8_000, 8_000).filter(bool))
    def adjust_organisation(self, org: int, cents: int) -> None:
        req = pb.AdjustRequest(idempotency_key=self.key(), account=pb.AccountRef(organisation_id=org),
                               amount_cents=cents, description="bank fee")
        resp = self.admin.call("Adjust", req)
        acct = organisation_account(org)
        self.model[acct] = self.bal(acct) + cents
        self.model[-1] = self.bal(-1) - cents
        assert (resp.balance_cents, resp.balance_negative) == (self.bal(acct), self.bal(acct) < 0)
        self.done.append(("Adjust", req, resp))

    @rule(payer=members, which=st.sampled_from(["zero", "negative", "unknown-org", "long-description", "no-key"]))
    def bad_pay(self, payer: int, which: str) -> None:
        req = pb.PayRequest(idempotency_key=self.key(), member_id=payer, organisation_id=ORGS[0], amount_cents=100)
        code = grpc.StatusCode.INVALID_ARGUMENT
        if which == "zero":
            req.amount_cents = 0
        elif which == "negative":
            req.amount_cents = -100
        elif which == "unknown-org":
            req.organisation_id, code = UNKNOWN_ORG, grpc.StatusCode.NOT_FOUND
        elif which == "long-description":
            req.description = "d" * 81
        else:
            req.idempotency_key = ""
        self.refused("Pay", req, code)

    @rule(data=st.data())
    def replay(self, data) -> None:  # noqa: ANN001
        if not self.done:
            return
        method, req, first = data.draw(st.sampled_from(self.done))
        client = self.app if method == "Pay" or (method == "Transfer" and getattr(req, "from").member_id) \
            else self.admin
        before = snapshot(self.db)
        again, call = client.call(method, req, with_call=True)
        assert again == first
        assert dict(call.trailing_metadata()).get("idempotent-replay") == "true"
        assert snapshot(self.db) == before, "a replay books nothing"
        changed = type(req)()
        changed.CopyFrom(req)
        changed.description = "something else"
        self.refused(method, changed, grpc.StatusCode.ALREADY_EXISTS, client)

    @rule(member=members)
    def statement_chain(self, member: int) -> None:
        lines, token = [], ""
        while True:
            page = self.app.get_statement(member_id=member, page_size=4, page_token=token)
            lines.extend(page.lines)
            token = page.next_page_token
            if not token:
                break
        expected = self.bal(member_account(member))
        assert (lines[0].balance_after_cents if lines else 0) == expected
        for newer, older in zip(lines, lines[1:], strict=False):
            assert newer.balance_after_cents - newer.amount_cents == older.balance_after_cents
        if lines:
            assert lines[-1].balance_after_cents == lines[-1].amount_cents, "the first line starts from zero"

    # ---------------------------------------------------------------- invariants
    @invariant()
    def ledger_holds(self) -> None:
        negative = {acct for acct, cents in self.model.items() if cents < 0}  # only Adjust can do this
        check_invariants(self.db, negative_allowed=negative)
        balances = snapshot(self.db).balances
        for acct, cents in self.model.items():
            if acct > 0:
                assert balances.get(acct, 0) == cents, f"account {acct}"
        assert sum(v for a, v in self.model.items() if a > 0) + self.bal(-1) == 0


def test_ledger_state_machine(postgresql_server):
    """On PostgreSQL, through the one write path (Pays and Transfers by group commit)."""
    LedgerMachine.server = postgresql_server
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )
    record_backend("postgresql")
