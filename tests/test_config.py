"""Settings from the environment: the event loop the server runs on, accept-ahead."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from server.app import new_event_loop
from server.config import Settings


def test_the_server_runs_on_uvloop_unless_told_otherwise(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PAYMENTS_EVENT_LOOP", raising=False)
    assert Settings.from_env().event_loop == "uvloop"
    monkeypatch.setenv("PAYMENTS_EVENT_LOOP", " AsyncIO ")
    assert Settings.from_env().event_loop == "asyncio"
    for kind, expected in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, expected)
            assert (kind == "uvloop") == isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_an_unknown_event_loop_stops_the_start_with_a_clear_message(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PAYMENTS_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit, match="PAYMENTS_EVENT_LOOP must be one of uvloop, asyncio, got 'trio'"):
        Settings.from_env()


def test_a_started_server_collects_garbage_less_often_and_not_what_startup_loaded(server) -> None:  # noqa: ANN001
    import gc

    from server.app import GC_THRESHOLDS

    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 10_000, "startup's objects are out of the collector's sight"


def test_accept_ahead_is_eight_unless_told_otherwise_and_a_bad_value_stops_the_start(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PAYMENTS_GRPC_ACCEPT_AHEAD", raising=False)
    assert Settings.from_env().grpc_accept_ahead == 8
    monkeypatch.setenv("PAYMENTS_GRPC_ACCEPT_AHEAD", "0")
    assert Settings.from_env().grpc_accept_ahead == 0
    for bad in ("-1", "65"):
        monkeypatch.setenv("PAYMENTS_GRPC_ACCEPT_AHEAD", bad)
        with pytest.raises(SystemExit, match=f"PAYMENTS_GRPC_ACCEPT_AHEAD must be between 0 and 64, got {bad}"):
            Settings.from_env()
    monkeypatch.setenv("PAYMENTS_GRPC_ACCEPT_AHEAD", "many")
    with pytest.raises(SystemExit, match="PAYMENTS_GRPC_ACCEPT_AHEAD must be an integer"):
        Settings.from_env()
