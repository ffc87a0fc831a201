"""The funnel of a prepare run: stats.json from the shards' markers, a table and funnel.png."""

from __future__ import annotations

import io
import os
from collections import Counter
from typing import Any

from pipeline import storage
from pipeline.data.untrusted import plot_label, printable

STAGES = ("input", "download", "filter", "tokenize")
TOP_DOMAINS = 10


def build_stats(markers: list[dict[str, Any]], run_seconds: float, rows_run: int) -> dict:
    """The whole list's funnel, summed over every shard's marker.

    `rows_run` rows went through this invocation in `run_seconds` (a resumed run skips the
    rest), which gives the rate.
    """
    drops = {s: Counter() for s in STAGES}
    seconds: Counter[str] = Counter()
    domains: dict[str, Counter[str]] = {}
    rows = samples = 0
    for m in markers:
        rows += m["rows"]
        samples += m["samples"]
        for stage, reasons in m["drops"].items():
            drops[stage].update(reasons)
        seconds.update(m["seconds"])
        for domain, reasons in m["domains"].items():
            domains.setdefault(domain, Counter()).update(reasons)
    stages, alive = {}, rows
    for stage in STAGES:
        dropped = sum(drops[stage].values())
        stages[stage] = {
            "rows_in": alive,
            "rows_out": alive - dropped,
            "drops": dict(drops[stage].most_common()),
            "seconds": round(seconds[stage], 3),
        }
        alive -= dropped
    if alive != samples:
        raise RuntimeError(f"funnel lost rows: {alive} alive, {samples} written")
    failing = sorted(domains.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:TOP_DOMAINS]
    return {
        "rows_in": rows,
        "samples": samples,
        "rejects": rows - samples,
        "shards": sum(1 for m in markers if m["samples"]),
        "stages": stages,
        "failing_domains": [
            {"domain": d, "failures": sum(r.values()), "reasons": dict(r.most_common())}
            for d, r in failing
        ],
        "rows_this_run": rows_run,
        "wall_seconds": round(run_seconds, 3),
        "images_per_second": round(rows_run / max(run_seconds, 1e-9), 1),
    }


def format_funnel(stats: dict[str, Any]) -> str:
    """The funnel as a small text table for the terminal."""
    lines = [f"{'stage':<10} {'in':>7} {'out':>7}  drops"]
    for stage, s in stats["stages"].items():
        drops = ", ".join(f"{r} {n}" for r, n in s["drops"].items()) or "-"
        lines.append(f"{stage:<10} {s['rows_in']:>7} {s['rows_out']:>7}  {drops}")
    if stats.get("failing_domains"):
        lines.append(
            "top failing domains: "
            + ", ".join(
                f"{printable(d['domain'])} {d['failures']}" for d in stats["failing_domains"][:5]
            )
        )
    lines.append(
        f"{stats['samples']} samples in {stats['shards']} shards, {stats['rejects']} rejects; "
        f"{stats['rows_this_run']} rows this run at {stats['images_per_second']} rows/s"
    )
    if stats.get("paths", {}).get("funnel_png"):
        lines.append(f"funnel chart: {stats['paths']['funnel_png']}")
    return "\n".join(lines)


def plot_funnel(stats: dict[str, Any], path: str | os.PathLike) -> None:
    """funnel.png: rows out per stage, drops by reason, top failing domains."""
    # A Figure of its own, not pyplot: no global backend or figure registry (no display on
    # workers and CI; savefig renders PNG with Agg).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), constrained_layout=True)
    axes = fig.subplots(1, 3)
    stages = list(stats["stages"])
    outs = [stats["stages"][s]["rows_out"] for s in stages]
    ax = axes[0]
    ax.barh(stages[::-1], outs[::-1], color="tab:green")
    ax.set_title(f"rows out per stage (of {stats['rows_in']} in)")
    for y, v in enumerate(outs[::-1]):
        ax.text(v, y, f" {v}", va="center")

    reasons = [
        (plot_label(f"{s}: {r}", 40), n)
        for s in stages
        for r, n in stats["stages"][s]["drops"].items()
    ]
    reasons.sort(key=lambda rn: rn[1])
    ax = axes[1]
    ax.barh([r for r, _ in reasons] or ["(none)"], [n for _, n in reasons] or [0], color="tab:red")
    ax.set_title(f"drops by reason ({stats['rejects']} rejects)")

    domains = stats.get("failing_domains", [])[::-1]
    ax = axes[2]
    # Host names come from the URL list: shown as text, never parsed as mathtext.
    labels = [plot_label(d["domain"], 40) for d in domains]
    ax.barh(labels or ["(none)"], [d["failures"] for d in domains] or [0])
    ax.set_title("top failing domains (download)")
    fig.suptitle(
        f"{stats['samples']} samples; {stats['images_per_second']} rows/s this run", fontsize=11
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    storage.write_bytes(path, buf.getvalue())  # whole: a reader never sees half a chart
