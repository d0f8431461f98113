"""The safe horizon on PostgreSQL (server/events/horizon.py), against a model of writers that draw
sequence numbers and then commit or roll back in any order, and of a node that crashes or is replaced
by its promoted standby: the horizon never passes a number whose transaction is still in flight, nor a
number the database could draw again after a crash or a promotion, never moves back, and catches up
once the writers are done."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.events.horizon import PostgresHorizon


class FakeDatabase:
    """Writers hold a shared lock from before they draw a number until they end (migration 0002).

    Durability as PostgreSQL has it: a drawn number is in the sequence's WAL, which becomes durable
    (and reaches a synchronous standby) only when a commit, or the WAL writer, flushes it; a rollback
    flushes nothing. A crash or a promotion keeps only what was durable: every transaction in flight
    is gone and the sequence goes on from the durable value, so it may hand out numbers again."""

    def __init__(self) -> None:
        self.last_drawn = 0
        self.durable = 0  # the highest number the sequence can never hand out again
        self.in_flight: dict[str, list[int]] = {}  # writer → numbers drawn
        self.committed: set[int] = set()
        self.next_writer = 0
        self.new_session = True

    # the probe (migration 0006): last number drawn, writers still holding the lock, highest committed
    # event, whether this is the session's first probe
    def execute(self, _statement):  # noqa: ANN001, ANN201
        return self

    def one(self) -> tuple[int, list[str], int, bool]:
        new_session, self.new_session = self.new_session, False
        return self.last_drawn, sorted(self.in_flight), max(self.committed, default=0), new_session

    def begin_and_draw(self, numbers: int) -> None:
        name = f"w{self.next_writer}"
        self.next_writer += 1
        self.in_flight[name] = []
        for _ in range(numbers):
            self.last_drawn += 1
            self.in_flight[name].append(self.last_drawn)

    def end(self, index: int, commit: bool) -> None:
        if not self.in_flight:
            return
        name = sorted(self.in_flight)[index % len(self.in_flight)]
        drawn = self.in_flight.pop(name)
        if commit:
            self.committed.update(drawn)
            self.durable = self.last_drawn  # the commit flushed the WAL written before it

    def flush(self) -> None:
        self.durable = self.last_drawn

    def fail_over(self) -> None:
        """kill -9 and crash recovery, or promotion of the synchronous standby."""
        self.in_flight.clear()
        self.last_drawn = self.durable
        self.next_writer = 0  # the new node's transactions may carry the same names as the old one's
        self.new_session = True

    def unfinished(self) -> set[int]:
        return {n for drawn in self.in_flight.values() for n in drawn}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("draw"), st.integers(1, 3)),
        st.tuples(st.just("commit"), st.integers(0, 50)),
        st.tuples(st.just("rollback"), st.integers(0, 50)),
        st.tuples(st.just("probe"), st.just(0)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("fail_over"), st.just(0)),
        st.tuples(st.just("reconnect"), st.just(0)),
    ),
    max_size=150,
)


@settings(max_examples=500, deadline=None)
@given(operations)
def test_the_horizon_never_passes_an_unfinished_writer_nor_a_number_drawn_again(ops):  # noqa: ANN001
    db = FakeDatabase()
    horizon = PostgresHorizon()
    previous = -1
    for op, arg in ops:
        if op == "draw":
            db.begin_and_draw(arg)
        elif op in ("commit", "rollback"):
            db.end(arg, commit=op == "commit")
        elif op == "flush":
            db.flush()
        elif op == "fail_over":
            db.fail_over()
        elif op == "reconnect":
            db.new_session = True
        else:
            h = horizon.advance(db)
            assert not horizon.rewound
            if h is None:
                continue
            assert h >= previous, "the horizon moved back"
            previous = h
            assert all(n > h for n in db.unfinished()), "a number at or below the horizon may still commit"
            assert h <= db.durable, "the database may hand out a number at or below the horizon again"
    while db.in_flight:
        db.end(0, commit=True)
    horizon.advance(db)
    assert horizon.advance(db) == max(db.committed, default=0)
    assert not horizon.pending


def test_numbers_drawn_again_after_a_promotion_are_not_skipped():
    """The reproduction: numbers drawn in a transaction that is open when the primary dies are drawn
    again by the promoted standby; the horizon must not have passed them."""
    db = FakeDatabase()
    horizon = PostgresHorizon()
    db.begin_and_draw(3)
    db.end(0, commit=True)
    assert horizon.advance(db) == 3
    db.begin_and_draw(100)           # open, never committed: 4..103 are not durable
    assert horizon.advance(db) == 3
    db.fail_over()                   # the writer is gone; the sequence goes on from 3
    db.begin_and_draw(1)             # number 4 again, in flight on the new node
    assert horizon.advance(db) == 3
    db.end(0, commit=True)
    assert horizon.advance(db) == 4


def test_holes_at_the_top_wait_for_a_later_commit():
    db = FakeDatabase()
    horizon = PostgresHorizon()
    db.begin_and_draw(2)
    db.end(0, commit=True)
    db.begin_and_draw(5)
    db.end(0, commit=False)          # 3..7 rolled back: holes that could be drawn again after a crash
    assert horizon.advance(db) == 2
    assert not horizon.pending       # nothing to wait for until the next commit wakes the reader
    db.begin_and_draw(1)
    db.end(0, commit=True)
    assert horizon.advance(db) == 8


def test_a_database_that_forgot_committed_events_is_reported_as_rewound():
    db = FakeDatabase()
    horizon = PostgresHorizon()
    db.begin_and_draw(10)
    db.end(0, commit=True)
    assert horizon.advance(db) == 10
    db.committed = {1, 2, 3}         # an older copy of the database: restored from a backup
    db.last_drawn = db.durable = 3
    db.new_session = True
    assert horizon.advance(db) == 3  # started again from what this database has
    assert horizon.rewound
    assert horizon.advance(db) == 3
    assert not horizon.rewound


def test_a_long_writer_holds_the_horizon_below_its_number_only_until_it_ends():
    db = FakeDatabase()
    horizon = PostgresHorizon()
    assert horizon.advance(db) == 0
    db.begin_and_draw(1)            # number 1: a slow transaction
    for _ in range(100):            # many quick ones commit meanwhile
        db.begin_and_draw(1)
        db.end(1, commit=True)
        assert horizon.advance(db) == 0
    assert horizon.pending
    db.end(0, commit=True)
    assert horizon.advance(db) == 101
