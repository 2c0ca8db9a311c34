"""The workload benchmark's table and plot."""

from __future__ import annotations

import importlib
from pathlib import Path

from tabulate import tabulate

from calm_cli.errors import UsageError


def _delta(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.0f}%" if base else "n/a"


def table(result: dict) -> str:
    systems = result["systems"]
    base = next(s for s in systems if s["baseline"])
    rows = []
    for s in systems:
        rows.append([s["name"] + (" [baseline]" if s["baseline"] else ""), s["quality"],
                     f"{s['quality'] / base['quality'] * 100:.0f}%" if base["quality"] else "n/a",
                     s["latency_p50_ms"], s["latency_p95_ms"], _delta(s["latency_mean_ms"], base["latency_mean_ms"]),
                     s["energy_j_per_query"], _delta(s["energy_j_per_query"], base["energy_j_per_query"]),
                     s["cache_hit_rate"], s["escalation_rate"], s["peak_memory_mb"],
                     s["latency_goal_violations"]])
    out = tabulate(rows, headers=["system", "quality", "of baseline", "p50 ms", "p95 ms", "mean latency",
                                  "J/query", "energy", "cache hits", "escalated", "peak MB", "latency goal misses"],
                   floatfmt=".3f")
    domains = sorted({d for s in systems for d in s["quality_by_domain"]})
    out += "\n\n" + tabulate([[s["name"], *[s["quality_by_domain"].get(d) for d in domains]] for s in systems],
                             headers=["quality by domain", *domains], floatfmt=".2f")
    if any(s["energy_estimated"] for s in systems):
        out += "\n\nenergy is estimated (CPU-seconds x CALM_WATTS_PER_CORE; no NVML energy counter on this machine)"
    for name, scenario in result.get("scenarios", {}).items():
        out += f"\n\nscenario {name}:\n" + "\n".join(f"  {k}: {v}" for k, v in scenario.items())
    return out


class PlotUnavailable(UsageError):
    """--plot without matplotlib: said before the run, not after it."""


def check_plot() -> None:
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(f"--plot needs matplotlib ({exc}): pip install -e '.[plot]'") from exc


def plot(result: dict, path: Path) -> None:
    """Quality against latency and against energy, one point per system (matplotlib, the [plot] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "latency_mean_ms", "mean latency per query (ms)"),
                           (axes[1], "energy_j_per_query", "energy per query (J)")):
        for s in result["systems"]:
            marker = "*" if s["name"].startswith("calm") else "s" if s["baseline"] else "o"
            ax.scatter(s[key], s["quality"], marker=marker, s=120 if marker == "*" else 50)
            ax.annotate(s["name"], (s[key], s["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        sweep = result.get("sweep", [])
        if sweep:
            points = sorted((p[key], p["quality"]) for p in sweep)
            ax.plot([p[0] for p in points], [p[1] for p in points], "--", alpha=0.6, label="calm, weight sweep")
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("quality (mean score)")
        ax.grid(alpha=0.3)
    estimated = " (energy estimated)" if any(s["energy_estimated"] for s in result["systems"]) else ""
    fig.suptitle(f"calm bench: {result.get('workload', {}).get('queries', '?')} queries{estimated}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def serve_table(result: dict) -> str:
    """`calm bench serve`'s three measurements as tables: ratios first, with their intervals."""
    lines: list[str] = []
    if "batching" in result:
        lines += _batching_lines(result["batching"])
    if "arrivals" in result:
        lines += _arrival_lines(result["arrivals"])
    if "http" in result:
        h = result["http"]
        lines.append(_overhead_line("http", h, f"{h['direct_p50_ms']} ms in-process",
                                    f"{h['http_p50_ms']} ms through calm serve"))
    if "remote" in result:
        r = result["remote"]
        lines.append(_overhead_line("remote member", r, f"{r['local_p50_ms']} ms in the router",
                                    f"{r['remote_p50_ms']} ms through a remote member (calm serve on loopback)"))
    return "\n".join(lines)


def _overhead_line(label: str, part: dict, without: str, through: str) -> str:
    """A paired overhead measurement: both p50s and the added p50 with its interval."""
    added, lo, hi = part["added_p50_ms"]
    return (f"{label}: {part['requests']} requests to {part['member']} each way: p50 {without}, {through}; "
            f"added p50 {added:.2f} ms (95% interval {lo:.2f}-{hi:.2f})")


def _batching_lines(b: dict) -> list[str]:
    med, lo, hi = b["speedup"]
    return [f"batching: {b['requests']} greedy questions to {b['member']}, max_tokens {b['max_tokens']}, "
             f"{len(b['rounds'])} round(s): all at once {med:.2f}x faster than one by one "
             f"(median; range {lo:.2f}-{hi:.2f})",
             tabulate([[i + 1, r["sequential_s"], r["together_s"], r["speedup"], r["tokens"],
                        f"{r['same_answers']}/{b['requests']}", r["errors"]] for i, r in enumerate(b["rounds"])],
                      headers=["round", "one by one s", "together s", "speedup", "tokens", "same answers",
                               "errors"]), ""]


def _arrival_lines(runs: list[dict]) -> list[str]:
    rows = []
    for a in runs:
        label = "all at once" if a["rate"] is None else f"{a['rate']}/s"
        for name in ("single-stream", "scheduler"):
            s = a[name]
            rows.append([label, name, s["requests"], s["errors"], s["mean_ms"], s["p50_ms"], s["p95_ms"],
                         s["per_minute"], s["wall_s"]])
        ratio, lo, hi = a["mean_latency_ratio"]
        rows.append([label, "scheduler / single", "", "", f"{ratio:.2f} ({lo:.2f}-{hi:.2f})", "", "",
                     f"{a['throughput_ratio']:.2f}x", ""])
    return [f"arrivals ({runs[0]['requests']} questions; mean latency ratio with its 95% bootstrap interval)",
            tabulate(rows, headers=["arrivals", "system", "requests", "errors", "mean ms", "p50 ms", "p95 ms",
                                    "per minute", "wall s"]), ""]
