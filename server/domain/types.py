"""Posting types, account kinds and system accounts, as shown to people."""

from __future__ import annotations

import enum


class PostingType(enum.StrEnum):
    ENTRY_TO_EVENT = "ENTRY_TO_EVENT"
    CLUB_PAYMENT = "CLUB_PAYMENT"
    CLUB_MEMBERSHIP = "CLUB_MEMBERSHIP"
    MEMBER_TRANSFER = "MEMBER_TRANSFER"
    ORG_TRANSFER = "ORG_TRANSFER"
    MANUAL_TOP_UP = "MANUAL_TOP_UP"
    AUTO_TOP_UP = "AUTO_TOP_UP"
    CC_PAYMENT = "CC_PAYMENT"
    SETTLEMENT = "SETTLEMENT"
    MANUAL_ADJUSTMENT = "MANUAL_ADJUSTMENT"
    REFUND = "REFUND"
    CARD_REFUND = "CARD_REFUND"
    MISCELLANEOUS = "MISCELLANEOUS"

    @property
    def display_name(self) -> str:
        return DISPLAY_NAMES[self]

    @property
    def caller_may_book(self) -> bool:
        """Whether a caller may book a line of this type (Pay). Settlements and adjustments are an
        administrator's, top-ups, card payments and card refunds Stripe's: only the system books them."""
        return self not in SYSTEM_BOOKED


SYSTEM_BOOKED = frozenset({
    PostingType.SETTLEMENT, PostingType.MANUAL_ADJUSTMENT, PostingType.AUTO_TOP_UP, PostingType.MANUAL_TOP_UP,
    PostingType.CARD_REFUND, PostingType.CC_PAYMENT,
})


DISPLAY_NAMES = {
    PostingType.ENTRY_TO_EVENT: "Entry to an event",
    PostingType.CLUB_PAYMENT: "Club Payment",
    PostingType.CLUB_MEMBERSHIP: "Club Membership",
    PostingType.MEMBER_TRANSFER: "Member Transfer",
    PostingType.ORG_TRANSFER: "Org Transfer",
    PostingType.MANUAL_TOP_UP: "Manual Top Up",
    PostingType.AUTO_TOP_UP: "Auto Top Up",
    PostingType.CC_PAYMENT: "CC Payment",
    PostingType.SETTLEMENT: "Settlement",
    PostingType.MANUAL_ADJUSTMENT: "Manual Adjustment",
    PostingType.REFUND: "Refund",
    PostingType.CARD_REFUND: "Card Refund",
    PostingType.MISCELLANEOUS: "Miscellaneous",
}


class AccountKind(enum.IntEnum):
    MEMBER = 1
    ORGANISATION = 2
    SYSTEM = 3


class SystemAccount(enum.IntEnum):
    """System accounts; the value is their ext_id."""

    STRIPE = 1
    FEDERATION = 2
    BANK = 3
    ADJUSTMENTS = 4

    @property
    def code(self) -> str:
        return self.name.lower()


def account_id(kind: AccountKind, ext_id: int) -> int:
    """Accounts have a deterministic id so no lookup is needed on the hot path."""
    if ext_id <= 0:
        raise ValueError("account ext ids are positive")
    return ext_id * 4 + int(kind)


def member_account(member_id: int) -> int:
    return account_id(AccountKind.MEMBER, member_id)


def organisation_account(organisation_id: int) -> int:
    return account_id(AccountKind.ORGANISATION, organisation_id)


def system_account(which: SystemAccount) -> int:
    return account_id(AccountKind.SYSTEM, int(which))


def split_account_id(acct_id: int) -> tuple[AccountKind, int]:
    return AccountKind(acct_id % 4), acct_id // 4


def lock_rank(acct_id: int) -> tuple[int, int]:
    """The one order in which accounts are locked: members, then organisations, then system
    accounts, each by id. Every transaction that touches several accounts follows it, so two
    transactions can never wait on each other (no deadlock). The kind as a plain int: a write of
    10,000 transactions ranks 80,000 ids, and making an AccountKind of each was a quarter of a second."""
    return acct_id % 4, acct_id // 4


class EventKind(enum.StrEnum):
    PAYMENT_SUCCEEDED = "PAYMENT_SUCCEEDED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    TOP_UP_SUCCEEDED = "TOP_UP_SUCCEEDED"
    AUTO_TOP_UP_FAILED = "AUTO_TOP_UP_FAILED"
    LOW_BALANCE = "LOW_BALANCE"
    TRANSFER_RECEIVED = "TRANSFER_RECEIVED"
    REFUNDED = "REFUNDED"
    SETTLEMENT_MADE = "SETTLEMENT_MADE"
    ADJUSTED = "ADJUSTED"


class AutoTopUpStatus(enum.IntEnum):
    OFF = 1
    PENDING = 2
    ON = 3
    FAILED = 4
