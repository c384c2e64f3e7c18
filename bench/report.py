"""The printed table, the JSON files and the chart of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = ("direct", "gateway", "gateway_2w", "litellm")
LABELS = {
    "direct": "direct (nginx)",
    "gateway": "gateway, 1 worker",
    "gateway_2w": "gateway, 2 workers",
    "litellm": "LiteLLM proxy, 1 worker",
}
SHORT = {"direct": "direct", "gateway": "gateway", "gateway_2w": "gateway 2 workers",
         "litellm": "LiteLLM"}  # fmt: skip
KINDS = {
    "plain": "plain, cache miss",
    "hit": "plain, cache hit",
    "stream": "stream, cache miss",
    "stream_hit": "stream, cache hit",
}


def _cell(result: dict[str, Any] | None, stream: bool) -> str:
    if not result:
        return f"{'-':>8} {'-':>7} {'-':>7}" + (f" {'-':>7}" if stream else "")
    text = f"{result['rps']:8.0f} {result['p50_ms']:7.2f} {result['p99_ms']:7.2f}"
    if stream:
        text += f" {result['ttfb_p50_ms']:7.2f}"
    return text


def table(results: dict[str, Any]) -> str:
    present = [t for t in TARGETS if any(row.get(t) for row in results["rows"])]
    lines = []
    for kind, title in KINDS.items():
        rows = [row for row in results["rows"] if row["kind"] == kind]
        if not rows:
            continue
        stream = kind.startswith("stream")
        unit = "rps p50ms p99ms ttfb50" if stream else "rps p50ms p99ms"
        lines += ["", f"{title}  (each column: {unit}; latency = time to last byte)"]
        names = [SHORT[t] for t in present]
        header = f"{'c':>3} | " + " | ".join(f"{n:^{33 if stream else 25}}" for n in names)
        lines += [header + " | gw/direct rps | +p50 ms | gw cpu ms/req | other load"]
        for row in rows:
            cells = " | ".join(_cell(row.get(t), stream) for t in present)
            other = max(row[t]["other_cores"] for t in TARGETS if row.get(t))
            lines.append(
                f"{row['concurrency']:>3} | {cells} | {row['ratio_rps']:13.4f} | "
                f"{row['added_p50_ms']:7.2f} | {row['gateway_cpu_ms']:13.2f} | "
                f"{other:5.2f} cores"
            )
    return "\n".join(lines)


def one_core_table(results: dict[str, Any]) -> str:
    if "one_core" not in results:
        return ""
    lines = ["", "c=1, the gateway on the same core as Redis, nginx and the load generator"]
    lines.append(f"  {'row':<20} {'direct p50 ms':>13} {'gateway p50 ms':>14} {'+p50 ms':>8}")
    for row in results["one_core"]:
        lines.append(
            f"  {KINDS[row['kind']]:<20} {row['direct']['p50_ms']:13.3f} "
            f"{row['gateway']['p50_ms']:14.3f} {row['added_p50_ms']:8.3f}"
        )
    return "\n".join(lines)


def redis_table(redis: dict[str, Any]) -> str:
    lines = ["", "Redis per completed request (round trips = commands the gateway sent)"]
    for kind, stats in redis.items():
        sent = ", ".join(f"{n} {v:g}" for n, v in stats["sent_per_request"].items())
        lines.append(f"  {KINDS[kind]:<20} {stats['round_trips_per_request']:5.2f}  ({sent})")
        scripted = ", ".join(f"{n} {v:g}" for n, v in stats["scripted_per_request"].items())
        lines.append(f"  {'':<20} inside scripts: {scripted}")
    return "\n".join(lines)


def memory_table(memory: dict[str, Any]) -> str:
    lines = ["", f"Long run: {memory['requests']} requests, c={memory['concurrency']}"]
    lines.append(f"  {'requests':>9}  {'worker RSS MiB':>14}  {'redis MiB':>9}  per-key state")
    for sample in memory["samples"]:
        rss = "/".join(f"{kib / 1024:.1f}" for kib in sample["rss_kib"])
        key = sample["key"]
        lines.append(
            f"  {sample['requests']:>9}  {rss:>14}  {sample['redis_used_memory'] / 2**20:9.1f}"
            f"  usage records {key['usage_records']}, reservations {key['reservations']}, "
            f"leases {key['leases']}, cache entries {key['cache_entries']}"
        )
    return "\n".join(lines)


def write(results: dict[str, Any], commit_copies: bool) -> list[Path]:
    """bench/results/latest.json, the chart, and (full runs) copies for the README."""
    RESULTS.mkdir(exist_ok=True)
    latest = RESULTS / "latest.json"
    latest.write_text(json.dumps(results, indent=2) + "\n")
    written = [latest]
    chart = RESULTS / "chart.png"
    if draw(results, chart):
        written.append(chart)
    if commit_copies:
        shutil.copyfile(latest, HERE / "results.json")
        written.append(HERE / "results.json")
        if chart.exists():
            shutil.copyfile(chart, HERE / "chart.png")
            written.append(HERE / "chart.png")
    return written


def draw(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is missing (pip install -e '.[bench]')")
        return False
    kinds = [k for k in KINDS if any(r["kind"] == k for r in results["rows"])]
    figure, axes = plt.subplots(2, len(kinds), figsize=(4.5 * len(kinds), 8), squeeze=False)
    for column, kind in enumerate(kinds):
        rows = [r for r in results["rows"] if r["kind"] == kind]
        _bars(axes[0][column], rows, lambda r: r["rps"], KINDS[kind], "requests/s (log)")
        _latency(axes[1][column], rows, "p50 (solid) / p99 (hatched) ms, log")
    figure.suptitle(results["meta"]["title"], fontsize=10)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles))
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _present(rows: list[dict[str, Any]]) -> list[str]:
    return [t for t in TARGETS if any(r.get(t) for r in rows)]


def _bars(ax: Any, rows: list[dict[str, Any]], value: Any, title: str, label: str) -> None:
    targets = _present(rows)
    width = 0.8 / len(targets)
    for i, target in enumerate(targets):
        xs = [j + i * width for j, r in enumerate(rows) if r.get(target)]
        ys = [value(r[target]) for r in rows if r.get(target)]
        bars = ax.bar(xs, ys, width, label=LABELS[target], color=f"C{TARGETS.index(target)}")
        ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=6)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"c={r['concurrency']}" for r in rows])
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(label, fontsize=8)


def _latency(ax: Any, rows: list[dict[str, Any]], label: str) -> None:
    targets = _present(rows)
    width = 0.8 / len(targets)
    for i, target in enumerate(targets):
        xs = [j + i * width for j, r in enumerate(rows) if r.get(target)]
        color = f"C{TARGETS.index(target)}"
        p99 = [r[target]["p99_ms"] for r in rows if r.get(target)]
        p50 = [r[target]["p50_ms"] for r in rows if r.get(target)]
        ax.bar(xs, p99, width, color=color, alpha=0.35, hatch="//", edgecolor=color)
        ax.bar(xs, p50, width, color=color, label=LABELS[target])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"c={r['concurrency']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel(label, fontsize=8)


def _row(results: dict[str, Any], kind: str, concurrency: int) -> dict[str, Any]:
    for row in results["rows"]:
        if row["kind"] == kind and row["concurrency"] == concurrency:
            return dict(row)
    return {}


def _cpu_ratio(row: dict[str, Any]) -> float:
    """LiteLLM's CPU per request over the gateway's: less swayed by other load than rps."""
    return float(row["litellm"]["cpu_ms_per_request"] / row["gateway"]["cpu_ms_per_request"])


def targets(results: dict[str, Any]) -> str:
    """The performance targets, side by side with what this run measured (no pass/fail)."""
    plain1, stream1 = _row(results, "plain", 1), _row(results, "stream", 1)
    redis, memory = results["redis"], results["memory"]
    lines = ["", "Performance targets, as measured in this run:"]
    lines.append(
        f"  added latency, p50 at c=1 (target <= 1 ms): plain {plain1['added_p50_ms']:.2f} ms, "
        f"stream TTFB {stream1['added_ttfb_p50_ms']:.2f} ms, "
        f"cache hit {_row(results, 'hit', 1)['added_p50_ms']:.2f} ms"
    )
    if "one_core" in results:
        shared = {row["kind"]: row for row in results["one_core"]}
        lines.append(
            f"    the same with the gateway on the load's core: plain "
            f"{shared['plain']['added_p50_ms']:.2f} ms, stream TTFB "
            f"{shared['stream']['added_ttfb_p50_ms']:.2f} ms, cache hit "
            f"{shared['hit']['added_p50_ms']:.2f} ms"
        )
    trips = ", ".join(f"{KINDS[k]} {v['round_trips_per_request']:.2f}" for k, v in redis.items())
    lines.append(f"  Redis round trips per request (target 2, hits <= 2): {trips}")
    versus = [
        f"c={row['concurrency']} {row['kind']} {row['gateway_vs_litellm_rps']:.1f}x "
        f"(CPU per request {_cpu_ratio(row):.1f}x)"
        for row in results["rows"]
        if "gateway_vs_litellm_rps" in row
    ]
    lines.append(
        "  1 worker vs LiteLLM, throughput (target >= 10x): "
        + (", ".join(versus) or results["meta"]["litellm"])
    )
    rss = ", ".join(f"{kib / 1024:+.1f} MiB" for kib in memory["rss_growth_kib"])
    lines.append(
        f"  over {memory['requests']} requests: worker RSS {rss}; Redis "
        f"{memory['redis_growth_bytes'] / 2**20:+.1f} MiB, of which usage records "
        f"{memory['redis_growth_usage_records_bytes'] / 2**20:+.1f} MiB, settled marks "
        f"{memory['redis_growth_settled_marks_bytes'] / 2**20:+.1f} MiB, other "
        f"{memory['redis_growth_other_bytes'] / 2**20:+.1f} MiB"
    )
    if memory["cut_by_time"]:
        lines.append(
            f"  (the long run stopped at its time cap, {memory['requests']} of {memory['asked']})"
        )
    return "\n".join(lines)
