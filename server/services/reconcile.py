"""The reconciler (SPEC §4 Refund, §5): every card operation left pending is settled with Stripe as
soon as Stripe answers, with no retry by the caller needed.

Pending here means: a refund whose Stripe outcome is unknown (its money held), and a card payment
(manual top-up, the card part of a Pay, an auto top-up) whose webhook never came, or whose create
never answered. Each is asked about by its Stripe key (in the object's metadata) or its Stripe id:
- a refund Stripe made is completed (REFUNDED); one Stripe has no record of is made now, with its
  key (the member asked for it and its money is held); one Stripe refused or that failed releases
  its hold;
- a PaymentIntent that succeeded is credited (and its Pay booked), one that failed is recorded as
  failed, as its webhook would have; a create that never reached Stripe is voided (nothing was
  tried, so no failure event); a PaymentIntent nobody paid within the time allowed is cancelled at
  Stripe, then recorded as failed.
Only operations older than `min_age_s` are looked at: younger ones belong to the request still
running them. Every change goes through the same functions as the webhook and the request flows
(conditional claims), so a reconciler that races them, or another server's, changes nothing twice.

`Reconciler.round()` is blocking (database and Stripe, never inside a transaction); the server runs
it in its worker pool every few seconds (server.api.cards_api). An item that is still waiting is
asked about again later and later (`ItemBackoff`); a round stops at the first sign that Stripe is
unreachable, and the server waits longer before the next.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Connection

from server.domain.errors import DomainError, NotFound, Unavailable
from server.ledger.db import Database, utcnow
from server.services import auto_top_up, cards, refund
from server.stripe_gateway import Intent, StripeGateway

log = logging.getLogger("payments.reconcile")

CREATED_SLACK_S = 300  # Stripe's clock and ours: search for a PaymentIntent from this long before our row
RECONCILER_PRINCIPAL = "reconciler"


class Outcome(enum.Enum):
    COMPLETED = "completed"  # the money moved as asked (credited, or refunded to the card)
    RELEASED = "released"  # it did not happen: a hold given back, a card payment closed as failed
    WAITING = "waiting"  # Stripe has not decided yet (or it needs a person): asked again later


@dataclass(frozen=True)
class Limits:
    min_age_s: float = 60.0  # longer than a request's Stripe calls take, retries included
    unpaid_ttl_s: float = 24 * 3600.0  # a PaymentIntent nobody paid for this long is cancelled
    batch: int = 200  # items of each kind looked at per round
    first_delay_s: float = 5.0  # a waiting item is asked about again after this, doubling…
    max_delay_s: float = 900.0  # …up to this


@dataclass
class RoundResult:
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # item key → what happened

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o is outcome)


class ItemBackoff:
    """When to ask about each waiting item again: sooner for new ones, later and later after."""

    def __init__(self, first_s: float, max_s: float):
        self.first_s, self.max_s = first_s, max_s
        self._due: dict[str, tuple[float, float]] = {}  # key → (due on the monotonic clock, delay)

    def due(self, key: str, now: float) -> bool:
        entry = self._due.get(key)
        return entry is None or entry[0] <= now

    def waiting(self, key: str, now: float) -> None:
        delay = min(self._due[key][1] * 2, self.max_s) if key in self._due else self.first_s
        self._due[key] = (now + delay, delay)

    def done(self, key: str) -> None:
        self._due.pop(key, None)

    def keep_only(self, keys: set[str]) -> None:
        for key in set(self._due) - keys:
            del self._due[key]


class Reconciler:
    def __init__(self, db: Database, gateway: StripeGateway, limits: Limits | None = None):
        self.db = db
        self.gateway = gateway
        self.limits = limits or Limits()
        self.backoff = ItemBackoff(self.limits.first_delay_s, self.limits.max_delay_s)
        self.stopping = threading.Event()  # set at shutdown: a round ends after its current item

    def round(self) -> RoundResult:
        """Look at every pending operation that is due. Raises Unavailable when Stripe is unreachable
        (what was settled before stays settled)."""
        result = RoundResult()
        before = utcnow() - timedelta(seconds=self.limits.min_age_s)
        holds = self.db.read(lambda conn: refund.pending_holds(conn, before, self.limits.batch))
        payments = self.db.read(lambda conn: cards.pending_before(conn, before, self.limits.batch))
        work = [(f"refund:{h.row_id}", lambda h=h: self.settle_refund(h)) for h in holds]
        work += [(f"card:{p.payment_intent_id}", lambda p=p: self.settle_card_payment(p)) for p in payments]
        self.backoff.keep_only({key for key, _ in work})
        for key, settle in work:
            if self.stopping.is_set():
                break
            now = time.monotonic()
            if not self.backoff.due(key, now):
                continue
            try:
                outcome = settle()
            except Unavailable:
                self.backoff.waiting(key, now)
                raise
            except DomainError as exc:  # Stripe refused a question about it: a person should look
                log.error("reconciling %s: %s; asked again later", key, exc.message)
                outcome = Outcome.WAITING
            result.outcomes[key] = outcome
            if outcome is Outcome.WAITING:
                self.backoff.waiting(key, now)
            else:
                self.backoff.done(key)
                log.info("reconciled %s: %s", key, outcome.value)
        return result

    # ---------------------------------------------------------------- refunds
    def settle_refund(self, hold: refund.Hold) -> Outcome:
        found = (self.gateway.find_refund(hold.payment_intent_id, hold.stripe_key)
                 if hold.card_amount_cents > 0 and hold.stripe_key else None)
        if found is not None and not found.made:
            self.db.run(lambda conn: refund.release(conn, hold, RECONCILER_PRINCIPAL,
                                                    f"Card refund {found.status} at Stripe: returned"))
            return Outcome.RELEASED
        if found is not None:
            stripe_refund_id = found.id
        else:  # Stripe never got the request: make the refund the member asked for (its money is held)
            try:
                stripe_refund_id = refund.make_at_stripe(self.gateway, hold)
            except Unavailable:
                raise
            except DomainError as refused:
                log.warning("refund %s: Stripe refused it (%s); its hold is released", hold.row_id, refused.message)
                self.db.run(lambda conn: refund.release(conn, hold, RECONCILER_PRINCIPAL,
                                                        "Card refund refused by Stripe: returned"))
                return Outcome.RELEASED
        self.db.run(lambda conn: refund.complete(conn, hold, stripe_refund_id))
        return Outcome.COMPLETED

    # ---------------------------------------------------------------- card payments
    def settle_card_payment(self, card: cards.CardPayment) -> Outcome:
        intent = self._stripes_intent(card)
        if intent is None:
            self.db.run(lambda conn: cards.void(conn, card, "the request never reached Stripe"))
            return Outcome.RELEASED
        if not (intent.succeeded or intent.failed) and self._unpaid_too_long(card):
            log.info("card payment %s: not paid within %s s; cancelled at Stripe", intent.id,
                     int(self.limits.unpaid_ttl_s))
            intent = self.gateway.cancel_payment_intent(intent.id)
        currency = self.gateway.currency

        def apply(conn: Connection) -> Outcome:
            row = cards.find_for_intent(conn, intent, currency, adopt_twin=False)
            if row is None:  # not what we asked for (logged at error level): a person must look
                return Outcome.WAITING
            if intent.succeeded:
                cards.apply_success(conn, row, intent, currency)
                return Outcome.COMPLETED
            if intent.failed:
                reason = intent.failure_reason or ("not paid in time: cancelled" if intent.status == "canceled"
                                                   else "the card payment failed")
                cards.mark_failed(conn, row, reason)
                return Outcome.RELEASED
            return Outcome.WAITING

        return self.db.run(apply)

    def _stripes_intent(self, card: cards.CardPayment) -> Intent | None:
        """Stripe's PaymentIntent for a pending card payment: by its id, or (a create whose answer
        never came) by the key in its metadata. None: Stripe has none."""
        if not card.is_placeholder:
            try:
                return self.gateway.retrieve_payment_intent(card.payment_intent_id)
            except NotFound:
                return None
        ref = card.payment_intent_id[len(cards.placeholder_id("")):]
        customer_id = ""
        if card.purpose == cards.AUTO_TOP_UP:  # always charged to the member's customer
            saved = self.db.read(lambda conn: auto_top_up.card_of(conn, card.member_id))
            customer_id = saved.customer_id if saved is not None else ""
        since = int(card.created_at.timestamp()) - CREATED_SLACK_S if card.created_at else 0
        return self.gateway.find_payment_intent(ref, customer_id, max(since, 0))

    def _unpaid_too_long(self, card: cards.CardPayment) -> bool:
        return card.created_at is not None and (utcnow() - card.created_at).total_seconds() > self.limits.unpaid_ttl_s
