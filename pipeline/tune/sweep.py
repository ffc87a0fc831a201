"""Ray Tune sweeps of temperature, batch size and learning rate, early-stopped at rungs.

Each trial is a Tune function that builds a TorchTrainer (Train V2: the trial holds a sliver
of CPU and waits, the trainer's workers hold the rest) over the run's Parquet shards, so trials
share the prepared data. The trainer measures zero-shot top-1 on a small held-out folder every
few steps and TuneReportCallback forwards its reports, so the scheduler ranks trials on that
signal: synchronous successive halving by default (pipeline.tune.scheduler: the same decisions
whatever the order of the lists), or ASHA. The sweep lives in RUN/sweep: Tune's experiment
state (a rerun resumes it), one folder per trial with its Ray Train storage and a history.jsonl
the driver appends to, and the report, rewritten as trials report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from pipeline import storage
from pipeline.config import SweepConfig, TrainConfig, from_dict

# METRIC: what ASHA and the leaderboard rank by (0..1); HISTORY: per trial, its knobs, then one
# line per report, then its end; CONFIG_FILE: the sweep and training configs, for the export.
from pipeline.tune.report import CONFIG_FILE, METRIC, write_report
from pipeline.tune.scheduler import PROBE_SIZE, append_history

SEARCHES = ("grid", "random", "optuna")
WORKER_START_TIMEOUT_S = 900  # how long a trial's workers may wait for CPUs to free up
# halving: synchronous successive halving, the same decisions whatever the trials' order;
# asha: Tune's asynchronous one (judges a trial against those that reached the rung before it).
SCHEDULERS = ("halving", "asha", "none")
LR_RULES = ("linear", "sqrt", "swept")
# The reported metrics a trial's history keeps (the rest of Tune's result is bookkeeping).
KEPT = ("step", "epoch", METRIC, PROBE_SIZE, "loss", "logit_scale", "lr", "samples_per_second",
        "start_loop_at", "start_ready_at", "start_first_batch_at")  # fmt: skip


# -- the search space -------------------------------------------------------------------------
def scaled_lr(rule: str, base_lr: float, base_batch_size: int, batch_size: int) -> float:
    """The learning rate for `batch_size` under a scaling rule from `base_lr` at `base_batch_size`.

    linear keeps the update per sample constant (Goyal et al. 2017, for SGD); sqrt keeps the
    gradient noise constant, the rule that holds better for Adam-type optimisers.
    """
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr rule {rule!r}; choose one of {', '.join(LR_RULES)}")


def check_sweep(sweep: SweepConfig, train: TrainConfig, num_samples: int | None = None) -> None:
    """Refuse, with one line naming the problem, a sweep that could not run as configured."""

    def fail(message: str) -> None:
        raise ValueError(f"sweep: {message}")

    if sweep.search not in SEARCHES:
        fail(f"unknown search {sweep.search!r}; choose one of {', '.join(SEARCHES)}")
    if sweep.scheduler not in SCHEDULERS:
        fail(f"unknown scheduler {sweep.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if sweep.lr_rule not in LR_RULES:
        fail(f"unknown lr rule {sweep.lr_rule!r}; choose one of {', '.join(LR_RULES)}")
    if sweep.lr_rule == "swept" and not sweep.lrs:
        fail("lr rule 'swept' needs a list of learning rates (--lrs)")
    if sweep.lrs and sweep.lr_rule != "swept":
        fail(f"learning rates are listed but the lr rule is {sweep.lr_rule!r}: use 'swept'")
    if any(lr <= 0 for lr in sweep.lrs) or sweep.base_lr <= 0 or sweep.base_batch_size <= 0:
        fail("learning rates and the base batch size must be positive")
    if sweep.temperature_range is not None:
        if sweep.search == "grid":
            fail(
                "a temperature range is drawn at random: grid search needs a list "
                "(--temperatures), or use --search random or optuna"
            )
        low, high = sweep.temperature_range
        if not 0 < low < high:
            fail(f"temperature range {low}:{high} must satisfy 0 < low < high")
    elif not sweep.temperatures:
        fail("no temperatures to sweep")
    if any(t <= 0 for t in sweep.temperatures):
        fail(f"temperatures must be positive, got {list(sweep.temperatures)}")
    for name in ("batch_sizes", "learn_temperature", "seeds"):
        if not getattr(sweep, name):
            fail(f"{name} is empty")
    workers = trial_workers(train)
    for batch in sweep.batch_sizes:
        if batch <= 0 or batch % workers:
            fail(f"global batch {batch} does not split over {workers} workers per trial")
        if num_samples is not None and batch > num_samples:
            fail(f"global batch {batch} is bigger than the {num_samples} training samples")
    if sweep.num_samples < 1:
        fail("num_samples must be at least 1")
    if sweep.max_steps < 1:
        fail("max_steps must be at least 1")
    if train.zeroshot_every_steps < 1:
        fail("trials are ranked by zero-shot top-1: train.zeroshot_every_steps must be >= 1")
    if sweep.scheduler in ("halving", "asha"):
        if not 0 < sweep.grace_period < sweep.max_steps:
            fail(f"the grace period {sweep.grace_period} must be in 1..max_steps-1")
        if sweep.reduction_factor < 2:
            fail("the reduction factor must be at least 2")
    if sweep.scheduler == "halving":
        if sweep.grace_period % train.zeroshot_every_steps:
            # Rungs are multiples of the grace period: each then falls on a probe, so every
            # trial is judged on its top-1 at the same step.
            fail(
                f"the grace period {sweep.grace_period} must be a multiple of the probe "
                f"interval {train.zeroshot_every_steps} (rungs are judged on probes)"
            )
        if sweep.keep_within_se < 0:
            fail("keep_within_se must not be negative")
    if sweep.report_every_s < 0:
        fail("report_every_s must not be negative")
    # Every knob combination must make a valid training config (e.g. a temperature of at
    # least 1/max_logit_scale): refused here, not in a trial minutes later.
    from pipeline.train.loop import check_config

    temperatures = sweep.temperature_range or sweep.temperatures
    for temperature in temperatures:
        for batch in sweep.batch_sizes:
            params = {
                "init_temperature": temperature,
                "learn_temperature": sweep.learn_temperature[0],
                "global_batch_size": batch,
                "seed": sweep.seeds[0],
                **({"lr": sweep.lrs[0]} if sweep.lr_rule == "swept" else {}),
            }
            check_config(trial_train_config(train, sweep, params))
    if sweep.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            fail("optuna search needs optuna: pip install optuna (or '.[sweep]')")


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param space: grid axes for grid search, choices (or a log-uniform range) else."""
    from ray import tune

    axis = tune.grid_search if sweep.search == "grid" else tune.choice
    if sweep.temperature_range is not None:
        temperature = tune.loguniform(*sweep.temperature_range)
    else:
        temperature = axis(list(sweep.temperatures))
    space = {
        "init_temperature": temperature,
        "learn_temperature": axis(list(sweep.learn_temperature)),
        "global_batch_size": axis(list(sweep.batch_sizes)),
        "seed": axis(list(sweep.seeds)),
    }
    if sweep.lr_rule == "swept":
        space["lr"] = axis(list(sweep.lrs))
    return space


def expected_trials(sweep: SweepConfig) -> int:
    """How many trials the sweep makes: the grid's size times its repeats, or num_samples."""
    if sweep.search != "grid":
        return sweep.num_samples
    axes = [sweep.temperatures, sweep.learn_temperature, sweep.batch_sizes, sweep.seeds]
    if sweep.lr_rule == "swept":
        axes.append(sweep.lrs)
    return math.prod(len(a) for a in axes) * sweep.num_samples


def trial_hparams(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The knobs a trial trains with: its sampled parameters plus the lr its rule gives."""
    batch = int(params["global_batch_size"])
    if "lr" in params:
        lr = float(params["lr"])
    else:
        lr = scaled_lr(sweep.lr_rule, sweep.base_lr, sweep.base_batch_size, batch)
    return {
        "temperature": float(params["init_temperature"]),
        "learn_temperature": bool(params["learn_temperature"]),
        "batch_size": batch,
        "lr": lr,
        "seed": int(params["seed"]),
    }


def trial_train_config(train: TrainConfig, sweep: SweepConfig, params: dict[str, Any]):
    """The TrainConfig of one trial: the run's train section with the trial's axes and budget.

    Only the fields the sweep owns (spec.SWEPT) change; every other one is the run's.
    checkpoint_every_steps follows zeroshot_every_steps.
    """
    hp = trial_hparams(sweep, params)
    return dataclasses.replace(
        train,
        num_workers=trial_workers(train),
        init_temperature=hp["temperature"],
        learn_temperature=hp["learn_temperature"],
        global_batch_size=hp["batch_size"],
        lr=hp["lr"],
        seed=hp["seed"],
        max_steps=sweep.max_steps,
        warmup_steps=min(train.warmup_steps, sweep.max_steps),
        # A checkpoint (and so a report) at every probe and only there: every report carries
        # the metric ASHA ranks by, the winner's last checkpoint is exported, and a resumed
        # trial restarts from its last one.
        checkpoint_every_steps=train.zeroshot_every_steps,
    )


# -- resources --------------------------------------------------------------------------------
def trial_workers(train: TrainConfig) -> int:
    """Workers per trial: train.num_workers, or one for "auto" (trials run side by side)."""
    from pipeline.train.layout import resolve_layout

    return resolve_layout(train, None, trial=True).num_workers


def trial_resources(sweep: SweepConfig, train: TrainConfig) -> dict[str, float]:
    """What one running trial holds: its Tune function, its workers, its data tasks."""
    workers = trial_workers(train)
    cpu = sweep.driver_cpus_per_trial + workers * train.cpus_per_worker + sweep.data_cpus_per_trial
    return {"CPU": cpu, "GPU": float(workers if train.use_gpu else 0)}


def concurrent_trials(sweep: SweepConfig, train: TrainConfig, cluster: dict[str, float]) -> int:
    """How many trials run at once: as many as the cluster's CPUs and GPUs hold in full.

    Tune only sees the Tune function's sliver of CPU; without this limit it would start
    every trial at once and their trainers would wait on each other's workers.
    """
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    need = trial_resources(sweep, train)
    fits = math.floor(cluster.get("CPU", 0.0) / need["CPU"] + 1e-9)
    if need["GPU"]:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / need["GPU"] + 1e-9))
    if fits < 1:
        raise ValueError(
            f"sweep: one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs, the cluster "
            f"has {cluster.get('CPU', 0):g} and {cluster.get('GPU', 0):g}; lower "
            "train.num_workers or train.cpus_per_worker"
        )
    return fits


# -- the trial --------------------------------------------------------------------------------
def run_trial(params: dict[str, Any], *, context: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer on the shared shards, its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.loop import build_trainer

    # A trial can start while the previous one's workers and data tasks still release their
    # CPUs (or while an autoscaler adds nodes): Ray Train's 60 s wait for its worker group
    # would fail the trial, and the trial then hangs. This process runs only this trial, and
    # Ray Train passes the variable on to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    train = from_dict(TrainConfig, context["train"])
    sweep = from_dict(SweepConfig, context["sweep"])
    cfg = trial_train_config(train, sweep, params)
    # Train's storage lives in the trial's folder of RUN/sweep (not Tune's local staging
    # folder), so a resumed sweep restarts the trial from its last checkpoint.
    trial_dir = storage.join(context["sweep_dir"], storage.name(tune.get_context().get_trial_dir()))
    # The trial's own resolved training config, beside its history.
    config = {"params": params, "train": dataclasses.asdict(cfg)}
    storage.write_text(
        storage.join(trial_dir, "config.json"), json.dumps(config, indent=2, default=str) + "\n"
    )
    trainer = build_trainer(
        cfg,
        context["shards"],
        context["num_samples"],
        trial_dir,
        name="train",
        zeroshot_dataset=context["val_dataset"],
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def checkpoint_uri(path: str | None, sweep_dir: str) -> str | None:
    """A checkpoint's path as Ray reports it, made a URI when the sweep is on a bucket (Ray
    gives the path inside its file system, `bucket/run/...`, without the scheme)."""
    if path is None or not storage.is_uri(sweep_dir) or storage.is_uri(path):
        return path
    return f"{sweep_dir.split('://', 1)[0]}://{path.lstrip('/')}"


def trial_dirname(trial) -> str:
    # Short and stable: trial ids are unique in an experiment and survive a restore.
    return f"trial_{trial.trial_id}"


class TrialHistory(Callback):
    """Appends each trial's knobs, reports and end to RUN/sweep/<trial>/history.jsonl.

    Written by the driver straight into the sweep folder in append mode, so the record of
    a sweep that died and resumed is whole; the report and --show read only these files.
    """

    def __init__(self, sweep_dir: str, sweep: dict[str, Any]):
        self.sweep_dir = sweep_dir
        self.sweep = sweep

    def _append(self, trial, record: dict[str, Any]) -> None:
        append_history(self.sweep_dir, trial_dirname(trial), record)

    def on_trial_start(self, iteration, trials, trial, **info):
        hparams = trial_hparams(from_dict(SweepConfig, self.sweep), trial.config)
        self._append(
            trial, {"trial_id": trial.trial_id, "params": trial.config, "hparams": hparams}
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        record = {k: result[k] for k in KEPT if k in result}
        record["checkpoint_path"] = checkpoint_uri(result.get("checkpoint_path"), self.sweep_dir)
        record["time_total_s"] = result.get("time_total_s")
        self._append(trial, record)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._append(trial, {"end": "complete"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._append(trial, {"end": "error", "error": str(trial.error_file or "")})


class LiveReport(Callback):
    """Rewrites report.html, its PNGs, leaderboard.json and the hparams runs as trials report.

    At most every `every_s` seconds on reports (a render takes a second or two of the driver's
    loop), and at once when a trial is paused, ends or fails, so `--show` and a browser refresh
    follow the sweep. Runs after TrialHistory, whose lines it reads.
    """

    def __init__(self, sweep_dir: str, every_s: float):
        self.sweep_dir, self.every_s = sweep_dir, every_s
        self._last = 0.0

    def _write(self, force: bool) -> None:
        if not force and time.monotonic() - self._last < self.every_s:
            return
        try:
            write_report(self.sweep_dir)
        except Exception as err:  # a dashboard must never fail the sweep
            print(f"[sweep] the live report could not be written: {err}")
        self._last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write(force=False)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write(force=False)

    def on_trial_save(self, iteration, trials, trial, **info):
        self._write(force=True)  # a pause (Tune saves a trial before it pauses it)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(force=True)


class TrialScalarsOnly(TBXLoggerCallback):
    """Tune's per-trial TensorBoard scalars, without its hparams entry.

    The report writes one hparams session per trial itself (with the lr its rule derived and
    the best and final accuracy); Tune's own would list every trial twice in the HPARAMS tab.
    Passing a TBXLoggerCallback also keeps Tune from adding its default one.
    """

    def _try_log_hparams(self, trial, result):
        pass


# -- running a sweep --------------------------------------------------------------------------
def _tuner_config(sweep: SweepConfig, concurrency: int, sweep_dir: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.tune.scheduler import RungAwareLimiter, RungAwareVariants, SuccessiveHalving

    seed = sweep.seeds[0]
    if sweep.scheduler == "halving":
        halving = SuccessiveHalving(
            metric=METRIC,
            max_t=sweep.max_steps,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
            se_multiple=sweep.keep_within_se,
            expected_trials=expected_trials(sweep),
            concurrency=concurrency,
            sweep_dir=str(sweep_dir),
            trial_dirname=trial_dirname,
        )
        if sweep.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = RungAwareLimiter(OptunaSearch(seed=seed), concurrency, halving)
        else:
            search_alg = RungAwareVariants(halving, random_state=seed, max_concurrent=concurrency)
        return _tune_config(tune, sweep, halving, search_alg, None)
    if sweep.scheduler == "asha":
        # time_attr is the training step the trainer reports, so rungs are in steps.
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=sweep.max_steps,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Tune wraps a Searcher in a ConcurrencyLimiter of max_concurrent_trials.
        search_alg, limit = OptunaSearch(seed=seed), concurrency
    else:
        # A seeded generator draws the same trials again; it takes the limit itself (Tune
        # ignores max_concurrent_trials for a search algorithm passed in).
        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
        limit = None
    return _tune_config(tune, sweep, scheduler, search_alg, limit)


def _tune_config(tune, sweep: SweepConfig, scheduler, search_alg, limit: int | None):
    return tune.TuneConfig(
        metric=METRIC,
        mode="max",
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=sweep.num_samples,
        max_concurrent_trials=limit,
        trial_dirname_creator=trial_dirname,
    )


def run_sweep(
    train: TrainConfig,
    sweep: SweepConfig,
    shards: str | Path,
    num_samples: int,
    sweep_dir: str | Path,
    val_dataset: str | Path,
    log: Any = print,
) -> dict[str, Any]:
    """Run (or resume) the sweep in `sweep_dir`; write its report; return the outcome.

    The caller starts Ray. A sweep_dir holding Tune's state from an interrupted run is
    resumed: finished trials are kept, unfinished ones restart from their last checkpoint.
    """
    import ray
    from ray import tune

    check_sweep(sweep, train, num_samples)
    sweep_dir = storage.normalize(sweep_dir)
    context = {
        "train": dataclasses.asdict(train),
        "sweep": dataclasses.asdict(sweep),
        "shards": storage.normalize(shards),
        "num_samples": num_samples,
        "sweep_dir": sweep_dir,
        "val_dataset": storage.normalize(val_dataset),
    }
    resources = {"CPU": sweep.driver_cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    # Tune's experiment state lives in the sweep folder, on a bucket through its file system.
    filesystem, inner = storage.arrow_filesystem(sweep_dir)
    if tune.Tuner.can_restore(inner, storage_filesystem=filesystem):
        log(f"[sweep] resuming the sweep in {sweep_dir}")
        tuner = tune.Tuner.restore(
            inner,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        concurrency = concurrent_trials(sweep, train, ray.cluster_resources())
        log(
            f"[sweep] {sweep.search} search, {sweep.scheduler} scheduler, up to {concurrency} "
            f"trials at once, {sweep.max_steps} steps each at most"
        )
        storage.write_text(
            storage.join(sweep_dir, CONFIG_FILE), json.dumps(context, indent=2) + "\n"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=_tuner_config(sweep, concurrency, sweep_dir),
            run_config=tune.RunConfig(
                name=storage.name(sweep_dir),
                storage_path=storage.parent(inner),
                storage_filesystem=filesystem,
                callbacks=[
                    TrialHistory(sweep_dir, context["sweep"]),
                    LiveReport(sweep_dir, sweep.report_every_s),
                    TrialScalarsOnly(),
                ],
                verbose=1,
            ),
        )
    tuner.fit()
    report = write_report(sweep_dir)
    if report["winner"] is None:
        raise RuntimeError(f"no trial of the sweep in {sweep_dir} left a checkpoint; see its logs")
    log(f"[sweep] report: {report['html']}")
    return report


def export_winner(sweep_dir: str | Path, winner: dict[str, Any], model_dir: str | Path) -> str:
    """The best trial's last checkpoint as an open_clip local-dir model in `model_dir`."""
    from pipeline.train.loop import load_checkpoint_model
    from pipeline.train.modeling import export_local_dir, model_config

    saved = storage.read_json(storage.join(sweep_dir, CONFIG_FILE))
    train = from_dict(TrainConfig, saved["train"])
    sweep = from_dict(SweepConfig, saved["sweep"])
    cfg = trial_train_config(train, sweep, winner["params"])
    model = load_checkpoint_model(winner["checkpoint"], cfg)
    return export_local_dir(model, model_config(cfg.model), storage.normalize(model_dir))
