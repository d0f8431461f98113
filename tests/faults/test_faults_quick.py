"""The quick fault cases (`make test`): the short versions of the scenarios of `make faults`, on a
PostgreSQL cluster of their own. They check outcomes (nothing lost or booked twice, the ledger's
invariants, no INTERNAL, health turning NOT_SERVING and back, the exit and what it left behind),
not timings: the timing targets are checked by `make faults`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from faults import scenarios
from faults.pgcluster import PgCluster, find_bin_dir

pytestmark = [pytest.mark.faults_quick, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    try:
        find_bin_dir()
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with PgCluster.create() as cluster:
        yield cluster


def passed(result: scenarios.Result) -> None:
    assert not result.failures, f"{result.name}: {result.failures}; notes: {result.notes}; codes: {dict(result.codes)}"
    assert result.acknowledged > 0 or result.name.startswith("start"), f"{result.name}: nothing was acknowledged"


def test_start_with_the_database_down(pg: PgCluster) -> None:
    passed(scenarios.start_with_database_down(pg, quick=True))


def test_kill9_of_the_server_under_load(pg: PgCluster) -> None:
    passed(scenarios.kill9_under_load(pg, quick=True))


def test_postgresql_immediate_stop_under_load(pg: PgCluster) -> None:
    """The server is not restarted; health goes NOT_SERVING while the database is down and back."""
    passed(scenarios.pg_restart_under_load(pg, "immediate", quick=True, down_s=2.0))


def test_sigterm_with_calls_blocked(pg: PgCluster) -> None:
    """The cut-off calls commit nothing, even once the lock they waited for goes."""
    passed(scenarios.sigterm_with_calls_blocked(pg, quick=True))


def test_overload_is_refused_with_resource_exhausted(pg: PgCluster) -> None:
    passed(scenarios.overload(pg, quick=True, clients=200, limit=32))
