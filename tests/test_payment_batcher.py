"""PaymentBatcher, the group commit of the one-statement Pay, without a database: every payment
gets its own answer, never more statements in flight than allowed, payments that wait share the
next statement, a statement that raises tells each of its payments, and a caller that goes away
leaves the others answered."""

from __future__ import annotations

import asyncio
import threading

import pytest
from structlog.testing import capture_logs

from server.ledger import loop_connection, one_statement
from server.ledger.one_statement import MAX_BATCH, PaymentBatcher


class FakeStatements:
    """Stands in for book_member_payments: answers amount × 10 for each payment, takes a little
    time, and records the batches and how many ran at once."""

    def __init__(self, fail_on: int | None = None, takes_s: float = 0.002):
        self.takes_s = takes_s
        self.batches: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.fail_on = fail_on
        self._lock = threading.Lock()

    async def __call__(self, connection, payments, default_low_limit_cents):  # noqa: ANN001, ANN204
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append(len(payments))
        try:
            await asyncio.sleep(self.takes_s)
            if self.fail_on is not None and any(p.amount_cents == self.fail_on for p in payments):
                raise RuntimeError("the statement failed")
            return [p.amount_cents * 10 for p in payments]
        finally:
            with self._lock:
                self.running -= 1


def _payment(amount_cents: int) -> one_statement.MemberPayment:
    return one_statement.MemberPayment(
        organisation_account_id=1, organisation_id=1, member_account_id=amount_cents, member_id=amount_cents,
        amount_cents=amount_cents, type="ENTRY_TO_EVENT", description="", principal="p", payment_id=f"p{amount_cents}",
        reference=f"r{amount_cents}", event_id=None, session_id=None, event_kind="PAYMENT_SUCCEEDED", route_code="",
        route_payload="", record_principal="p", record_key=f"k{amount_cents}", record_method="Pay",
        record_request_hash="h", response_head=b"", response_tail=b"")


def _pay_concurrently(batcher: PaymentBatcher, callers: int, each: int) -> tuple[dict, dict]:
    """`callers` coroutines on one event loop, each paying `each` times in turn."""
    answers: dict[int, int | None] = {}
    errors: dict[int, BaseException] = {}

    async def caller(c: int) -> None:
        for i in range(each):
            amount = c * each + i + 1
            try:
                answers[amount] = await batcher.book(_payment(amount))
            except RuntimeError as exc:
                errors[amount] = exc

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(caller(c) for c in range(callers))), 30)

    asyncio.run(main())
    return answers, errors


@pytest.mark.parametrize("in_flight", [1, 3])
def test_every_payment_gets_its_own_answer_and_waiting_payments_share_statements(monkeypatch, in_flight):  # noqa: ANN001
    fake = FakeStatements()
    monkeypatch.setattr(one_statement, "book_member_payments", fake)
    batcher = PaymentBatcher(db=None, default_low_limit_cents=2_000, max_in_flight=in_flight)  # type: ignore[arg-type]
    try:
        answers, errors = _pay_concurrently(batcher, callers=48, each=20)
        assert not errors
        assert answers == {amount: amount * 10 for amount in range(1, 48 * 20 + 1)}
        assert sum(fake.batches) == 48 * 20, "each payment went in exactly one statement"
        assert fake.most_at_once <= in_flight
        assert max(fake.batches) > 1 and max(fake.batches) <= MAX_BATCH
        # idle again: the next payment goes at once, alone
        assert asyncio.run(batcher.book(_payment(100_000))) == 1_000_000 and fake.batches[-1] == 1
    finally:
        batcher.close()


def test_a_statement_that_raises_tells_each_of_its_payments(monkeypatch):  # noqa: ANN001
    fake = FakeStatements(fail_on=7)
    monkeypatch.setattr(one_statement, "book_member_payments", fake)
    batcher = PaymentBatcher(db=None, default_low_limit_cents=2_000)  # type: ignore[arg-type]
    try:
        answers, errors = _pay_concurrently(batcher, callers=16, each=10)
        assert 7 in errors
        assert len(answers) + len(errors) == 160
        assert all(answer == amount * 10 for amount, answer in answers.items())
        assert asyncio.run(batcher.book(_payment(5))) == 50, "the batcher goes on after a failed statement"
    finally:
        batcher.close()


def test_a_caller_that_went_away_does_not_stop_the_others(monkeypatch):  # noqa: ANN001
    fake = FakeStatements()
    monkeypatch.setattr(one_statement, "book_member_payments", fake)
    batcher = PaymentBatcher(db=None, default_low_limit_cents=2_000)  # type: ignore[arg-type]

    async def main() -> list:
        first = asyncio.ensure_future(batcher.book(_payment(1)))
        gone = asyncio.ensure_future(batcher.book(_payment(2)))  # waits for the first statement
        rest = [asyncio.ensure_future(batcher.book(_payment(n))) for n in range(3, 10)]
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(first, *rest)

    try:
        assert asyncio.run(main()) == [10] + [n * 10 for n in range(3, 10)]
        assert sum(fake.batches) == 9, "the payment whose caller went away was still booked once (a retry replays it)"
    finally:
        batcher.close()


def test_a_slow_statement_is_logged_with_its_size_and_duration(monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(loop_connection, "SLOW_STATEMENT_MS", 30.0)
    batcher = PaymentBatcher(db=None, default_low_limit_cents=2_000)  # type: ignore[arg-type]
    try:
        monkeypatch.setattr(one_statement, "book_member_payments", FakeStatements(takes_s=0.001))
        with capture_logs() as quick:
            assert asyncio.run(batcher.book(_payment(3))) == 30
        assert [e for e in quick if e["event"] == "slow statement"] == []

        monkeypatch.setattr(one_statement, "book_member_payments", FakeStatements(takes_s=0.06))
        with capture_logs() as slow:
            answers, errors = _pay_concurrently(batcher, callers=4, each=1)
        assert not errors and answers == {n: n * 10 for n in range(1, 5)}
        warnings = [e for e in slow if e["event"] == "slow statement"]
        assert warnings and all(e["log_level"] == "warning" for e in warnings)
        assert {e["statement"] for e in warnings} == {"PaymentBatcher"}
        assert sum(e["items"] for e in warnings) == 4, "every statement of the four payments was slow, and logged once"
        assert all(e["duration_ms"] >= 60 for e in warnings)
    finally:
        batcher.close()
