"""The safe horizon: the highest sequence number up to which every event is final.

On PostgreSQL a sequence number is drawn when the row is inserted, but transactions commit in any
order: a reader that already sees 105 committed may see 104 commit a moment later, and a cursor that
moved past 104 would skip it forever. Numbers of transactions that roll back never appear at all, so a
reader can't just wait for holes to fill either.

What we use (migration 0002):
- `outbox_next_sequence()` takes a shared transaction-level advisory lock *before* it draws a number,
  so a transaction that drew a number is listed in pg_locks under that key until it has ended
  (committed and visible, or rolled back). Locks are released only after the commit is visible.
- `outbox_writers_probe()` reads the last number drawn, L, and *then* the in-flight writers, W.
  Every number ≤ L was drawn before the probe looked at pg_locks, by a transaction that by then
  either had ended or is in W. So once every transaction in W has ended, every event ≤ L is final:
  committed and visible to any later snapshot, or never to exist.

The reader probes on each wake-up and keeps (L, W) candidates; a candidate resolves when none of its
writers is still listed, and the horizon becomes its L. Writers never wait for the reader or for each
other: the cost on the write path is one uncontended shared advisory lock per transaction.
A later candidate's writers include every earlier writer still running, so when a candidate resolves,
all earlier ones have too.

SQLite serialises writers (BEGIN IMMEDIATE), so commit order is sequence order: the highest visible
sequence is always a safe horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

MAX_CANDIDATES = 64  # bounded even if a writer stays open a long time
PROBE_SQL = "SELECT last_sequence, writers FROM outbox_writers_probe()"


@dataclass(frozen=True)
class _Candidate:
    last_sequence: int
    writers: frozenset[str]


class PostgresHorizon:
    def __init__(self) -> None:
        self.horizon: int | None = None
        self._candidates: list[_Candidate] = []

    @property
    def pending(self) -> bool:
        """Numbers were drawn beyond the horizon: probe again soon."""
        return bool(self._candidates)

    def advance(self, conn: Connection) -> int | None:
        """Probe once; return the (never decreasing) horizon, or None while there is none yet."""
        last, writers = conn.execute(text(PROBE_SQL)).one()
        return self.resolve(last, writers)

    def resolve(self, last: int, writers: list[str] | None) -> int | None:
        """Take one probe's answer (PROBE_SQL: the last number drawn, then the writers in flight);
        return the (never decreasing) horizon, or None while there is none yet."""
        in_flight = frozenset(writers or ())
        floor = self.horizon if self.horizon is not None else -1
        newest = self._candidates[-1].last_sequence if self._candidates else floor
        if last > newest:
            self._candidates.append(_Candidate(last, in_flight))
            if len(self._candidates) > MAX_CANDIDATES:
                del self._candidates[-2]  # keep the oldest (closest to resolving) and the newest
        for i in range(len(self._candidates) - 1, -1, -1):
            candidate = self._candidates[i]
            if candidate.writers.isdisjoint(in_flight):
                self.horizon = max(candidate.last_sequence, floor)
                del self._candidates[: i + 1]
                break
        return self.horizon
