"""GetBalance on PostgreSQL: the balances asked for at once are read in one statement, sent and read
on the server's event loop (`StatementBatcher`), instead of one query each through a database thread.

The statement answers what `accounts.get_balance` answers, row for row: the account (absent when it
was never used), and a member's auto top-up setting, which exists whether or not the account does.
"""

from __future__ import annotations

from server.domain.errors import NotFound
from server.domain.types import AccountKind, AutoTopUpStatus, split_account_id
from server.ledger.db import Database, PreparedSql, as_utc
from server.ledger.loop_connection import LoopConnection, StatementBatcher
from server.services.accounts import Balance

MAX_BATCH = 256  # balances in one statement

_SQL = PreparedSql(
    "SELECT r.n, a.id IS NOT NULL, a.name, a.balance_cents, a.last_movement_at, c.auto_top_up_status, "
    "c.auto_top_up_amount_cents "
    "FROM unnest(CAST(%(account_id)s AS bigint[]), CAST(%(card_member_id)s AS bigint[])) WITH ORDINALITY "
    "AS r(account_id, card_member_id, n) "
    "LEFT JOIN accounts AS a ON a.id = r.account_id "
    "LEFT JOIN member_cards AS c ON c.member_id = r.card_member_id"
)


def _card_member_id(account_id: int) -> int:
    kind, ext = split_account_id(account_id)
    return ext if kind == AccountKind.MEMBER else -1  # no card row has a negative member id


async def read_balances(connection: LoopConnection, account_ids: list[int]) -> list[Balance | NotFound]:
    """Each account's balance, or NotFound for an organisation that is not registered."""
    rows = await connection.fetch(_SQL, {"account_id": account_ids,
                                         "card_member_id": [_card_member_id(a) for a in account_ids]})
    answers: list[Balance | NotFound | None] = [None] * len(account_ids)
    for n, exists, name, balance_cents, last_movement_at, status, auto_amount in rows:
        account_id = account_ids[n - 1]
        top_up = AutoTopUpStatus(status) if status is not None else AutoTopUpStatus.OFF
        if exists:
            answers[n - 1] = Balance(account_id, name, balance_cents, as_utc(last_movement_at), top_up, auto_amount or 0)
            continue
        kind, ext = split_account_id(account_id)
        if kind == AccountKind.ORGANISATION:
            answers[n - 1] = NotFound(f"organisation {ext} is not registered")
        else:  # a member before first use, or a system account not yet moved
            answers[n - 1] = Balance(account_id, "", 0, None, top_up, auto_amount or 0)
    assert all(a is not None for a in answers), "every account asked for has its row"
    return answers  # type: ignore[return-value]


class BalanceReader(StatementBatcher[int, "Balance | NotFound"]):
    """One per process: the GetBalance calls that arrive while a read is in flight share the next."""

    def __init__(self, db: Database):
        super().__init__(db, MAX_BATCH)

    async def _run(self, connection: LoopConnection, items: list[int]) -> list[Balance | NotFound]:
        return await read_balances(connection, items)

    async def balance(self, account_id: int) -> Balance:
        """The balance of `account_id`; raises NotFound for an organisation that is not registered."""
        answer = await self.submit(account_id)
        if isinstance(answer, NotFound):
            raise NotFound(answer.message)  # a fresh exception per caller: one raised object is not shared
        return answer
