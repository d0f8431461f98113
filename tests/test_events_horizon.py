"""The safe horizon on PostgreSQL (server/events/horizon.py), against a model of writers that draw
sequence numbers and then commit or roll back in any order: the horizon never passes a number whose
transaction is still in flight, never moves back, and catches up once the writers are done."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.events.horizon import PostgresHorizon


class FakeDatabase:
    """Writers hold a shared lock from before they draw a number until they end (migration 0002)."""

    def __init__(self) -> None:
        self.last_drawn = 0
        self.in_flight: dict[str, list[int]] = {}  # writer → numbers drawn
        self.committed: set[int] = set()
        self.next_writer = 0

    # the probe: last number drawn, then the writers still holding the lock
    def execute(self, _statement):  # noqa: ANN001, ANN201
        return self

    def one(self) -> tuple[int, list[str]]:
        return self.last_drawn, sorted(self.in_flight)

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

    def unfinished(self) -> set[int]:
        return {n for drawn in self.in_flight.values() for n in drawn}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("draw"), st.integers(1, 3)),
        st.tuples(st.just("commit"), st.integers(0, 50)),
        st.tuples(st.just("rollback"), st.integers(0, 50)),
        st.tuples(st.just("probe"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_horizon_never_passes_an_unfinished_writer(ops):  # noqa: ANN001
    db = FakeDatabase()
    horizon = PostgresHorizon()
    previous = -1
    for op, arg in ops:
        if op == "draw":
            db.begin_and_draw(arg)
        elif op in ("commit", "rollback"):
            db.end(arg, commit=op == "commit")
        else:
            h = horizon.advance(db)
            if h is None:
                continue
            assert h >= previous, "the horizon moved back"
            previous = h
            assert all(n > h for n in db.unfinished()), "a number at or below the horizon may still commit"
    while db.in_flight:
        db.end(0, commit=True)
    horizon.advance(db)
    assert horizon.advance(db) == db.last_drawn
    assert not horizon.pending


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
