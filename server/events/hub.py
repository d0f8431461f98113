"""The subscription hub: one reader per server process fans events out to every Subscribe stream.

    outbox_events ──(one reader thread, only up to the safe horizon)──▶ ring of recent events
                                                                   └──▶ bounded queue per live subscriber

- The reader runs only while someone is subscribed. It wakes on a local commit (Database.run's
  after-commit hook), on a NOTIFY from another process, or every POLL_INTERVAL_S as a fallback.
  On PostgreSQL it probes and reads on the event loop, on a connection of its own (LoopConnection):
  no hand-off to a thread and back between a commit and its delivery.
- It reads each event once, up to the safe horizon (server/events/horizon.py), and hands it to every
  live subscriber whose filter matches. It never waits for a subscriber: a subscriber whose queue is
  full is dropped from the fan-out and its stream ends with RESOURCE_EXHAUSTED, telling it where to
  resume.
- A new stream first catches up from its cursor, from the ring when it reaches back that far, else
  from the database page by page (filters applied in SQL), up to what the reader has published; then it
  joins the fan-out at exactly that sequence. Both steps run on the event loop without awaiting in
  between, so no event is missed or sent twice.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from sqlalchemy import Connection

from server import metrics
from server.domain.errors import DomainError, OutOfRange, Unavailable
from server.events import store
from server.events.horizon import PROBE_SQL, PostgresHorizon
from server.events.notifier import PgWakeups
from server.events.store import EventFilter, StoredEvent
from server.ledger.db import Database, PreparedSql
from server.ledger.loop_connection import LoopConnection

T = TypeVar("T")
log = structlog.get_logger("payments.events")

_PROBE = PreparedSql(PROBE_SQL)
_READ_RANGE = PreparedSql(store.READ_RANGE_SQL)


class FellBehind(DomainError):
    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class HubLimits:
    queue_events: int = 2_000        # undelivered events a live subscriber may have before it is cut off
    ring_events: int = 10_000        # recent events kept in memory for streams catching up
    read_batch: int = 1_000          # events per reader query
    replay_page: int = 500           # events per catch-up query of one stream
    max_subscribers: int = 2_000     # open streams per server process
    poll_interval_s: float = 1.0     # fallback when no wake-up comes
    step_interval_s: float = 0.02    # between probes while writers are in flight (bounds the reader to 50/s)
    prune_interval_s: float = 3_600.0
    prune_first_after_s: float = 30.0

    @classmethod
    def from_extra(cls, extra: dict) -> HubLimits:
        names = cls.__dataclass_fields__
        return cls(**{k[len("event_"):]: v for k, v in extra.items() if k.startswith("event_") and k[6:] in names})


class _Subscription:
    __slots__ = ("filter", "after", "queue", "signal", "fell_behind", "ended")

    def __init__(self, flt: EventFilter):
        self.filter = flt
        self.after = 0  # the stream's cursor when it went live (may be ahead of this process's reader)
        self.queue: collections.deque[StoredEvent] = collections.deque()
        self.signal = asyncio.Event()
        self.fell_behind = False
        self.ended = False  # the reader started again (EventHub._start_again)


class EventHub:
    def __init__(self, db: Database, read: Callable, retention_days: int, limits: HubLimits | None = None):
        """`read(fn)` runs fn(conn) in the server's database pool (for streams catching up)."""
        self.db = db
        self._read = read
        self.retention_days = retention_days
        self.limits = limits or HubLimits()
        self._horizon = PostgresHorizon()
        self.published: int | None = None  # every event ≤ published has been handed to the live subscribers
        self._ring: collections.deque[StoredEvent] = collections.deque()
        self._ring_floor = 0  # the ring holds every event in (ring_floor, published]
        self._live: set[_Subscription] = set()
        self.open_streams = 0
        self._jump = True  # no live subscriber: the next horizon may be taken without reading up to it
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-reader")
        self._on_loop = LoopConnection(db)  # the reader's probes and reads
        self._wakeups: PgWakeups | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()  # bound to the running loop at first use
        self._wake_pending = False
        self._ready = asyncio.Event()  # set once the reader has a horizon
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._generation = 0  # moves on when the reader starts again from a database that forgot events

    @property
    def live_streams(self) -> int:
        """Streams that caught up and receive events as they are published."""
        return len(self._live)

    # ---- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.db.after_events_committed.append(self._on_local_commit)
        self._wakeups = PgWakeups(self.db.engine, self._wake_threadsafe)
        self._wakeups.start()
        self._tasks = [asyncio.create_task(self._run(), name="events-reader"),
                       asyncio.create_task(self._prune_forever(), name="events-prune")]

    async def stop(self) -> None:
        self._stopping = True
        try:
            self.db.after_events_committed.remove(self._on_local_commit)
        except ValueError:
            pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in list(self._live):  # end open streams now rather than at the grace deadline
            sub.fell_behind = True
            sub.signal.set()
        self._ready.set()  # streams still waiting for the first horizon end too
        if self._wakeups is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._wakeups.stop)
        self._on_loop.close()
        self._reader.shutdown(wait=False, cancel_futures=True)

    # ---- wake-ups (called from database threads)
    def _on_local_commit(self) -> None:
        if self._wakeups is not None:
            self._wakeups.local_commit()
        self._wake_threadsafe()

    def _wake_threadsafe(self) -> None:
        if self._wake_pending or self.open_streams == 0 or self._loop is None:
            return
        self._wake_pending = True
        if threading.get_ident() == self._loop_thread:  # a commit on the loop itself (the one-statement paths)
            self._wake.set()
            return
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    # ---- the reader
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                async with asyncio.timeout(self.limits.poll_interval_s):  # (no task of its own, as wait_for makes)
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake_pending = False  # before clear(): a commit that saw True is seen by the step below
            self._wake.clear()
            if self.open_streams == 0:
                continue
            try:
                while await self._step(loop) and not self._stopping:
                    await asyncio.sleep(self.limits.step_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database trouble: try again at the next poll
                log.warning("event reader step failed", error=type(exc).__name__, detail=str(exc)[:200])

    @staticmethod
    def _without_reading(horizon: int | None, after: int | None,
                         jump: bool) -> tuple[int | None, list[StoredEvent], int | None] | None:
        """A step's answer when, after the probe, no event is to be read; else None."""
        if horizon is None:
            return None, [], after
        if jump or after is None:
            return horizon, [], horizon
        if horizon <= after:
            return horizon, [], after
        return None

    def _through(self, horizon: int, events: list[StoredEvent]) -> int:
        return horizon if len(events) < self.limits.read_batch else events[-1].sequence

    async def _read_step_on_loop(self, connection: LoopConnection, after: int | None,
                                 jump: bool) -> tuple[int | None, list[StoredEvent], int | None]:
        """One step on the event loop: (horizon, events read, published through). Two statements in
        autocommit, so the events are read in a snapshot taken after the probe."""
        ((last, writers, committed, new_session),) = await connection.fetch(_PROBE, {})
        horizon = self._horizon.resolve(last, writers, committed, new_session)
        answer = self._without_reading(horizon, after, jump)
        if answer is not None:
            return answer
        rows = await connection.fetch(_READ_RANGE, {"after": after, "through": horizon,
                                                    "limit": self.limits.read_batch})
        events = [store.event_from_row(row) for row in rows]
        return horizon, events, self._through(horizon, events)  # type: ignore[arg-type]

    async def _step(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Probe and publish once; True when there may be more to read soon."""
        after = self.published
        jump = self._jump and not self._live
        horizon, events, through = await self._read_step_on_loop(self._on_loop, after, jump)
        if self._horizon.rewound:
            self._start_again()
            return True
        if horizon is None:
            return True
        if jump or after is None:
            if self._live:  # a stream went live meanwhile: read up to the horizon normally next time
                self._jump = False
                return True
            self.published = through
            self._ring.clear()
            self._ring_floor = through
            self._jump = False
            self._ready.set()
            return self._horizon.pending
        self._publish(events, through)
        return self._horizon.pending or through < horizon

    def _start_again(self) -> None:
        """The database no longer has events this process published (it was restored from a backup,
        or a standby that had not received them was promoted): end every stream, which resumes from
        its own cursor, and read afresh from the database as it is."""
        log.warning("the database's newest event is below what the event stream published; "
                    "ending every stream and starting again", published=self.published)
        self._generation += 1
        for sub in list(self._live):
            sub.ended = True
            sub.signal.set()
        self._live.clear()
        self.published = None
        self._ring.clear()
        self._ring_floor = 0
        self._jump = True
        self._ready.clear()

    def _publish(self, events: list[StoredEvent], through: int) -> None:
        if events:
            newest = events[-1].created_at
            if newest is not None:  # the lag: from the newest event's write to its hand-over
                stamp = newest if newest.tzinfo else newest.replace(tzinfo=UTC)
                metrics.EVENT_LAG.observe(max((datetime.now(UTC) - stamp).total_seconds(), 0.0))
            self._ring.extend(events)
            while len(self._ring) > self.limits.ring_events:
                self._ring_floor = self._ring.popleft().sequence
            limit = self.limits.queue_events
            for sub in list(self._live):
                queue, matches, added = sub.queue, sub.filter.matches, False
                after = sub.after
                for ev in events:
                    if ev.sequence > after and matches(ev):
                        if len(queue) >= limit:
                            sub.fell_behind = True
                            self._live.discard(sub)
                            added = True
                            break
                        queue.append(ev)
                        added = True
                if added:
                    sub.signal.set()
        self.published = through
        metrics.EVENT_PUBLISHED.set(through)

    # ---- one Subscribe stream
    async def stream(self, flt: EventFilter, after_sequence: int) -> AsyncIterator[StoredEvent]:
        """Events matching `flt` after `after_sequence` (negative: only new ones), in order, then live."""
        if self.open_streams >= self.limits.max_subscribers:
            raise Unavailable(f"this server has {self.open_streams} open event streams, its limit; retry later "
                              "or on another server")
        sub = _Subscription(flt)
        if self.open_streams == 0:  # the reader was idle: wait for a fresh horizon
            self._ready.clear()
            self._jump = True
        self.open_streams += 1
        metrics.EVENT_SUBSCRIBERS.inc()
        self._wake.set()
        last_sent = max(after_sequence, 0)
        try:
            await self._ready.wait()
            if self._stopping or self.published is None:
                raise Unavailable("the server is shutting down; subscribe again")
            generation = self._generation
            cursor = self.published if after_sequence < 0 else after_sequence
            last_sent = cursor
            while not self._stopping:
                if generation != self._generation or self.published is None:
                    sub.ended = True
                    break
                published = self.published
                if cursor >= published:
                    sub.after = cursor
                    self._live.add(sub)  # no await since reading `published`: nothing falls in between
                    break
                if cursor >= self._ring_floor:
                    batch = [ev for ev in self._ring if cursor < ev.sequence <= published and flt.matches(ev)]
                    for ev in batch:
                        last_sent = ev.sequence
                        yield ev
                    cursor = published
                    continue
                page, pruned = await self._read(
                    lambda conn, c=cursor, p=published: self._page(conn, c, p, flt))
                if 0 < cursor < pruned:
                    raise OutOfRange(f"events after sequence {cursor} were pruned (kept: after {pruned}); "
                                     f"subscribe again with after_sequence >= {pruned}")
                for ev in page:
                    last_sent = ev.sequence
                    yield ev
                cursor = published if len(page) < self.limits.replay_page else page[-1].sequence
            while not self._stopping and not sub.ended:
                if sub.fell_behind:
                    break
                if not sub.queue:
                    sub.signal.clear()
                    await sub.signal.wait()
                    continue
                ev = sub.queue.popleft()
                last_sent = ev.sequence
                yield ev
            if self._stopping:
                raise Unavailable(f"the server is shutting down; subscribe again with after_sequence={last_sent}")
            if sub.ended:
                raise Unavailable("the database lost events this stream had published (restored from a backup?); "
                                  f"subscribe again with after_sequence={last_sent}")
            raise FellBehind(
                f"this subscriber fell more than {self.limits.queue_events} events behind the stream; subscribe "
                f"again with after_sequence set to the last sequence received (the server last sent {last_sent})")
        finally:
            self._live.discard(sub)
            self.open_streams -= 1
            metrics.EVENT_SUBSCRIBERS.dec()
            if self.open_streams == 0:
                self._jump = True

    def _page(self, conn: Connection, after: int, through: int,
              flt: EventFilter) -> tuple[list[StoredEvent], int]:
        return store.read_range(conn, after, through, flt, self.limits.replay_page), store.pruned_through(conn)

    # ---- retention
    async def prune_now(self) -> int:
        """Delete events older than the retention; returns how many went."""
        total = 0
        while True:
            deleted = await self._read_write(lambda conn: store.prune(conn, self.retention_days))
            total += deleted
            if deleted < store.PRUNE_BATCH_ROWS:
                return total

    async def _read_write(self, fn: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, lambda: self.db.run(fn))

    async def _prune_forever(self) -> None:
        delay = self.limits.prune_first_after_s
        while not self._stopping:
            await asyncio.sleep(delay)
            delay = self.limits.prune_interval_s
            try:
                deleted = await self.prune_now()
                if deleted:
                    log.info("pruned old events", deleted=deleted, retention_days=self.retention_days)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next time
                log.warning("event pruning failed", error=type(exc).__name__)
