"""Settings from the environment, checked at start (pydantic-settings): every mistake is one line naming
the variable, the process exits non-zero, and there is no traceback. Also `payments-server --help`,
`--version` and `migrate`, a busy port, and `make run` naming the part that failed."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from conftest import new_database
from pydantic import ValidationError
from sqlalchemy import create_engine, inspect, text

from server.app import new_event_loop
from server.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(sys.executable).parent / "payments-server"


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any setting of ours, plus `env`."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PAYMENTS_", "STRIPE_", "BRIDGE_"))}
    return {**base, **env}


def run_server(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVER), *args], env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout_s)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The messages of the JSON lines at level error."""
    found = []
    for line in result.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") == "error":
            found.append(record["event"])
    return found


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty PostgreSQL database of its own (no migrations), dropped afterwards."""
    url, drop = new_database()
    try:
        yield url
    finally:
        drop()


def busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


# ---- the Settings model

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


def test_a_started_server_collects_garbage_less_often_and_not_what_startup_loaded(server) -> None:  # noqa: ANN001
    import gc

    from server.app import GC_THRESHOLDS

    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 10_000, "startup's objects are out of the collector's sight"


def test_accept_ahead_is_eight_unless_told_otherwise(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PAYMENTS_GRPC_ACCEPT_AHEAD", raising=False)
    assert Settings.from_env().grpc_accept_ahead == 8
    monkeypatch.setenv("PAYMENTS_GRPC_ACCEPT_AHEAD", "0")
    assert Settings.from_env().grpc_accept_ahead == 0


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PAYMENTS_DB_THREADS", "0", "PAYMENTS_DB_THREADS=0: must be at least 1"),
    ("PAYMENTS_DB_POOL_SIZE", "many", "PAYMENTS_DB_POOL_SIZE=many: must be a whole number"),
    ("PAYMENTS_GRPC_ACCEPT_AHEAD", "65", "PAYMENTS_GRPC_ACCEPT_AHEAD=65: must be at most 64"),
    ("PAYMENTS_GRPC_ACCEPT_AHEAD", "-1", "PAYMENTS_GRPC_ACCEPT_AHEAD=-1: must be at least 0"),
    ("PAYMENTS_SHUTDOWN_GRACE_S", "-5", "PAYMENTS_SHUTDOWN_GRACE_S=-5: must be at least 0"),
    ("PAYMENTS_EVENT_LOOP", "trio", "PAYMENTS_EVENT_LOOP=trio: must be one of 'uvloop' or 'asyncio'"),
    ("PAYMENTS_TIMEZONE", "Mars/Base", "PAYMENTS_TIMEZONE=Mars/Base: is not a time zone"),
    ("PAYMENTS_CURRENCY", "dollars", "PAYMENTS_CURRENCY=dollars: is not a three-letter ISO 4217 currency code"),
    ("PAYMENTS_CURRENCY", "JPY", "PAYMENTS_CURRENCY=JPY: jpy has no cents"),
    ("PAYMENTS_GRPC_ADDR", "localhost", "PAYMENTS_GRPC_ADDR=localhost: 'localhost' is not host:port"),
    ("PAYMENTS_GRPC_ADDR", "127.0.0.1:70000", "port 70000 is out of range"),
    ("PAYMENTS_GRPC_ADDR", "::1:50051", "an IPv6 address goes in brackets"),
    ("PAYMENTS_METRICS_ADDR", "9464", "PAYMENTS_METRICS_ADDR=9464: '9464' is not host:port"),
    ("PAYMENTS_MIGRATE_AT_START", "perhaps", "PAYMENTS_MIGRATE_AT_START=perhaps: must be true or false"),
    ("PAYMENTS_DATABASE_URL", "sqlite:///./var/payments.db", "the service runs on PostgreSQL only"),
    ("PAYMENTS_DATABASE_URL", "mysql://u@h/db", "has the scheme 'mysql'"),
    ("PAYMENTS_TLS_CERT_FILE", "/nonexistent/cert.pem", "PAYMENTS_TLS_CERT_FILE=/nonexistent/cert.pem: the certificate"),
    ("STRIPE_API_BASE", "localhost:8420", "STRIPE_API_BASE=localhost:8420: is not an http(s) URL"),
])
def test_each_bad_setting_is_one_line_naming_it(monkeypatch, name: str, value: str, says: str) -> None:  # noqa: ANN001
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env()
    assert len(caught.value.lines) == 1, caught.value.lines
    assert says in caught.value.lines[0]


def test_secrets_never_appear_in_messages_or_repr(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("STRIPE_SECRET_KEY", "pk_live_not_a_secret_key_but_private")
    monkeypatch.setenv("PAYMENTS_AUTH_TOKENS", "very-private-token")
    monkeypatch.setenv("PAYMENTS_DATABASE_URL", "ftp://user:hunter2@db/payments")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env()
    text_ = "\n".join(caught.value.lines)
    assert len(caught.value.lines) == 3
    for secret in ("pk_live_not_a_secret_key_but_private", "very-private-token", "hunter2"):
        assert secret not in text_
    settings = Settings(database_url="postgresql://u:hunter2@h/db", auth_tokens="tok-123=a:app",
                        stripe_secret_key="sk_test_abc")
    for secret in ("hunter2", "tok-123", "sk_test_abc"):
        assert secret not in repr(settings)


def test_postgres_urls_are_normalised_for_sqlalchemy(monkeypatch) -> None:  # noqa: ANN001
    for given in ("postgres://u@h:5432/db", "postgresql://u@h:5432/db", "postgresql+psycopg2://u@h:5432/db"):
        monkeypatch.setenv("PAYMENTS_DATABASE_URL", given)
        assert Settings.from_env().database_url == "postgresql+psycopg2://u@h:5432/db"
    multi = "postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write"
    monkeypatch.setenv("PAYMENTS_DATABASE_URL", multi)
    assert Settings.from_env().database_url == "postgresql+psycopg2://u@h1:5432,h2:5432/db?target_session_attrs=read-write"
    monkeypatch.delenv("PAYMENTS_DATABASE_URL")
    assert Settings.from_env().database_url is None, "unset is allowed in Settings (make run sets it)"


def test_currency_and_time_zone_are_normalised(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PAYMENTS_CURRENCY", " AUD ")
    monkeypatch.setenv("PAYMENTS_TIMEZONE", "Asia/Kolkata")
    settings = Settings.from_env()
    assert (settings.currency, settings.timezone) == ("aud", "Asia/Kolkata")


def test_settings_take_keyword_arguments_and_refuse_unknown_ones() -> None:
    settings = Settings(database_url="postgres://u@h/db", grpc_addr="127.0.0.1:0", auth_tokens="t=a:app",
                        extra={"event_queue_events": 5}, db_threads=4)
    assert (settings.database_url, settings.db_threads, settings.extra) == (
        "postgresql+psycopg2://u@h/db", 4, {"event_queue_events": 5})
    with pytest.raises(ValidationError):
        Settings(db_thread=4)  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        Settings(db_threads=0)


def test_plain_text_on_an_address_other_than_loopback_needs_an_explicit_yes(monkeypatch) -> None:  # noqa: ANN001
    for addr in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051", "127.0.0.2:0"):
        monkeypatch.setenv("PAYMENTS_GRPC_ADDR", addr)
        assert Settings.from_env().grpc_addr == addr
    for addr in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "payments.internal:50051"):
        monkeypatch.setenv("PAYMENTS_GRPC_ADDR", addr)
        with pytest.raises(ConfigError, match="not a loopback address and TLS is off"):
            Settings.from_env()
    monkeypatch.setenv("PAYMENTS_ALLOW_INSECURE", "true")
    assert Settings.from_env().allow_insecure


def test_tls_files_go_together(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    monkeypatch.setenv("PAYMENTS_TLS_CERT_FILE", str(cert))
    with pytest.raises(ConfigError, match="PAYMENTS_TLS_CERT_FILE and PAYMENTS_TLS_KEY_FILE go together"):
        Settings.from_env()
    monkeypatch.delenv("PAYMENTS_TLS_CERT_FILE")
    monkeypatch.setenv("PAYMENTS_TLS_CLIENT_CA_FILE", str(cert))
    with pytest.raises(ConfigError, match="needs PAYMENTS_TLS_CERT_FILE"):
        Settings.from_env()


# ---- payments-server, as an operator meets it

def test_help_and_version() -> None:
    helped = run_server("--help")
    assert helped.returncode == 0 and "migrate" in helped.stdout and "Exit codes" in helped.stdout
    shown = run_server("--version")
    assert shown.returncode == 0
    assert shown.stdout.strip().startswith("payments-server ") and shown.stdout.strip() != "payments-server unknown"


def test_bad_settings_exit_2_with_one_line_each_and_no_traceback() -> None:
    result = run_server(PAYMENTS_DB_THREADS="0", PAYMENTS_TIMEZONE="Mars/Base", PAYMENTS_DATABASE_URL="postgres://x/y")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 2, result.stdout
    assert any(line.startswith("PAYMENTS_DB_THREADS=0") for line in lines)
    assert any(line.startswith("PAYMENTS_TIMEZONE=Mars/Base") for line in lines)
    assert "Traceback" not in result.stdout + result.stderr


def test_no_database_url_says_to_set_it_or_use_make_run() -> None:
    result = run_server()
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "PAYMENTS_DATABASE_URL is not set" in line and "make run" in line
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    with busy_port() as holder:  # a port that accepts and never speaks PostgreSQL would hang: a closed one
        port = holder.getsockname()[1]
    result = run_server(PAYMENTS_DATABASE_URL=f"postgresql://someone:hunter2@127.0.0.1:{port}/payments")
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("cannot use the database postgresql+psycopg2://someone:***@127.0.0.1")
    assert "hunter2" not in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def test_migrate_creates_the_schema_and_a_server_may_skip_migrating_at_start(fresh_database) -> None:  # noqa: ANN001
    engine = create_engine(fresh_database)
    try:
        assert "accounts" not in inspect(engine).get_table_names()
        result = run_server("migrate", PAYMENTS_DATABASE_URL=fresh_database)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "accounts" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalar()
        again = run_server("migrate", PAYMENTS_DATABASE_URL=fresh_database)
        assert again.returncode == 0, "migrating twice is harmless"
    finally:
        engine.dispose()


def test_a_busy_port_is_one_line_and_exit_1(fresh_database) -> None:  # noqa: ANN001
    with busy_port() as holder:
        addr = f"127.0.0.1:{holder.getsockname()[1]}"
        result = run_server(PAYMENTS_DATABASE_URL=fresh_database, PAYMENTS_GRPC_ADDR=addr)
        metrics = run_server(PAYMENTS_DATABASE_URL=fresh_database, PAYMENTS_METRICS_ADDR=addr,
                             PAYMENTS_GRPC_ADDR="127.0.0.1:0")
    assert result.returncode == 1
    assert error_lines(result) == [f"PAYMENTS_GRPC_ADDR={addr}: the port is in use (is another server running there?)"]
    assert metrics.returncode == 1
    assert error_lines(metrics) == [f"PAYMENTS_METRICS_ADDR={addr}: the port is in use (is another server running "
                                    "there?)"]
    for run in (result, metrics):
        assert "Traceback" not in run.stdout + run.stderr
        assert run.stderr.strip() == "", "nothing else is said (grpc's own lines included)"


def test_make_run_exits_non_zero_naming_the_part_that_failed(fresh_database, tmp_path) -> None:  # noqa: ANN001
    with busy_port() as holder:
        addr = f"127.0.0.1:{holder.getsockname()[1]}"
        env = clean_env(PAYMENTS_DATABASE_URL=fresh_database, PAYMENTS_GRPC_ADDR=addr,
                        PAYMENTS_AUTH_TOKENS="tok-dev-a=dev:admin", PAYMENTS_METRICS_ADDR="127.0.0.1:0",
                        BRIDGE_HTTP_ADDR="127.0.0.1:0")
        result = subprocess.run([sys.executable, "-m", "server.devrun"], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode != 0
    assert "make run: the payments server (payments-server) exited with code 1" in result.stderr
    assert f"PAYMENTS_GRPC_ADDR={addr}: the port is in use" in result.stdout


def test_keepalive_and_connection_age_options_follow_the_settings() -> None:
    from server.app import grpc_options

    default = dict(grpc_options(Settings()))
    assert default["grpc.keepalive_time_ms"] == 30_000 and default["grpc.keepalive_permit_without_calls"] == 1
    assert default["grpc.max_connection_age_ms"] == 1_800_000 and default["grpc.max_connection_age_grace_ms"] == 300_000
    ageless = dict(grpc_options(Settings(grpc_max_connection_age_s=0, grpc_keepalive_time_s=120)))
    assert "grpc.max_connection_age_ms" not in ageless and ageless["grpc.keepalive_time_ms"] == 120_000
