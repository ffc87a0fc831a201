"""Sweep stage: Ray Tune over temperature, batch size and lr on a prepared run directory.

Trials share RUN/data/shards; ASHA stops the weak ones early on zero-shot top-1 measured on a
small held-out folder. The best trial is exported to RUN/model and evaluated; RUN/sweep holds
report.html, TensorBoard hparams and the leaderboard. Rerun the same command to resume a
sweep whose driver died.

python jobs/sweep.py --preset demo --run-dir runs/demo
python jobs/sweep.py --show runs/demo           # the leaderboard, without Ray
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from common import add_eval_args, base_parser, build_pipeline, init_ray


def _list(kind):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not values:
            raise ValueError("an empty list")
        return values

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "learned", "learn"):
        return True
    if lowered in ("false", "no", "0", "fixed"):
        return False
    raise ValueError(f"{text!r} is neither true nor false")


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not LOW:HIGH")
    return float(low), float(high)


_range.__name__ = "LOW:HIGH range"

# flag -> (SweepConfig field, parser, help)
SWEEP_FLAGS = {
    "--temperatures": ("temperatures", _list(float), "initial temperatures, e.g. 0.02,0.07,0.2"),
    "--temperature-range": (
        "temperature_range",
        _range,
        "LOW:HIGH: initial temperature drawn log-uniformly (random/optuna search)",
    ),
    "--learn-temperature": (
        "learn_temperature",
        _list(_bool),
        "true (learned), false (fixed) or true,false (both)",
    ),
    "--batch-sizes": ("batch_sizes", _list(int), "global batch sizes, e.g. 64,128"),
    "--lr-rule": ("lr_rule", str, "linear or sqrt scaling from --base-lr, or swept (--lrs)"),
    "--base-lr": ("base_lr", float, "lr at --base-batch-size for the scaling rules"),
    "--base-batch-size": ("base_batch_size", int, "batch size --base-lr is tuned for"),
    "--lrs": ("lrs", _list(float), "learning rates to sweep (with --lr-rule swept)"),
    "--seeds": ("seeds", _list(int), "seeds, e.g. 0,1"),
    "--search": ("search", str, "grid, random or optuna"),
    "--num-samples": ("num_samples", int, "trials drawn by random/optuna; repeats of a grid"),
    "--scheduler": ("scheduler", str, "asha, or none to run every trial to its end"),
    "--max-steps": ("max_steps", int, "training steps of a trial that is never stopped"),
    "--grace-period": ("grace_period", int, "ASHA: steps before a trial can be stopped"),
    "--reduction-factor": ("reduction_factor", int, "ASHA: 1/N of trials go on at each rung"),
    "--zeroshot-every": ("zeroshot_every_steps", int, "steps between zero-shot probes"),
    "--workers-per-trial": ("workers_per_trial", int, "Ray Train workers of each trial"),
    "--cpus-per-trial-worker": (
        "cpus_per_worker",
        float,
        "CPUs each trial worker reserves and computes on (0: the training config's)",
    ),
    "--max-concurrent": ("max_concurrent_trials", int, "trials at once (0: what fits)"),
}


def main() -> None:
    parser = base_parser(__doc__)
    add_eval_args(parser)
    parser.add_argument(
        "--show", metavar="RUN", default=None, help="print RUN's sweep leaderboard and exit"
    )
    try:
        parser.add_argument(
            "--val-dataset",
            default=None,
            help="image folder the trials are ranked on (zero-shot top-1; keep it apart from "
            "--eval-dataset); default: the demo's val folder",
        )
    except argparse.ArgumentError:
        pass  # jobs/common.py offers it to every job that trains
    group = parser.add_argument_group("search space and early stopping (default: the preset's)")
    for flag, (_, kind, text) in SWEEP_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, help=text)
    args = parser.parse_args()
    # After `common`, which puts the repository on sys.path for a Ray job's working dir.
    from pipeline.lock import hold_run_dir
    from pipeline.pretrain import format_summary
    from pipeline.rundir import RunDir, StageConfigMismatch
    from pipeline.tune.report import format_leaderboard, read_sweep

    try:
        if args.show is not None:
            sweep_dir = RunDir.at(args.show).sweep
            _, trials = read_sweep(sweep_dir)
            print(format_leaderboard(trials, sweep_dir))
            return
        pipeline = build_pipeline(args)
        changes = {
            field: getattr(args, flag[2:].replace("-", "_"))
            for flag, (field, _, _) in SWEEP_FLAGS.items()
            if getattr(args, flag[2:].replace("-", "_")) is not None
        }
        sweep = dataclasses.replace(pipeline.cfg.sweep, **changes)
        pipeline.cfg = dataclasses.replace(pipeline.cfg, sweep=sweep)
        pipeline.val_dataset = args.val_dataset
        pipeline.model_stage = "sweep"
        pipeline.check_inputs()
        pipeline.check_sweep()  # shards, val folder, search space: before Ray starts
        with hold_run_dir(pipeline.run.root):  # one job per run dir
            init_ray(args.address)
            pipeline.sweep()
            pipeline.evaluate()
            print(format_summary(pipeline.summary()))
            _, trials = read_sweep(pipeline.run.sweep)
            print(format_leaderboard(trials, pipeline.run.sweep))
    except (ValueError, FileNotFoundError, StageConfigMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
