"""Latency samples of one scenario and their summary."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    t_start: float = 0.0
    t_stop: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def started(self) -> None:
        self.t_start = time.perf_counter()

    def stopped(self) -> None:
        self.t_stop = time.perf_counter()

    def extend(self, values: list[float]) -> None:
        with self._lock:
            self.latencies_s.extend(values)

    def summary(self) -> dict:
        values = sorted(self.latencies_s)
        elapsed = max(self.t_stop - self.t_start, 1e-9)
        return {
            "count": len(values),
            "errors": self.errors,
            "elapsed_s": round(elapsed, 3),
            "per_s": round(len(values) / elapsed, 1),
            "p50_ms": percentile_ms(values, 50),
            "p95_ms": percentile_ms(values, 95),
            "p99_ms": percentile_ms(values, 99),
            "max_ms": round(values[-1] * 1000, 2) if values else None,
        }


def percentile_ms(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[rank] * 1000, 2)
