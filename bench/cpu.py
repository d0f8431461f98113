"""Where a scenario's CPU went, read from Linux's /proc: the server processes, PostgreSQL (when it
runs on this host), the load generator, the machine's idle share, and how the time of each server's
event-loop thread divides between running and waiting for a CPU. The last says whether a server is
short of work or short of a core: on a machine shared with the database and the load generator, a
thread that is ready to run may wait for a core as long as it runs. A figure that cannot be read
here (another system, another host's database) is None."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _ticks_to_s(ticks: int) -> float:
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) that process `pid` has used, or None."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return _ticks_to_s(int(fields[11]) + int(fields[12]))
    except (OSError, IndexError, ValueError):
        return None


def thread_sched_s(pid: int, tid: int | None = None) -> tuple[float, float] | None:
    """(seconds running, seconds ready but waiting for a CPU) of one thread (the main thread when
    `tid` is None), from its schedstat, or None where the kernel does not keep it."""
    try:
        run_ns, wait_ns, _ = (PROC / str(pid) / "task" / str(tid or pid) / "schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return None


def postgres_cpu_s() -> float | None:
    """CPU seconds used so far by the processes of this host named `postgres`: the server and its
    backends, and the backends that have ended (counted in the server's time of its children), or
    None without /proc."""
    if not (PROC / "stat").exists():
        return None
    total = 0.0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        if name == "postgres" or name.startswith("postgres:"):
            fields = stat.rsplit(")", 1)[1].split()
            total += _ticks_to_s(sum(int(v) for v in fields[11:15]))  # its own time, and its ended children's
    return total


def machine_idle_jiffies() -> tuple[int, int] | None:
    """(idle, all) jiffies of every CPU together since boot, or None."""
    try:
        with open(PROC / "stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class _Reading:
    at: float
    servers: list[float | None]
    loops: list[tuple[float, float] | None]
    postgres: float | None
    load: float
    idle: tuple[int, int] | None


class CpuMeter:
    """`start()`, run the load, then `stop(ops)`: the CPU of each part per operation."""

    def __init__(self, server_pids: list[int], *, postgres_is_local: bool):
        self.server_pids = server_pids
        self.postgres_is_local = postgres_is_local
        self._start: _Reading | None = None

    def _read(self) -> _Reading:
        return _Reading(
            at=time.perf_counter(),
            servers=[process_cpu_s(pid) for pid in self.server_pids],
            loops=[thread_sched_s(pid) for pid in self.server_pids],
            postgres=postgres_cpu_s() if self.postgres_is_local else None,
            load=own_cpu_s(),
            idle=machine_idle_jiffies(),
        )

    def start(self) -> None:
        self._start = self._read()

    def stop(self, ops: int) -> dict:
        assert self._start is not None, "start() first"
        a, b = self._start, self._read()
        wall = max(b.at - a.at, 1e-9)

        def per_op_ms(before: float | None, after: float | None) -> float | None:
            if before is None or after is None or ops <= 0:
                return None
            return round((after - before) * 1000 / ops, 3)

        servers = [per_op_ms(x, y) for x, y in zip(a.servers, b.servers, strict=True)]
        loops = [(x, y) for x, y in zip(a.loops, b.loops, strict=True) if x is not None and y is not None]
        out: dict = {
            "server_ms_per_op": None if not servers or None in servers else round(sum(servers), 3),  # type: ignore[arg-type]
            "postgresql_ms_per_op": per_op_ms(a.postgres, b.postgres),
            "load_generator_ms_per_op": per_op_ms(a.load, b.load),
            "machine_idle": None,
            "server_loop_running": None,
            "server_loop_waiting_for_cpu": None,
        }
        if a.idle is not None and b.idle is not None and b.idle[1] > a.idle[1]:
            out["machine_idle"] = round((b.idle[0] - a.idle[0]) / (b.idle[1] - a.idle[1]), 3)
        if loops and len(loops) == len(self.server_pids):  # the mean over the servers' loop threads
            out["server_loop_running"] = round(sum(y[0] - x[0] for x, y in loops) / len(loops) / wall, 3)
            out["server_loop_waiting_for_cpu"] = round(sum(y[1] - x[1] for x, y in loops) / len(loops) / wall, 3)
        return out


def describe(cpu: dict) -> str:
    """One line for the progress output: what is known of `cpu` (a `CpuMeter.stop` answer)."""
    parts = []
    for key, label in (("server_ms_per_op", "server"), ("postgresql_ms_per_op", "PostgreSQL"),
                       ("load_generator_ms_per_op", "load generator")):
        if cpu.get(key) is not None:
            parts.append(f"{label} {cpu[key]:.3f}")
    line = "CPU ms/op: " + ", ".join(parts) if parts else ""
    if cpu.get("server_loop_running") is not None:
        line += (f"; server loop thread running {cpu['server_loop_running']:.0%}, waiting for a CPU "
                 f"{cpu['server_loop_waiting_for_cpu']:.0%}")
    if cpu.get("machine_idle") is not None:
        line += f"; machine idle {cpu['machine_idle']:.0%}"
    return line
