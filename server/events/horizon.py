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
writers is still listed, and every number up to its L is final. Writers never wait for the reader or
for each other: the cost on the write path is one uncontended shared advisory lock per transaction.
A later candidate's writers include every earlier writer still running, so when a candidate resolves,
all earlier ones have too.

Final is not enough across a crash or a promotion (migration 0006): PostgreSQL WAL-logs a sequence
ahead of what it hands out and makes that log durable only at a commit, so numbers drawn by
transactions that never committed may be drawn again by the recovered or promoted node, and a reader
that had moved past them would skip the events that take them. So:
- the horizon is also capped at the highest *committed* event C the probe sees: C's commit made the
  sequence's log durable (and replicated to a synchronous standby) past C, so no node draws ≤ C again;
  numbers above C with no event are holes the horizon passes only once a later event commits;
- writers seen on an earlier database session are forgotten when a probe says it runs on a new one:
  a crash or a promotion ends every session, and the new node's writers are other transactions;
- a new session whose highest committed event is below the horizon is a database that forgot
  committed events (restored from a backup, or an asynchronous standby promoted): `rewound` tells the
  reader to drop what it holds in memory and start again from that database.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

MAX_CANDIDATES = 64  # bounded even if a writer stays open a long time
PROBE_SQL = "SELECT last_sequence, writers, committed_sequence, new_session FROM outbox_reader_probe()"


@dataclass(frozen=True)
class _Candidate:
    last_sequence: int
    writers: frozenset[str]


class PostgresHorizon:
    def __init__(self) -> None:
        self.horizon: int | None = None  # every event ≤ horizon is final and no node draws ≤ horizon again
        self.rewound = False  # the last probe found a database that forgot events below the horizon
        self._final: int | None = None  # every number ≤ _final is final on the current session's node
        self._candidates: list[_Candidate] = []

    @property
    def pending(self) -> bool:
        """Numbers were drawn beyond what is final: probe again soon."""
        return bool(self._candidates)

    def advance(self, conn: Connection) -> int | None:
        """Probe once; return the (never decreasing) horizon, or None while there is none yet."""
        return self.resolve(*conn.execute(text(PROBE_SQL)).one())

    def resolve(self, last: int, writers: list[str] | None, committed: int, new_session: bool) -> int | None:
        """Take one probe's answer (PROBE_SQL: the last number drawn, the writers in flight, the highest
        committed event, whether the session is new); return the (never decreasing) horizon, or None
        while there is none yet. After `rewound` is set the horizon starts again from None."""
        self.rewound = False
        if new_session:
            self._candidates.clear()
            if self.horizon is not None and committed < self.horizon:
                self.rewound = True
                self.horizon = None
            self._final = self.horizon
        in_flight = frozenset(writers or ())
        floor = self._final if self._final is not None else -1
        newest = self._candidates[-1].last_sequence if self._candidates else floor
        if last > newest:
            self._candidates.append(_Candidate(last, in_flight))
            if len(self._candidates) > MAX_CANDIDATES:
                del self._candidates[-2]  # keep the oldest (closest to resolving) and the newest
        for i in range(len(self._candidates) - 1, -1, -1):
            candidate = self._candidates[i]
            if candidate.writers.isdisjoint(in_flight):
                self._final = max(candidate.last_sequence, floor)
                del self._candidates[: i + 1]
                break
        if self._final is not None:
            safe = min(self._final, committed)
            self.horizon = safe if self.horizon is None else max(self.horizon, safe)
        return self.horizon
