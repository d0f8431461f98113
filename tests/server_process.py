"""Run `payments-server` (the console script) as a subprocess for end-to-end and logging tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVER_SCRIPT = Path(sys.executable).parent / "payments-server"


class ServerProcess:
    """`payments-server` on a port the OS picks; stdout is collected line by line."""

    def __init__(self, db: str, auth_tokens: str, **env: str):
        """`db` is a database URL."""
        self.env = {**os.environ, "PAYMENTS_DATABASE_URL": db, "PAYMENTS_GRPC_ADDR": "127.0.0.1:0",
                    "PAYMENTS_AUTH_TOKENS": auth_tokens, **env}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.stderr = ""
        self.port = 0
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> ServerProcess:
        assert SERVER_SCRIPT.exists(), f"{SERVER_SCRIPT} is missing: run `make venv`"
        self.proc = subprocess.Popen([str(SERVER_SCRIPT)], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.port:
            if self.proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(5)
                said = "\n".join([*self.lines[-20:], self.proc.stderr.read()]).strip()
                raise RuntimeError(f"payments-server exited {self.proc.returncode}: {said}")
            for record in self.records():
                if record.get("event") == "serving":
                    self.port = int(record["port"])
            time.sleep(0.05)
        if not self.port:
            self.stop()
            raise RuntimeError("payments-server did not report that it was serving")
        self.wait_serving()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_serving(self, timeout_s: float = 10) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s, wait_for_ready=True)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    def records(self) -> list[dict]:
        """Every stdout line that is a JSON object."""
        return json_records(self.lines)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, then wait: returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def json_records(lines: list[str]) -> list[dict]:
    """The lines that are JSON objects, parsed (a server's log lines)."""
    out = []
    for line in list(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
