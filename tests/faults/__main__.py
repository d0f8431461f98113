"""`make faults`: every fault scenario on a PostgreSQL cluster of the suite's own, a table per
scenario and a summary. Exit code 1 when a scenario did not pass.

    PYTHONPATH=tests .venv/bin/python -m faults                 # all
    PYTHONPATH=tests .venv/bin/python -m faults kill9 locked    # some
    PYTHONPATH=tests .venv/bin/python -m faults --quick         # the short versions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from faults.pgcluster import PgCluster
from faults.scenarios import ALL, Result


def table(result: Result) -> str:
    codes = ", ".join(f"{code} {n}" for code, n in result.codes.most_common()) or "-"
    recovery = "-" if result.recovery_s is None else f"{result.recovery_s:.2f} s"
    rows = [
        ("acknowledged", str(result.acknowledged)),
        ("lost", str(result.lost)),
        ("doubled", str(result.doubled)),
        ("recovery", recovery),
        ("clients saw", codes),
        *(("note", note) for note in result.notes),
        *(("FAILED", f) for f in result.failures),
        *(("MISSED", f) for f in result.timing_failures),
        ("verdict", f"{'pass' if result.passed else 'FAIL'} ({result.seconds:.0f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"== {result.name}", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    head = "| scenario | acknowledged | lost | doubled | recovery | clients saw | verdict |"
    rule = "|---|---:|---:|---:|---:|---|---|"
    rows = []
    for r in results:
        codes = ", ".join(f"{code} {n}" for code, n in r.codes.most_common()) or "-"
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f} s"
        rows.append(f"| {r.name} | {r.acknowledged} | {r.lost} | {r.doubled} | {recovery} | {codes} | "
                    f"{'pass' if r.passed else 'FAIL'} |")
    return "\n".join([head, rule, *rows])


def main() -> int:
    names = [name for name, _ in ALL]
    parser = argparse.ArgumentParser(prog="python -m faults", description="the fault scenarios")
    parser.add_argument("scenarios", nargs="*", choices=[[], *names], help=f"default: all ({', '.join(names)})")
    parser.add_argument("--quick", action="store_true", help="the short versions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chosen = [(n, f) for n, f in ALL if not args.scenarios or n in args.scenarios]
    results: list[Result] = []
    began = time.monotonic()
    with PgCluster.create() as pg:
        print(f"PostgreSQL {pg.bin_dir} on port {pg.port} ({pg.data_dir})", flush=True)
        for name, scenario in chosen:
            started = time.monotonic()
            try:
                result = scenario(pg, quick=args.quick)
            except Exception:  # noqa: BLE001 - one broken scenario does not hide the others' results
                result = Result(name, failures=[f"crashed: {traceback.format_exc(limit=4).strip()}"])
            result.seconds = time.monotonic() - started
            results.append(result)
            print(table(result), flush=True)
            if not pg.is_running():
                pg.start()
    print(f"\n{len(results)} scenarios in {time.monotonic() - began:.0f} s\n")
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "codes": dict(r.codes), "passed": r.passed}
                                         for r in results], indent=2))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
