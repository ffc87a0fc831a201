"""ASHA against the full grid over the same search space, on the demo's prepared data.

Both sweeps run for real, one after the other, on one local Ray: the grid trains every trial
to max_steps (what a user without early stopping would run), ASHA stops trials at its rungs
on zero-shot top-1 measured on the demo's val folder. Printed: each sweep's best
configuration and its accuracy, the training steps each spent, the ratio, the wall times.
Done when ASHA finds the grid's best configuration, or one within 1 point of its accuracy,
with at most half the grid's steps.

    python jobs/prepare_data.py --preset demo --run-dir /tmp/clip-demo   # once, ~3 min
    python benchmarks/bench_sweep.py --run-dir /tmp/clip-demo
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from pipeline.config import get_preset  # noqa: E402
from pipeline.pretrain import count_samples  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.tune.report import format_leaderboard, read_sweep  # noqa: E402


def run_one(name: str, cfg, run: RunDir, val: Path, out: Path) -> dict:
    from pipeline.tune.sweep import run_sweep

    sweep_dir = out / name
    shutil.rmtree(sweep_dir, ignore_errors=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    report = run_sweep(
        cfg.train, cfg.sweep, run.shards, count_samples(run.shards), sweep_dir, val, log=print
    )
    seconds = time.perf_counter() - start
    _, trials = read_sweep(sweep_dir)
    print(format_leaderboard(trials, sweep_dir))
    return {
        "name": name,
        "seconds": seconds,
        "load": (load + os.getloadavg()[0]) / 2,
        "trials": trials,
        "winner": report["winner"],
        "steps": report["steps_total"],
        "stopped": report["stopped_early"],
    }


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
    parser.add_argument("--only", choices=("grid", "asha"), default=None, help="run one sweep")
    args = parser.parse_args()
    run = RunDir.at(args.run_dir)
    val = run.demo / "val"
    if not val.is_dir():
        sys.exit(f"error: no validation folder {val}: prepare the demo with this version first")
    count_samples(run.shards)  # a clear error if the data is not prepared

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # With its dashboard: Ray Train's placement-group cleaner asks the state API whether a
    # trial's controller is gone, and never frees the trial's CPUs without it.
    ray.init(address="local", configure_logging=False, log_to_driver=False)
    cfg = get_preset(args.preset)
    out = run.root / "bench-sweep"
    results = {}
    for name, scheduler in (("asha", "asha"), ("grid", "none")):
        if args.only in (None, name):
            sweep = dataclasses.replace(cfg.sweep, scheduler=scheduler)
            results[name] = run_one(name, dataclasses.replace(cfg, sweep=sweep), run, val, out)
    ray.shutdown()
    print(compare(results))
    if "grid" in results:
        print(replay_orders(results["grid"]["trials"], cfg.sweep))


def compare(results: dict[str, dict]) -> str:
    lines = ["", "== ASHA vs the full grid (same space, same data, same budget per trial) =="]
    for r in results.values():
        w = r["winner"]
        lines.append(
            f"{r['name']:<4}: {len(r['trials'])} trials, {r['stopped']} stopped early, "
            f"{r['steps']} training steps, {r['seconds'] / 60:.1f} min wall "
            f"(load average {r['load']:.1f} on {os.cpu_count()} cores)\n"
            f"      best: {w['trial_id']} ({knobs(w)}): val top1 {100 * w['final_top1']:.1f}%"
        )
    if len(results) == 2:
        asha, grid = results["asha"], results["grid"]
        ratio = asha["steps"] / grid["steps"]
        gap = 100 * (grid["winner"]["final_top1"] - asha["winner"]["final_top1"])
        same = asha["winner"]["hparams"] == grid["winner"]["hparams"]
        lines.append(
            f"steps ASHA/grid: {asha['steps']}/{grid['steps']} = {ratio:.2f} "
            f"(wall {asha['seconds'] / grid['seconds']:.2f}x); "
            f"best config {'the same' if same else 'different'}, "
            f"accuracy gap {gap:+.1f} points"
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


def replay_orders(grid: list[dict], sweep) -> str:
    """How ASHA's result, one trial at a time, depends on the order of the lists."""
    by_knobs = {(t["hparams"]["temperature"], t["hparams"]["batch_size"]): t for t in grid}
    best = max(grid, key=lambda t: t["final_top1"])
    full = sum(t["steps"] for t in grid)
    orders = list(
        itertools.product(
            itertools.permutations(sweep.temperatures), itertools.permutations(sweep.batch_sizes)
        )
    )
    lines = ["", "== ASHA replayed on the grid's curves, for every order of the lists =="]
    met = 0
    for temps, batches in orders:
        order = [by_knobs[(t, b)] for t in temps for b in batches]
        rule = (sweep.grace_period, sweep.reduction_factor, sweep.max_steps)
        steps, found = replay_asha(order, *rule)
        gap = 100 * (best["final_top1"] - found["final_top1"])
        ok = gap <= 1.0 and steps <= full / 2
        met += ok
        lines.append(
            f"temperatures {','.join(f'{t:g}' for t in temps)} x batch "
            f"{','.join(map(str, batches))}: steps {steps / full:.2f}, best "
            f"{found['hparams']['temperature']:g}/{found['hparams']['batch_size']} "
            f"{100 * found['final_top1']:.1f}% (gap {gap:+.1f}){'  meets the bar' if ok else ''}"
        )
    lines.append(f"{met} of {len(orders)} orders meet the bar")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
