"""The table, the JSON and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def table(results: dict) -> str:
    rows = results["scenarios"]
    floor = rows.get("floor_spread", {}).get("per_s") or 0
    header = f"{'scenario':<26} {'ops/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'x floor':>8}  note"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        if row.get("skipped"):
            lines.append(f"{name:<26} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {'-':>8}  {row['skipped']}")
            continue
        ratio = f"{row['per_s'] / floor:.2f}" if floor and row.get("throughput") else ""
        lines.append(
            f"{name:<26} {row['per_s']:>9.0f} {_ms(row['p50_ms'])} {_ms(row['p95_ms'])} {_ms(row['p99_ms'])} "
            f"{ratio:>8}  {row.get('note', '')}"
        )
    lines.extend(cpu_table(rows))
    lines.extend(probe_table(rows))
    lines.extend(scale_table(rows))
    lines.append("")
    for check in results.get("targets", []):
        lines.append(f"[{'met' if check['met'] else 'MISSED'}] {check['target']}: {check['value']}")
    return "\n".join(lines)


def cpu_table(rows: dict) -> list[str]:
    """Where each server scenario's CPU went (`bench.cpu`): a blank line and a table, or nothing."""
    return _side_table(
        rows, "cpu",
        f"{'CPU per operation':<26} {'server':>8} {'Postgres':>8} {'load gen':>8}   "
        f"{'server loop thread: running':>28} {'waiting for a CPU':>18} {'machine idle':>13}",
        lambda cpu: (f"{_num(cpu.get('server_ms_per_op'))} {_num(cpu.get('postgresql_ms_per_op'))} "
                     f"{_num(cpu.get('load_generator_ms_per_op'))}   {_share(cpu.get('server_loop_running'), 28)} "
                     f"{_share(cpu.get('server_loop_waiting_for_cpu'), 18)} {_share(cpu.get('machine_idle'), 13)}"),
        lambda _: "(ms of CPU per operation; the shares are of the measured time, for the server loop thread the mean "
                  "over the server processes)")


def probe_table(rows: dict) -> list[str]:
    """The disk under each scenario's load (`bench.database.CommitProbe`): a blank line and a table, or nothing."""
    return _side_table(
        rows, "commit_probe",
        f"{'commit probe under load':<26} {'commits':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'over 20 ms':>11} {'over 50 ms':>11}",
        lambda p: (f"{p['commits']:>8} {_ms(p['p50_ms'])} {_ms(p['p99_ms'])} {_ms(p['max_ms'])} "
                   f"{p['over_20ms']:>11} {p['over_50ms']:>11}"),
        lambda first: (f"(one row committed every {first['interval_ms']} ms on a connection of its own while the "
                       "scenario ran; a commit that stalls holds every request in flight with it)"))


def scale_table(rows: dict) -> list[str]:
    """The data-scale scenarios beside the same work in bare SQL (`bench.scale`)."""
    found = {name: row for name, row in rows.items() if name.startswith("data_") and not row.get("skipped")}
    if not found:
        return []
    header = f"{'data scale vs bare SQL':<26} {'p50 ms':>9} {'SQL ms':>9} {'x SQL':>7}  detail"
    lines = ["", header, "-" * len(header)]
    for name, row in found.items():
        if "lines_per_s" in row:
            lines.append(f"{name:<26} {_ms(row['p50_ms']):>9} {'-':>9} {row['vs_sql']:>7.2f}  "
                         f"{row['lines_per_s']:,} lines/s (COPY {row['sql_lines_per_s']:,}/s), "
                         f"server RSS +{row['rss_growth_mb']} MB")
            continue
        sql = row.get("sql_ms")
        detail = (f"worst page p50 {row['worst_page_p50_ms']} ms (page {row['worst_page']} of {row['pages']})"
                  if "worst_page_p50_ms" in row else row.get("note", ""))
        lines.append(f"{name:<26} {_ms(row['p50_ms']):>9} {_ms(sql) if sql else '-':>9} "
                     f"{row.get('vs_sql', 0):>7.2f}  {detail}")
    lines.append("(one call at a time; x SQL: the service's p50 over the same work in bare SQL — for the export, "
                 "COPY's lines/s over the service's; bare settle books set-based in one statement, rolled back)")
    return lines


def _side_table(rows: dict, key: str, header: str, cells, footnote) -> list[str]:  # noqa: ANN001
    """A blank line and a table of the scenarios that have `key`, one line each (`cells` of the value),
    and `footnote` (of the first value); nothing if none has it."""
    found = {name: row[key] for name, row in rows.items() if row.get(key)}
    if not found:
        return []
    lines = ["", header, "-" * len(header)]
    lines.extend(f"{name:<26} {cells(value)}" for name, value in found.items())
    lines.append(footnote(next(iter(found.values()))))
    return lines


def _num(value: float | None) -> str:
    return f"{value:>8.3f}" if value is not None else f"{'-':>8}"


def _share(value: float | None, width: int) -> str:
    return f"{value:>{width}.0%}" if value is not None else f"{'-':>{width}}"


def _ms(value: float | None) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'-':>8}"


def targets(rows: dict) -> list[dict]:
    out: list[dict] = []

    def get(name: str, key: str):  # noqa: ANN202
        row = rows.get(name) or {}
        return None if row.get("skipped") else row.get(key)

    floor, spread, hot = get("floor_spread", "per_s"), get("pay_spread", "per_s"), get("pay_hot", "per_s")
    if floor and spread:
        out.append({"target": "Pay spread >= 1.2 x floor", "value": f"{spread / floor:.2f} x",
                    "met": spread / floor >= 1.2})
        p99 = get("pay_spread", "p99_ms")
        out.append({"target": "Pay spread p99 <= 50 ms", "value": f"{p99} ms", "met": p99 is not None and p99 <= 50})
    if spread and hot:
        out.append({"target": "Pay hot >= 0.9 x Pay spread", "value": f"{hot / spread:.2f} x",
                    "met": hot / spread >= 0.9})
    # accept-ahead stays while it buys >= 20 % on what it serves, on and off in one run: Pay or reads
    plain, reads, plain_reads = (get("pay_spread_no_accept_ahead", "per_s"), get("get_balance", "per_s"),
                                 get("get_balance_no_accept_ahead", "per_s"))
    gains = {name: on / off for name, on, off in (("Pay spread", spread, plain), ("GetBalance", reads, plain_reads))
             if on and off}
    if gains:
        out.append({"target": "accept-ahead buys >= 20 % (Pay spread or GetBalance)",
                    "value": ", ".join(f"{name} {gain:.2f} x" for name, gain in gains.items()),
                    "met": max(gains.values()) >= 1.2})
    spread2, hot2 = get("pay_spread_2proc", "per_s"), get("pay_hot_2proc", "per_s")
    if floor and spread2:
        p99 = get("pay_spread_2proc", "p99_ms")
        out.append({"target": "two processes: Pay spread >= 0.5 x floor", "value": f"{spread2 / floor:.2f} x",
                    "met": spread2 / floor >= 0.5})
        out.append({"target": "two processes: Pay spread p99 <= 50 ms", "value": f"{p99} ms",
                    "met": p99 is not None and p99 <= 50})
    if spread2 and hot2:
        out.append({"target": "two processes: Pay hot >= 0.9 x Pay spread", "value": f"{hot2 / spread2:.2f} x",
                    "met": hot2 / spread2 >= 0.9})
    for name in ("statement_first_page", "statement_deep_page"):
        p50 = get(name, "p50_ms")
        if p50 is not None:
            out.append({"target": f"{name} p50 <= 10 ms", "value": f"{p50} ms", "met": p50 <= 10})
    out.extend(scale_targets(rows))
    for name, limit in (("delivery_one_process", 20), ("delivery_two_processes", 50)):
        p99 = get(name, "p99_ms")
        if p99 is not None:
            out.append({"target": f"{name} p99 <= {limit} ms", "value": f"{p99} ms", "met": p99 <= limit})
    return out


def scale_targets(rows: dict) -> list[dict]:
    out: list[dict] = []
    for name, row in rows.items():
        if not name.startswith("data_") or row.get("skipped") or row.get("p50_ms") is None:
            continue
        p50 = row["p50_ms"]
        if name.startswith("data_settle") and row.get("organisations") == 10_000:
            out.append({"target": f"{name} <= 2 s", "value": f"{p50 / 1000:.2f} s", "met": p50 <= 2000})
        elif name == "data_export":
            out.append({"target": "data_export >= 100,000 lines/s", "value": f"{row['lines_per_s']:,} lines/s",
                        "met": row["lines_per_s"] >= 100_000})
            out.append({"target": "data_export server RSS growth <= 50 MB", "value": f"{row['rss_growth_mb']} MB",
                        "met": row["rss_growth_mb"] <= 50})
        elif name.startswith(("data_org_summary", "data_admin_summary")):
            out.append({"target": f"{name} p50 <= 100 ms", "value": f"{p50} ms", "met": p50 <= 100})
        elif name.startswith("data_list_balances"):
            worst = row["worst_page_p50_ms"]
            out.append({"target": f"{name} every page p50 <= 10 ms", "value": f"worst {worst} ms (page "
                        f"{row['worst_page']} of {row['pages']})", "met": worst <= 10})
    return out


def describe_probe(p: dict) -> str:
    return (f"{p['commits']} commits of one row in {p['duration_s']} s, p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, "
            f"max {p['max_ms']} ms; {p['over_20ms']} took over 20 ms, {p['over_50ms']} over 50 ms")


def write_json(results: dict, stem: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def draw_png(results: dict, stem: str) -> Path | None:
    """The chart, where the bench set (requirements-bench.lock: matplotlib) is installed; else None."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = {k: v for k, v in results["scenarios"].items() if not v.get("skipped") and v.get("p50_ms") is not None}
    data = {k: v for k, v in every.items() if k.startswith("data_")}
    rows = {k: v for k, v in every.items() if k not in data}
    names = list(rows)
    panels = bool(rows) + bool(data)
    fig, axes = plt.subplots(panels, 1, figsize=(max(8, 1.1 * max(len(names), len(data)) + 2), 5 * panels),
                             squeeze=False)
    if data:
        _draw_scale(axes[-1][0], data, results)
    if not rows:
        return _save(fig, plt, stem)
    ax = axes[0][0]
    width = 0.27
    for i, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        xs = [n + (i - 1) * width for n in range(len(names))]
        ax.bar(xs, [max(rows[n][key], 0.01) for n in names], width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        [f"{n}\n{rows[n]['per_s']:.0f}/s" for n in names], rotation=30, ha="right", fontsize=8
    )
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Cobalt Payments latency percentiles per scenario ({results['mode']} run, {results['started_at']})")
    ax.legend()
    return _save(fig, plt, stem)


def _save(fig, plt, stem: str) -> Path:  # noqa: ANN001
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SCALE_TARGET_MS = (("data_settle", 2000), ("data_org_summary", 100), ("data_admin_summary", 100),
                    ("data_list_balances", 10))


def _draw_scale(ax, data: dict, results: dict) -> None:  # noqa: ANN001
    """The data-scale scenarios: the service's p50 beside bare SQL's, and each target."""
    names = list(data)
    width = 0.38
    xs = range(len(names))
    service = [max(data[n].get("worst_page_p50_ms", data[n]["p50_ms"]), 0.01) for n in names]
    sql = [max(data[n].get("sql_ms") or 0, 0.01) if "lines_per_s" not in data[n] else
           max(data[n]["p50_ms"] / data[n]["vs_sql"], 0.01) for n in names]
    ax.bar([x - width / 2 for x in xs], service, width, label="service p50 (list: worst page)")
    ax.bar([x + width / 2 for x in xs], sql, width, label="bare SQL (export: COPY)")
    for x, name in zip(xs, names, strict=True):
        limit = next((ms for prefix, ms in _SCALE_TARGET_MS if name.startswith(prefix)), None)
        if name.startswith("data_settle") and data[name].get("organisations") != 10_000:
            limit = None
        if limit is not None:
            ax.hlines(limit, x - 0.45, x + 0.45, colors="red", linestyles="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale); red dashes: target")
    ax.set_xticks(list(xs))
    labels = []
    for n in names:
        extra = f"{data[n]['lines_per_s']:,} lines/s, RSS +{data[n]['rss_growth_mb']} MB" if "lines_per_s" in data[n] \
            else f"x SQL {data[n].get('vs_sql', '-')}"
        labels.append(f"{n}\n{extra}")
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"Data scale: administrators' work as the books grow ({results['mode']} run)")
    ax.legend()
