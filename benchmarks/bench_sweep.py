"""Early stopping against the full grid over the same search space, on the demo's data.

The sweeps run for real, one after the other, on one local Ray: the grid trains every trial
to max_steps (what a user without early stopping would run); synchronous successive halving
(the default scheduler) and, with --only asha, Tune's ASHA stop trials at their rungs on
zero-shot top-1 measured on the demo's val folder. Printed: each sweep's best configuration
and its accuracy, the training steps each spent, the ratio, the wall times, each trial
start split into phases. Then both rules are replayed on the grid's curves for all 12 orders of the
two lists (exact: trials are deterministic). Done when, for every order, the best found is
the grid's best configuration or within 1 point of its accuracy, with at most half its steps.

    python jobs/prepare_data.py --preset demo --run-dir /tmp/clip-demo   # once, ~3 min
    python benchmarks/bench_sweep.py --run-dir /tmp/clip-demo
    python benchmarks/bench_sweep.py --run-dir /tmp/clip-demo --reuse grid   # the grid's curves
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from pipeline.config import get_preset  # noqa: E402
from pipeline.pretrain import count_samples  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.tune.report import format_leaderboard, read_sweep, winner  # noqa: E402
from pipeline.tune.scheduler import SuccessiveHalving, replay  # noqa: E402

SWEEPS = {"halving": "halving", "asha": "asha", "grid": "none"}  # name -> scheduler


def run_one(name: str, cfg, run: RunDir, val: Path, out: Path) -> dict:
    from pipeline.tune.sweep import run_sweep

    sweep_dir = out / name
    shutil.rmtree(sweep_dir, ignore_errors=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    run_sweep(
        cfg.train, cfg.sweep, run.shards, count_samples(run.shards), sweep_dir, val, log=print
    )
    seconds = time.perf_counter() - start
    return result(name, sweep_dir, seconds, (load + os.getloadavg()[0]) / 2)


def result(name: str, sweep_dir: Path, seconds: float | None, load: float | None) -> dict:
    _, trials = read_sweep(sweep_dir)
    print(format_leaderboard(trials, sweep_dir))
    best = winner(trials)
    return {
        "name": name,
        "seconds": seconds,
        "load": load,
        "trials": trials,
        "winner": best,
        "steps": sum(t["steps"] for t in trials),
        "stopped": sum(t["status"] == "stopped" for t in trials),
        "phases": startup_phases(sweep_dir),
    }


PHASES = {
    "Tune start -> train loop": ("at", "start_loop_at"),
    "model, checkpoint, probe": ("start_loop_at", "start_ready_at"),
    "Ray Data's first batch": ("start_ready_at", "start_first_batch_at"),
}


def startup_phases(sweep_dir: Path) -> dict[str, list[float]]:
    """Each trial start split by the marks its first report carries (pipeline.train.loop):
    Tune's start of the trial (the driver's clock, TrialHistory) to the training loop's entry
    (the Tune function, Ray Train's controller and worker processes, their imports), the loop's
    set-up, and the wait for the data pipeline's first batch."""
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for path in sorted(Path(sweep_dir).glob("*/history.jsonl")):
        start = None
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "params" in record:
                start = record.get("at")
            elif start is not None and "start_loop_at" in record:
                marks = {**record, "at": start}  # the start, not the report's own time
                for name, (a, b) in PHASES.items():
                    if a in marks and b in marks:
                        phases[name].append(marks[b] - marks[a])
                start = None
    return phases


def knobs(winner: dict) -> str:
    hp = winner["hparams"]
    return (
        f"temperature {hp['temperature']:g}, batch {hp['batch_size']}, lr {hp['lr']:.2e}, "
        f"{'learned' if hp['learn_temperature'] else 'fixed'}, seed {hp['seed']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a demo run dir with prepared shards")
    parser.add_argument("--preset", default="demo", help="whose sweep section is the space")
    parser.add_argument(
        "--sweeps",
        default="halving,grid",
        help=f"comma-separated, of {', '.join(SWEEPS)}: the sweeps compared",
    )
    parser.add_argument(
        "--reuse",
        default="",
        help="comma-separated: sweeps read from an earlier run of this benchmark rather than run "
        "again (trials are deterministic), e.g. grid",
    )
    args = parser.parse_args()
    names, reuse = args.sweeps.split(","), set(filter(None, args.reuse.split(",")))
    if not set(names) <= set(SWEEPS) or not reuse <= set(names):
        sys.exit(f"error: --sweeps and --reuse take names among {', '.join(SWEEPS)}")
    run = RunDir.at(args.run_dir)
    val = run.demo / "val"
    if not val.is_dir():
        sys.exit(f"error: no validation folder {val}: prepare the demo with this version first")
    count_samples(run.shards)  # a clear error if the data is not prepared

    import ray
    from ray._private.services import get_node_ip_address

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # With its dashboard: Ray Train's placement-group cleaner asks the state API whether a
    # trial's controller is gone, and never frees the trial's CPUs without it. It finds the
    # cluster by RAY_ADDRESS; with another Ray on the machine it cannot tell which is its own
    # and gives up, so a paused or stopped trial's CPUs stay held (as jobs/common.init_ray).
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    ray.init(address="local", configure_logging=False, log_to_driver=False)
    cfg = get_preset(args.preset, sweep=True)  # the trial variant of its train section
    out = run.root / "bench-sweep"
    results = {}
    for name in names:
        if name in reuse:
            results[name] = result(name, out / name, None, None)
            continue
        sweep = dataclasses.replace(cfg.sweep, scheduler=SWEEPS[name])
        results[name] = run_one(name, dataclasses.replace(cfg, sweep=sweep), run, val, out)
    ray.shutdown()
    print(compare(results))
    grid = results.get("grid", {}).get("trials", [])
    if grid and all(t["status"] == "completed" for t in grid):
        probe = probe_images(val, cfg.train.zeroshot_images_per_class)
        print(replay_orders(grid, cfg.sweep, probe))


def compare(results: dict[str, dict]) -> str:
    lines = ["", "== early stopping vs the full grid (same space, same data, same budget) =="]
    for r in results.values():
        w = r["winner"]
        wall = (
            "reused from an earlier run"
            if r["seconds"] is None
            else f"{r['seconds'] / 60:.1f} min wall (load average {r['load']:.1f} on "
            f"{os.cpu_count()} cores)"
        )
        phases = r["phases"]
        lines.append(
            f"{r['name']:<7}: {len(r['trials'])} trials, {r['stopped']} stopped early, "
            f"{r['steps']} training steps, {wall}\n"
            f"         best: {w['trial_id']} ({knobs(w)}): val top1 {100 * w['final_top1']:.1f}%"
            + (
                "\n         each trial start (a first start or a resume):"
                if any(phases.values())
                else ""
            )
            + "".join(
                f"\n           {name}: median {np.median(v):.1f} s over {len(v)} starts"
                for name, v in phases.items()
                if v
            )
        )
    grid = results.get("grid")
    for name, r in results.items():
        if name == "grid" or grid is None:
            continue
        ratio = r["steps"] / grid["steps"]
        gap = 100 * (grid["winner"]["final_top1"] - r["winner"]["final_top1"])
        same = r["winner"]["hparams"] == grid["winner"]["hparams"]
        wall = (
            f" (wall {r['seconds'] / grid['seconds']:.2f}x)"
            if r["seconds"] and grid["seconds"]
            else ""
        )
        lines.append(
            f"steps {name}/grid: {r['steps']}/{grid['steps']} = {ratio:.2f}{wall}; "
            f"best config {'the same' if same else 'different'}, accuracy gap {gap:+.1f} points"
        )
        ok = (same or gap <= 1.0) and ratio <= 0.5
        lines.append(f"done-when (same best or within 1 point, at most half the steps): {ok}")
    return "\n".join(lines)


def replay_asha(trials: list[dict], grace: int, rf: int, max_t: int) -> tuple[int, dict]:
    """Tune's ASHA rule, one trial at a time in the given order, on the grid's full curves.

    Exact for deterministic trials: a trial ASHA lets run is the grid's trial. At its first
    report past a rung a trial is judged against the rung's earlier records (Tune's cutoff,
    their 1 - 1/rf percentile) and stops there if below. Returns (steps spent, the best
    trial among those that ran to the end).
    """
    rungs = [grace * rf**k for k in range(int(math.log(max_t / grace) / math.log(rf) + 1))]
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    steps, finished = 0, []
    for t in trials:
        judged, stop = set(), None
        for report in t["history"]:
            rung = max((r for r in rungs if r <= report["step"] and r not in judged), default=0)
            if not rung:
                continue
            judged.add(rung)
            earlier, value = recorded[rung], report["zeroshot_top1"]
            cutoff = np.nanpercentile(earlier, (1 - 1 / rf) * 100) if earlier else None
            earlier.append(value)
            if cutoff is not None and value < cutoff:
                stop = report["step"]
                break
        steps += stop or t["steps"]
        if stop is None:
            finished.append(t)
    return steps, max(finished, key=lambda t: t["final_top1"])


def probe_images(val: Path, per_class: int) -> int:
    """How many images a trial's probe measures on (its reports say so too, since this work)."""
    classes = [d for d in Path(val).iterdir() if d.is_dir()]
    return sum(min(per_class, sum(f.is_file() for f in d.iterdir())) for d in classes)


def replay_halving(trials: list[dict], sweep, probe_size: int) -> tuple[int, dict]:
    """pipeline.tune.scheduler's successive halving, one trial at a time in the given order,
    on the grid's curves (its own scheduler class, driven by `replay`)."""
    scheduler = SuccessiveHalving(
        metric="zeroshot_top1",
        max_t=sweep.max_steps,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
        se_multiple=sweep.keep_within_se,
        expected_trials=len(trials),
        concurrency=1,
    )
    scheduler.probe_size = probe_size  # for curves from before reports carried it
    out = replay(scheduler, [(t["trial_id"], t["history"]) for t in trials])
    by_id = {t["trial_id"]: t for t in trials}
    return out["steps"], max((by_id[t] for t in out["finished"]), key=lambda t: t["final_top1"])


def replay_orders(grid: list[dict], sweep, probe_size: int) -> str:
    """How each rule's result, one trial at a time, depends on the order of the lists."""
    by_knobs = {(t["hparams"]["temperature"], t["hparams"]["batch_size"]): t for t in grid}
    best = max(grid, key=lambda t: t["final_top1"])
    full = sum(t["steps"] for t in grid)
    orders = list(
        itertools.product(
            itertools.permutations(sweep.temperatures), itertools.permutations(sweep.batch_sizes)
        )
    )
    rules = {
        "ASHA": lambda order: replay_asha(
            order, sweep.grace_period, sweep.reduction_factor, sweep.max_steps
        ),
        "successive halving": lambda order: replay_halving(order, sweep, probe_size),
    }
    lines = []
    for rule, play in rules.items():
        lines += ["", f"== {rule} replayed on the grid's curves, for every order of the lists =="]
        met = 0
        for temps, batches in orders:
            order = [by_knobs[(t, b)] for t in temps for b in batches]
            steps, found = play(order)
            gap = 100 * (best["final_top1"] - found["final_top1"])
            ok = gap <= 1.0 and steps <= full / 2
            met += ok
            lines.append(
                f"temperatures {','.join(f'{t:g}' for t in temps)} x batch "
                f"{','.join(map(str, batches))}: steps {steps / full:.2f}, best "
                f"{found['hparams']['temperature']:g}/{found['hparams']['batch_size']} "
                f"{100 * found['final_top1']:.1f}% (gap {gap:+.1f})"
                + ("  meets the bar" if ok else "")
            )
        lines.append(f"{rule}: {met} of {len(orders)} orders meet the bar")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
