"""What a sweep left in RUN/sweep, made readable: leaderboard, report.html, TensorBoard hparams.

Reads only the files the sweep writes (sweep_config.json and each trial's history.jsonl), so
it runs without Ray, on a sweep still running or one whose driver died, and its functions are
tested on synthetic histories.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.rundir import write_json_atomic

METRIC = "zeroshot_top1"
HISTORY = "history.jsonl"
CONFIG_FILE = "sweep_config.json"
HEATMAP_PNG = "heatmap.png"
CURVES_PNG = "curves.png"
REPORT_HTML = "report.html"
LEADERBOARD_JSON = "leaderboard.json"
TENSORBOARD = "tensorboard"  # RUN/sweep/tensorboard/<trial>: the hparams sessions
STOP_KEYS = ("rung", "value", "cutoff", "se", "bar")


# -- reading a sweep ---------------------------------------------------------------------------
def read_trial(history: str | Path, max_steps: int) -> dict[str, Any]:
    """One trial from its history.jsonl: knobs, reports (one per step, the latest kept), status.

    status: completed (reached max_steps), stopped (ended early: its scheduler cut it), error,
    paused (waiting at a rung for the other trials), or running (no end recorded: still
    running, or the driver died and a rerun will resume it). events: the scheduler's pauses,
    promotions, stops and resumes, each with its step (and at a judged rung the trial's value,
    the cutoff, the probe's standard error and the bar it had to reach).
    """
    trial_dir = storage.name(storage.parent(history))
    params, hparams, end, trial_id = {}, {}, None, trial_dir
    by_step: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    waiting = False
    for line in storage.read_text(history).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed driver
            continue
        if "event" in record:
            events.append(record)
            waiting = record["event"] in ("paused", "promoted")
        elif "params" in record:
            params, hparams = record["params"], record.get("hparams", {})
            trial_id = record.get("trial_id", trial_id)
            waiting = False
        elif "end" in record:
            end = record["end"]
        elif "step" in record:
            # A resumed trial reports again from its checkpoint: the newest report wins.
            by_step[int(record["step"])] = record
    reports = [by_step[s] for s in sorted(by_step)]
    steps = reports[-1]["step"] if reports else 0
    if end == "error":
        status = "error"
    elif steps >= max_steps:
        status = "completed"
    elif end == "complete":
        status = "stopped"
    elif waiting:
        status = "paused"
    else:
        status = "running"
    stop = next((e for e in reversed(events) if e["event"] == "stopped"), None)
    scored = [r for r in reports if r.get(METRIC) is not None]
    checkpoints = [r["checkpoint_path"] for r in reports if r.get("checkpoint_path")]
    last = reports[-1] if reports else {}
    return {
        "trial_id": trial_id,
        "dir": trial_dir,
        "params": params,
        "hparams": hparams,
        "status": status,
        "steps": steps,
        "final_top1": scored[-1][METRIC] if scored else None,
        "best_top1": max(r[METRIC] for r in scored) if scored else None,
        "final_loss": last.get("loss"),
        # The learned temperature where it ended (1 / logit scale).
        "final_temperature": 1.0 / last["logit_scale"] if last.get("logit_scale") else None,
        "checkpoint": checkpoints[-1] if checkpoints else None,
        # The rung decision that stopped it: its value there and the bar it missed.
        "stopped_at": None if stop is None else {k: stop.get(k) for k in STOP_KEYS},
        "events": events,
        "history": reports,
    }


def read_sweep(sweep_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the saved sweep config, its trials ranked best first) from a sweep folder."""
    config_path = storage.join(sweep_dir, CONFIG_FILE)
    if not storage.exists(config_path):
        raise FileNotFoundError(f"no sweep in {sweep_dir}: {CONFIG_FILE} is missing")
    config = storage.read_json(config_path)
    max_steps = int(config["sweep"]["max_steps"])
    trials = [read_trial(h, max_steps) for h in storage.glob(sweep_dir, f"*/{HISTORY}")]
    return config, rank(trials)


def rank(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: the last measured top-1, then the longer-trained, then the trial id."""

    def key(t: dict[str, Any]):
        top1 = t["final_top1"]
        return (top1 is None, -(top1 or 0.0), -t["steps"], t["trial_id"])

    return sorted(trials, key=key)


def winner(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best-ranked trial whose checkpoint is still there, or None."""
    for t in trials:
        if t["status"] != "error" and t["checkpoint"] and storage.exists(t["checkpoint"]):
            return t
    return None


# -- the terminal leaderboard ------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


LEADERBOARD_COLUMNS = (
    "#", "trial", "temp", "learn", "batch", "lr", "seed", "steps", "status", "top1", "best",
    "end temp", "loss", "stopped: top1 < bar",
)  # fmt: skip


def _missed(t: dict[str, Any]) -> str:
    stop = t.get("stopped_at")
    if not stop:
        return "-"
    return f"@{stop['rung']}: {_pct(stop['value'])} < {_pct(stop['bar'])}"


def leaderboard_rows(trials: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for i, t in enumerate(trials, 1):
        hp = t["hparams"]
        rows.append(
            [
                str(i),
                t["trial_id"],
                _num(hp.get("temperature"), ".3g"),
                {True: "yes", False: "no"}.get(hp.get("learn_temperature"), "-"),
                str(hp.get("batch_size", "-")),
                _num(hp.get("lr"), ".2e"),
                str(hp.get("seed", "-")),
                str(t["steps"]),
                t["status"],
                _pct(t["final_top1"]),
                _pct(t["best_top1"]),
                _num(t["final_temperature"], ".3g"),
                _num(t["final_loss"], ".3f"),
                _missed(t),
            ]
        )
    return rows


def format_leaderboard(trials: list[dict[str, Any]], sweep_dir: str | Path | None = None) -> str:
    """The leaderboard as an aligned text table, best first, with the step counts spent."""
    rows = [list(LEADERBOARD_COLUMNS), *leaderboard_rows(trials)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(LEADERBOARD_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    stopped = sum(t["status"] == "stopped" for t in trials)
    spent = sum(t["steps"] for t in trials)
    paused = sum(t["status"] == "paused" for t in trials)
    head = f"{len(trials)} trials, {stopped} stopped early, {spent} training steps"
    if paused:
        head += f", {paused} paused at a rung"
    if sweep_dir is not None:
        head = f"sweep {sweep_dir}: {head}"
    best = winner(trials)
    tail = (
        f"winner: {best['trial_id']} (top1 {_pct(best['final_top1'])} at step {best['steps']})"
        if best
        else "winner: none yet"
    )
    return "\n".join([head, *lines, tail])


# -- pictures -----------------------------------------------------------------------------------
def _temperature_labels(temperatures: list[float]) -> tuple[list[str], list[int]]:
    """Row labels and each trial's row: the values themselves, or log bins when drawn at random."""
    distinct = sorted(set(temperatures))
    if len(distinct) <= 8:
        return [f"{t:.3g}" for t in distinct], [distinct.index(t) for t in temperatures]
    low, high = math.log(distinct[0]), math.log(distinct[-1])
    bins = 6
    edges = [math.exp(low + (high - low) * i / bins) for i in range(bins + 1)]
    rows = [min(int((math.log(t) - low) / (high - low) * bins), bins - 1) for t in temperatures]
    return [f"{edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(bins)], rows


def plot_heatmap(trials: list[dict[str, Any]], path: Path) -> Path:
    """Best last top-1 per (initial temperature, batch size), over the other knobs."""
    import numpy as np
    from matplotlib.figure import Figure

    scored = [t for t in trials if t["final_top1"] is not None and t["hparams"]]
    batches = sorted({t["hparams"]["batch_size"] for t in scored})
    labels, rows = _temperature_labels([t["hparams"]["temperature"] for t in scored])
    grid = np.full((len(labels), len(batches)), np.nan)
    for t, r in zip(scored, rows, strict=True):
        c = batches.index(t["hparams"]["batch_size"])
        grid[r, c] = np.nanmax([grid[r, c], 100 * t["final_top1"]])
    fig = Figure(figsize=(1.6 + 1.3 * max(len(batches), 1), 1.4 + 0.55 * max(len(labels), 1)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0)
    top = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
    for r in range(len(labels)):
        for c in range(len(batches)):
            text = "-" if np.isnan(grid[r, c]) else f"{grid[r, c]:.1f}"
            # Dark text on viridis' light (high) end, light text on its dark end.
            colour = "black" if grid[r, c] > 0.6 * top else "white"
            ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("initial temperature")
    ax.set_title("best zero-shot top-1 (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_curves(trials: list[dict[str, Any]], path: Path) -> Path:
    """Zero-shot top-1 and loss against step for every trial, with the scheduler's decisions:
    a hollow circle where a trial was paused at a rung, a triangle where it was promoted, an x
    where it was stopped (ASHA's stops, which leave no event, at the trial's last probe)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for t in trials:
        hp = t["hparams"]
        label = f"{t['trial_id']} T={hp.get('temperature', 0):.3g} B={hp.get('batch_size')}"
        scored = [r for r in t["history"] if r.get(METRIC) is not None]
        steps = [r["step"] for r in scored]
        (line,) = acc_ax.plot(steps, [100 * r[METRIC] for r in scored], marker=".", label=label)
        colour = line.get_color()
        losses = [r for r in t["history"] if r.get("loss") is not None]
        # Dots too: a live sweep's trials may have one report so far, which a line does not show.
        loss_ax.plot(
            [r["step"] for r in losses], [r["loss"] for r in losses], color=colour, marker="."
        )
        at = {r["step"]: 100 * r[METRIC] for r in scored}
        marks = {
            "paused": ("o", 9, "none"),
            "promoted": ("^", 8, colour),
            "stopped": ("x", 11, colour),
        }
        for e in t.get("events", []):
            if e["event"] in marks and e.get("rung", e.get("step")) in at:
                marker, size, face = marks[e["event"]]
                step = e.get("rung", e.get("step"))
                acc_ax.plot(step, at[step], marker, color=colour, markerfacecolor=face,
                            markersize=size, markeredgewidth=2)  # fmt: skip
        if t["status"] == "stopped" and scored and not t.get("stopped_at"):
            acc_ax.plot(
                steps[-1], 100 * scored[-1][METRIC], "x", color=colour,
                markersize=11, markeredgewidth=2.5,
            )  # fmt: skip
    acc_ax.plot([], [], "ko", markerfacecolor="none", markersize=8, label="paused at a rung")
    acc_ax.plot([], [], "k^", markersize=8, label="promoted")
    acc_ax.plot([], [], "kx", markersize=9, label="stopped")
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("zero-shot top-1 on the validation folder (%)")
    acc_ax.legend(fontsize=7, loc="best")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("contrastive loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# -- TensorBoard hparams ----------------------------------------------------------------------
def write_hparams(trials: list[dict[str, Any]], tb_dir: Path) -> Path:
    """One TensorBoard run per trial: its knobs against its final metrics (the HPARAMS tab),
    and its zero-shot curve. Rewritten whole, so a resumed sweep lists each trial once."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    final_dir, tb_dir = tb_dir, tb_dir.with_name(tb_dir.name + ".new")
    shutil.rmtree(tb_dir, ignore_errors=True)
    tb_dir.mkdir(parents=True)
    for t in trials:
        if not t["hparams"]:
            continue
        hp = dict(t["hparams"])
        hp["status"] = t["status"]
        metrics = {
            "hparams/final_top1": t["final_top1"],
            "hparams/best_top1": t["best_top1"],
            "hparams/steps": float(t["steps"]),
            "hparams/final_loss": t["final_loss"],
            "hparams/final_temperature": t["final_temperature"],
        }
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        with SummaryWriter(str(tb_dir / t["trial_id"])) as writer:
            for r in t["history"]:
                if r.get(METRIC) is not None:
                    writer.add_scalar(f"sweep/{METRIC}", r[METRIC], r["step"])
            experiment, start, end = hparams(hp, metrics)
            for summary in (experiment, start, end):
                writer.file_writer.add_summary(summary)
            # The HPARAMS tab reads each metric as the run's scalar of that tag.
            for name, value in metrics.items():
                writer.add_scalar(name, value, t["steps"])
    # Rewritten whole as the sweep runs: the new set replaces the old in two renames.
    old = final_dir.with_name(final_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(old)
    tb_dir.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final_dir


# -- report.html --------------------------------------------------------------------------------
def _html_table(trials: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in LEADERBOARD_COLUMNS)
    body = []
    for t, row in zip(trials, leaderboard_rows(trials), strict=True):
        cls = ' class="winner"' if best is not None and t is best else ""
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _decisions_html(trials: list[dict[str, Any]]) -> str:
    """The rung decisions: each trial's top-1 there, the cutoff, the probe's standard error and
    the bar (cutoff minus the kept margin) that decided whether it went on."""
    rows = []
    for t in trials:
        for e in t.get("events", []):
            if e["event"] in ("promoted", "stopped"):
                cells = [t["trial_id"], str(e["rung"]), _pct(e["value"]), _pct(e["cutoff"]),
                         _pct(e["se"]), _pct(e["bar"]), e["event"]]  # fmt: skip
                rows.append((e["rung"], -e["value"], cells))
    if not rows:
        return ""
    head = "".join(
        f"<th>{c}</th>" for c in ("trial", "rung", "top1", "cutoff", "probe SE", "bar", "decision")
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for _, _, cells in sorted(rows, key=lambda r: r[:2])
    )
    return (
        "<h2>Rung decisions</h2><p>A trial goes on when its top-1 at the rung is at least the bar: "
        "the cutoff (the top 1/reduction-factor) less the probe's standard error.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def write_report(sweep_dir: str | Path) -> dict[str, Any]:
    """Write report.html with its PNGs, the hparams runs and leaderboard.json; return a summary."""
    sweep_dir = storage.normalize(sweep_dir)
    config, trials = read_sweep(sweep_dir)
    best = winner(trials)
    sweep = config["sweep"]
    stopped = sum(t["status"] == "stopped" for t in trials)
    paused = sum(t["status"] == "paused" for t in trials)
    running = sum(t["status"] == "running" for t in trials)
    spent = sum(t["steps"] for t in trials)
    winner_line = (
        f"Winner: <b>{html.escape(best['trial_id'])}</b> "
        f"{html.escape(json.dumps(best['hparams']))}, zero-shot top-1 "
        f"{_pct(best['final_top1'])} at step {best['steps']}."
        if best
        else "No trial has a checkpoint yet."
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep report: {html.escape(str(sweep_dir))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #bbb; padding: 3px 8px; text-align: right; }}
tr.winner {{ background: #e6f4e6; font-weight: bold; }}
</style></head><body>
<h1>Sweep report</h1>
<p>{len(trials)} trials ({sweep["search"]} search, {sweep["scheduler"]} scheduler),
{stopped} stopped early, {paused} paused at a rung, {running} running,
{spent} training steps in all (at most {sweep["max_steps"]} each).
Ranked by zero-shot top-1 on the validation folder {html.escape(config["val_dataset"])}.</p>
<p>{winner_line}</p>
{_decisions_html(trials)}
<h2>Best accuracy by initial temperature and batch size</h2>
<img src="{HEATMAP_PNG}" alt="heatmap of the best zero-shot top-1">
<h2>Learning curves</h2>
<img src="{CURVES_PNG}" alt="zero-shot top-1 and loss of every trial against step">
<h2>Leaderboard</h2>
{_html_table(trials, best)}
<p>TensorBoard (the HPARAMS tab compares the trials):
<code>tensorboard --logdir {html.escape(str(sweep_dir))} --host 127.0.0.1</code></p>
</body></html>
"""
    summary = {
        "html": storage.join(sweep_dir, REPORT_HTML),
        "pngs": [storage.join(sweep_dir, HEATMAP_PNG), storage.join(sweep_dir, CURVES_PNG)],
        "tensorboard": storage.join(sweep_dir, TENSORBOARD),
        "trials": len(trials),
        "stopped_early": stopped,
        "steps_total": spent,
        "winner": None
        if best is None
        else {k: best[k] for k in ("trial_id", "params", "hparams", "steps", "final_top1")}
        | {"checkpoint": best["checkpoint"]},
        "leaderboard": [
            {k: v for k, v in t.items() if k not in ("history", "events")} for t in trials
        ],
    }
    # matplotlib, tensorboardX and the page write local files: in a bucket's case into a
    # temporary folder, uploaded file by file (each object whole) at the block's end.
    with storage.local_output(sweep_dir) as out:
        out = Path(out)
        plot_heatmap(trials, out / HEATMAP_PNG)
        plot_curves(trials, out / CURVES_PNG)
        write_hparams(trials, out / TENSORBOARD)
        tmp = out / (REPORT_HTML + ".tmp")
        tmp.write_text(page)
        tmp.replace(out / REPORT_HTML)
        write_json_atomic(out / LEADERBOARD_JSON, summary)
        if storage.is_uri(sweep_dir):
            # Event files are named by the time they were written: the old set is removed, or
            # TensorBoard would list every trial once per rewrite.
            storage.remove(storage.join(sweep_dir, TENSORBOARD), recursive=True)
    return summary
