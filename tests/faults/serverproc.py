"""The payments server as a subprocess (`python -m server`) on a fixed port, so that it can be
killed and started again where its clients expect it; its stdout (one JSON object a line) is kept.

    srv = ServerProc(database_url, port=free_port()).start()
    srv.kill()            # SIGKILL
    srv.start()           # same port
    srv.terminate()       # SIGTERM; answers the exit code and how long the exit took
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import json_records

from faults.pgcluster import free_port

SERVICE_NAME = "cobalt.payments.v1.PaymentsService"
TOKENS = {"app": "faults-app-token", "admin": "faults-admin-token"}
AUTH_SPEC = f"{TOKENS['app']}=faults-app:app,{TOKENS['admin']}=faults-ops:admin"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerExited(RuntimeError):
    pass


class ServerProc:
    def __init__(self, database_url: str, *, port: int | None = None, **env: str):
        self.port = port or free_port()
        self.env = {**os.environ, "PAYMENTS_DATABASE_URL": database_url, "PAYMENTS_GRPC_ADDR": self.target,
                    "PAYMENTS_AUTH_TOKENS": AUTH_SPEC, "PYTHONUNBUFFERED": "1", **env}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []  # stdout of every run, in order
        self.stderr_lines: list[str] = []
        self.starts = 0
        self._readers: list[threading.Thread] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ life cycle
    def spawn(self) -> subprocess.Popen:
        """Start the process and return at once."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen([sys.executable, "-m", "server"], env=self.env, cwd=REPO_ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.starts += 1
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.stderr_lines)):
            reader = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self.proc

    def start(self, timeout_s: float = 60) -> ServerProc:
        """Start it and wait until health says SERVING."""
        self.spawn()
        self.wait_serving(timeout_s)
        return self

    def wait_serving(self, timeout_s: float = 60) -> float:
        """Seconds until health answered SERVING for the service."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerExited(f"server exited {self.proc.returncode}: {self.tail()}")
            if self.health(SERVICE_NAME, timeout_s=0.5) == "SERVING":
                return time.monotonic() - started
            time.sleep(0.05)
        raise TimeoutError(f"server not SERVING within {timeout_s} s: {self.tail()}")

    @staticmethod
    def _read(stream, sink: list[str]) -> None:  # noqa: ANN001
        for line in stream:
            sink.append(line.rstrip("\n"))

    def kill(self) -> None:
        """SIGKILL: no shutdown at all."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30) -> tuple[int, float]:
        """SIGTERM, then wait: (exit code, seconds from the signal to the exit)."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        return code, time.monotonic() - sent

    def wait_exit(self, timeout_s: float = 30) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.running():
            self.terminate(10)
        for reader in self._readers:
            reader.join(2)

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ looking at it
    def health(self, service: str = "", timeout_s: float = 1.0) -> str:
        """SERVING, NOT_SERVING, …, or the gRPC error code's name when health does not answer."""
        try:
            with grpc.insecure_channel(self.target) as channel:
                resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=timeout_s)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as err:
            return err.code().name

    def records(self) -> list[dict]:
        return json_records(self.lines)

    def tail(self, n: int = 20) -> str:
        return "\n".join((self.lines + self.stderr_lines)[-n:])
