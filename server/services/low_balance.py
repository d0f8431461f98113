"""The low-balance rule (SPEC §5) after a Pay or Transfer."""

from __future__ import annotations

from sqlalchemy import Connection, select

from server.domain.types import AutoTopUpStatus, EventKind
from server.events.outbox import NewEvent
from server.ledger.db import unit_state
from server.ledger.schema import member_cards
from server.services.fees import MAX_LOW_BALANCE_LIMIT_CENTS, current_fee_settings


def low_balance_check(conn: Connection, member_id: int, balance_cents: int, events: list[NewEvent]) -> bool:
    """Below the low limit: with auto top-up ON return True (the caller tops up after commit,
    since Stripe is never called inside a transaction); otherwise add a LOW_BALANCE event."""
    if balance_cents >= MAX_LOW_BALANCE_LIMIT_CENTS:  # above any limit that can be set: no query
        return False
    state = unit_state(conn)  # one read of the settings per unit of work, however many bookings it holds
    if "low_limit_cents" not in state:
        state["low_limit_cents"] = current_fee_settings(conn).low_balance_limit_cents
    low_limit_cents = state["low_limit_cents"]
    if balance_cents >= low_limit_cents:
        return False
    status = conn.execute(
        select(member_cards.c.auto_top_up_status).where(member_cards.c.member_id == member_id)
    ).scalar()
    if status == AutoTopUpStatus.ON:
        return True
    events.append(
        NewEvent(EventKind.LOW_BALANCE, member_id=member_id, balance_cents=balance_cents,
                 reason=f"balance below the low limit of {low_limit_cents} cents")
    )
    return False
