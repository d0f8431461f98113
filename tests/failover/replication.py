"""Two PostgreSQL nodes with streaming replication for the failover harness: a primary and a
synchronous standby in a temporary directory, on free loopback ports, from the binaries at hand
(faults.pgcluster finds them). Never the shared server: every command names one of these data
directories, and only these nodes' own processes are ever signalled.

    pair = ReplicatedPair.create()       # a: primary, b: synchronous standby, WAL archived
    pair.kill9(pair.primary)              # the primary's every process, SIGKILL: a crash
    pair.promote(pair.standby)           # the standby becomes primary on a new timeline
    pair.rewind_into_standby(old)        # CHECKPOINT on the new primary, pg_rewind, start, sync
    pair.destroy()

A node's port and socket directory are given on its command line, not in its configuration files:
pg_basebackup and pg_rewind copy those files from one node to the other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

from faults.pgcluster import PgCluster, free_port

REPLICATION_CONF = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
    "wal_keep_size": "'512MB'",  # a rewound node catches up from its new primary's WAL
    # A standby retries its WAL sources (stream, archive) this often; a promotion asked for during the
    # wait between two tries waits for its end (5 s by default).
    "wal_retrieve_retry_interval": "'500ms'",
    "archive_mode": "always",  # standbys archive what they receive: no segment is missing after a failover
    "autovacuum": "off",  # no background commit flushes WAL behind the harness's back (the reuse reproduction)
    "synchronous_standby_names": "''",  # set per role with ALTER SYSTEM
}
HBA = ["host replication all 127.0.0.1/32 trust"]

ARCHIVE_SCRIPT = """#!/bin/sh
# archive_command: $1 = %p, $2 = %f. Every node archives (archive_mode = always), so a file may be
# there already: identical is success, different is an error PostgreSQL retries and logs.
set -e
dest="{archive}/$2"
if [ -f "$dest" ]; then
    cmp -s "$1" "$dest"
    exit $?
fi
cp "$1" "$dest.tmp.$$"
mv "$dest.tmp.$$" "$dest"
"""


class Node(PgCluster):
    """A PgCluster whose port and socket directory come from its command line."""

    def __init__(self, data_dir: Path, port: int, name: str, **kw: object):
        super().__init__(data_dir, port, **kw)  # type: ignore[arg-type]
        self.name = name

    def start(self, timeout_s: float = 60) -> None:
        if not self.log_file.exists():
            self.log_file.touch()
            self._chown(self.log_file)
        sockets = self.data_dir.parent / f"{self.name}.sockets"  # outside the data directory, which is copied
        sockets.mkdir(exist_ok=True)
        self._chown(sockets)
        options = f"-p {self.port} -k {sockets} -c cluster_name={self.name}"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                  "-t", str(int(timeout_s)), "-o", options, "start", timeout_s=timeout_s + 10)

    def processes(self) -> list[int]:
        """The postmaster and its children."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return []
        pids = [postmaster]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    pids.append(int(entry.name))
        return pids

    def kill9(self) -> None:
        """SIGKILL to the postmaster and every child at once: as if the machine had stopped."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for pid in pids:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.01)

    def sql(self, query: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        return self.execute(query, params, dbname)

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery()")[0][0])

    def set_sync_standbys(self, value: str) -> None:
        """synchronous_standby_names, written with ALTER SYSTEM (a standby takes it too) and reloaded."""
        self.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{value}'")
        self.sql("SELECT pg_reload_conf()")

    def timeline(self) -> int:
        if self.in_recovery():
            return int(self.sql("SELECT received_tli FROM pg_stat_wal_receiver")[0][0] or 0)
        return int(self.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0][0], 16)


class ReplicatedPair:
    def __init__(self, root: Path, a: Node, b: Node, archive: Path):
        self.root = root
        self.nodes = {"a": a, "b": b}
        self.archive = archive
        self.primary = a
        self.standby: Node | None = b
        self.events: list[tuple[float, str]] = []  # (monotonic time, what happened)

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    # ------------------------------------------------------------ building
    @classmethod
    def create(cls) -> ReplicatedPair:
        root = Path(tempfile.mkdtemp(prefix="payments-failover-"))
        archive = root / "archive"
        archive.mkdir()
        script = root / "archive.sh"
        script.write_text(ARCHIVE_SCRIPT.format(archive=archive))
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        conf = {**REPLICATION_CONF, "archive_command": f"'{script} %p %f'",
                "restore_command": f"'cp {archive}/%f %p'"}
        a = Node(root / "a", free_port(), "a")
        a._chown(root)
        a._chown(archive)
        a.initdb(conf=conf, hba=HBA)
        a.start()
        b = Node(root / "b", free_port(), "b")
        pair = cls(root, a, b, archive)
        try:
            a._run(str(a.bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(a.port), "-U", a.user,
                   "-D", str(b.data_dir), "-X", "stream", "-R", "-c", "fast")
            b.start()
            pair.make_synchronous(a, b)
        except BaseException:
            pair.destroy()
            raise
        return pair

    def make_synchronous(self, primary: Node, standby: Node, timeout_s: float = 60) -> None:
        """Wait until `standby` streams from `primary`, then make every commit on `primary` wait for it."""
        self.wait_streaming(primary, standby, timeout_s)
        primary.set_sync_standbys("*")
        deadline = time.monotonic() + timeout_s
        while primary.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                          (standby.name,)) != [("sync",)]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{standby.name} did not become a synchronous standby of {primary.name}")
            time.sleep(0.05)
        self.primary, self.standby = primary, standby
        self.note(f"{standby.name} is the synchronous standby of {primary.name}")

    @staticmethod
    def wait_streaming(primary: Node, standby: Node, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while primary.sql("SELECT state FROM pg_stat_replication WHERE application_name = %s",
                          (standby.name,)) != [("streaming",)]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{standby.name} does not stream from {primary.name}:\n{standby.log_tail()}")
            time.sleep(0.05)

    # ------------------------------------------------------------ failing over and back
    def kill9(self, node: Node) -> float:
        """Crash `node`; answers when it happened (monotonic)."""
        node.kill9()
        at = time.monotonic()
        self.note(f"kill -9 of {node.name}")
        return at

    def promote(self, node: Node) -> tuple[float, float]:
        """Promote a standby: first clear synchronous_standby_names on it (until a standby of its own
        joins, every commit would wait), then `pg_ctl promote`. Answers when the promotion was asked
        for (until then there was no primary) and when the harness saw it accept writes."""
        node.set_sync_standbys("")
        asked = time.monotonic()
        node._run(str(node.bin_dir / "pg_ctl"), "-D", str(node.data_dir), "-w", "-t", "60", "promote")
        deadline = time.monotonic() + 60
        while node.in_recovery():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} still in recovery after promote")
            time.sleep(0.01)
        at = time.monotonic()
        self.primary, self.standby = node, None
        self.note(f"{node.name} promoted (timeline {node.timeline()})")
        return asked, at

    def rewind_into_standby(self, old: Node) -> str:
        """Make the old primary a synchronous standby of the new one: CHECKPOINT on the new primary (so
        that its control file names the new timeline; without it pg_rewind may find "no rewind
        required" and leave `old` on the old timeline), pg_rewind, start, wait until synchronous.
        Answers what pg_rewind said."""
        new = self.primary
        new.sql("CHECKPOINT")
        source = f"host=127.0.0.1 port={new.port} user={new.user} dbname=postgres"
        done = old._run(str(old.bin_dir / "pg_rewind"), "--target-pgdata", str(old.data_dir),
                        "--source-server", source, "--write-recovery-conf", timeout_s=300)
        said = (done.stdout + done.stderr).strip().splitlines()
        self.note(f"pg_rewind of {old.name}: {said[-1] if said else ''}")
        old.start()
        old.set_sync_standbys("")  # its own setting matters once it is promoted again
        self.make_synchronous(new, old)
        return "\n".join(said)

    # ------------------------------------------------------------ the archive
    def base_backup(self, dest: Path) -> None:
        """A base backup of the primary (tar-free: a data directory), for the restore drill."""
        node = self.primary
        node._run(str(node.bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(node.port), "-U", node.user,
                  "-D", str(dest), "-X", "stream", "-c", "fast")
        self.note("base backup taken")

    def wait_archived(self, node: Node, timeout_s: float = 60) -> str:
        """Switch to a new WAL segment on `node` and wait until the one it closed is archived."""
        (segment,) = node.sql("SELECT pg_walfile_name(pg_switch_wal())")[0]
        deadline = time.monotonic() + timeout_s
        while not (self.archive / segment).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{segment} was not archived:\n{node.log_tail()}")
            time.sleep(0.05)
        return segment

    def restore(self, backup: Path, target_name: str) -> Node:
        """Point-in-time recovery: a copy of the base backup, replaying archived WAL (across every
        timeline, to the newest) up to the named restore point, then promoted. Answers the new node."""
        node = Node(self.root / f"restored-{target_name}", free_port(), f"restored_{target_name}")
        shutil.copytree(backup, node.data_dir)
        for path in [node.data_dir, *node.data_dir.rglob("*")]:
            node._chown(path)
        (node.data_dir / "standby.signal").unlink(missing_ok=True)
        (node.data_dir / "recovery.signal").touch()
        node._chown(node.data_dir / "recovery.signal")
        with open(node.data_dir / "postgresql.auto.conf", "a") as f:
            f.write(f"restore_command = 'cp {self.archive}/%f %p'\n"
                    f"recovery_target_name = '{target_name}'\n"
                    "recovery_target_timeline = 'latest'\n"
                    "recovery_target_action = 'promote'\n"
                    "archive_mode = 'off'\n"
                    "primary_conninfo = ''\n"
                    "synchronous_standby_names = ''\n")
        node.start(timeout_s=120)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):
                if not node.in_recovery():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the restored node did not finish recovery:\n{node.log_tail()}")
            time.sleep(0.05)
        self.nodes[node.name] = node
        self.note(f"restored to {target_name}")
        return node

    # ------------------------------------------------------------ using it
    def dsn(self, dbname: str) -> str:
        """libpq's multi-host form: whichever node accepts writes."""
        a, b = self.nodes["a"], self.nodes["b"]
        return (f"host=127.0.0.1,127.0.0.1 port={a.port},{b.port} user={a.user} dbname={dbname} "
                "target_session_attrs=read-write connect_timeout=5")

    def url(self, dbname: str) -> str:
        a, b = self.nodes["a"], self.nodes["b"]
        return (f"postgresql+psycopg2://{a.user}@/{dbname}?host=127.0.0.1:{a.port}&host=127.0.0.1:{b.port}"
                "&target_session_attrs=read-write")

    def destroy(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                if node.is_running():
                    node.kill9()
        shutil.rmtree(self.root, ignore_errors=True)
