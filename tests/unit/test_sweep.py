"""The sweep's search space, lr rules, resources and config checks (no Ray cluster)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from ray.tune.search.variant_generator import generate_variants

from pipeline.config import SweepConfig, TrainConfig, get_preset
from pipeline.tune.sweep import (
    _tuner_config,
    check_sweep,
    concurrent_trials,
    scaled_lr,
    search_space,
    trial_hparams,
    trial_train_config,
)

# Probes every 30 steps, as in the demo's trials: the default rungs (30, 90) fall on probes.
TRAIN = TrainConfig(num_workers=2, cpus_per_worker=0.5, zeroshot_every_steps=30)
REPO = Path(__file__).resolve().parents[2]


def sweep(**changes) -> SweepConfig:
    return dataclasses.replace(SweepConfig(), **changes)


def test_lr_rules_scale_from_the_base():
    assert scaled_lr("linear", 1e-3, 256, 512) == pytest.approx(2e-3)
    assert scaled_lr("linear", 1e-3, 256, 64) == pytest.approx(2.5e-4)
    assert scaled_lr("sqrt", 1e-3, 256, 1024) == pytest.approx(2e-3)
    assert scaled_lr("sqrt", 1e-3, 256, 64) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="unknown lr rule 'cubic'"):
        scaled_lr("cubic", 1e-3, 256, 64)


def _grid(cfg: SweepConfig) -> list[dict]:
    return [spec for _, spec in generate_variants(search_space(cfg))]


def test_grid_is_the_cartesian_product_of_the_lists():
    cfg = sweep(
        temperatures=(0.02, 0.1), batch_sizes=(64, 128, 256), learn_temperature=(True, False)
    )
    configs = _grid(cfg)
    assert len(configs) == 2 * 3 * 2
    combos = {
        (c["init_temperature"], c["global_batch_size"], c["learn_temperature"]) for c in configs
    }
    assert len(combos) == 12
    assert {c["seed"] for c in configs} == {0}
    assert all("lr" not in c for c in configs)  # derived by the rule, not an axis


def test_swept_lr_is_one_more_axis_and_wins_over_the_rule():
    cfg = sweep(temperatures=(0.07,), batch_sizes=(64,), lr_rule="swept", lrs=(1e-3, 3e-3))
    configs = _grid(cfg)
    assert sorted(c["lr"] for c in configs) == [1e-3, 3e-3]
    assert trial_hparams(cfg, configs[0])["lr"] == configs[0]["lr"]


def test_random_search_draws_from_the_lists_and_the_log_range():
    cfg = sweep(search="random", temperature_range=(0.01, 0.5), batch_sizes=(32, 64))
    space = search_space(cfg)
    temperatures = [space["init_temperature"].sample() for _ in range(200)]
    assert all(0.01 <= t <= 0.5 for t in temperatures)
    # Log-uniform: about half the draws below the geometric mean (0.0707), not ~12%.
    below = sum(t < math.sqrt(0.01 * 0.5) for t in temperatures)
    assert 60 < below < 140
    assert {space["global_batch_size"].sample() for _ in range(50)} == {32, 64}


def test_trial_train_config_applies_the_axes_and_the_budget_and_keeps_the_rest():
    cfg = sweep(lr_rule="linear", base_lr=1e-3, base_batch_size=128, max_steps=90)
    base = dataclasses.replace(TRAIN, zeroshot_every_steps=15, warmup_steps=10, num_workers=1)
    params = {
        "init_temperature": 0.2,
        "learn_temperature": False,
        "global_batch_size": 256,
        "seed": 3,
    }
    train = trial_train_config(base, cfg, params)
    assert (train.init_temperature, train.learn_temperature) == (0.2, False)
    assert (train.global_batch_size, train.seed, train.num_workers) == (256, 3, 1)
    assert train.lr == pytest.approx(2e-3)
    assert (train.max_steps, train.warmup_steps) == (90, 10)
    assert train.checkpoint_every_steps == train.zeroshot_every_steps == 15  # reports at probes
    # Only the fields the sweep owns change: every other one is the run's train section.
    owned = {"init_temperature", "learn_temperature", "global_batch_size", "seed", "lr"}
    derived = {"max_steps", "checkpoint_every_steps"}
    for name in {f.name for f in dataclasses.fields(TrainConfig)} - owned - derived:
        assert getattr(train, name) == getattr(base, name), name


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"search": "bayes"}, "unknown search 'bayes'"),
        ({"scheduler": "pbt"}, "unknown scheduler 'pbt'"),
        ({"temperature_range": (0.01, 0.5)}, "grid search needs a list"),
        ({"search": "random", "temperature_range": (0.5, 0.01)}, "0 < low < high"),
        ({"lr_rule": "swept"}, "needs a list of learning rates"),
        ({"lrs": (1e-3,)}, "use 'swept'"),
        ({"batch_sizes": (63,)}, "batch 63 does not split over 2 workers"),
        ({"batch_sizes": (4096,)}, "bigger than the 1000 training samples"),
        ({"temperatures": (0.005,)}, "at least 1/max_logit_scale"),
        ({"grace_period": 150, "max_steps": 150}, "grace period 150"),
        ({"reduction_factor": 1}, "reduction factor"),
        ({"seeds": ()}, "seeds is empty"),
    ],
)
def test_bad_sweeps_are_refused_with_the_reason(changes, message):
    with pytest.raises(ValueError, match=message):
        check_sweep(sweep(**changes), TRAIN, num_samples=1000)


def test_a_sweep_without_zero_shot_probes_is_refused():
    never = dataclasses.replace(TRAIN, zeroshot_every_steps=0)
    with pytest.raises(ValueError, match="zeroshot_every_steps must be >= 1"):
        check_sweep(SweepConfig(), never, num_samples=1000)


def test_the_presets_sweeps_are_valid():
    for name in ("tiny", "demo", "datacomp-small"):
        cfg = get_preset(name, sweep=True)
        check_sweep(cfg.sweep, cfg.train)


def test_optuna_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ValueError, match="optuna search needs optuna"):
        check_sweep(sweep(search="optuna"), TRAIN)


def test_search_and_scheduler_selection(tmp_path):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.tune.scheduler import RungAwareLimiter, RungAwareVariants, SuccessiveHalving

    # The default: synchronous successive halving over the whole grid (3 x 2 here), its
    # generator limited to 2 unpaused trials at once.
    grid = _tuner_config(sweep(), concurrency=2, sweep_dir=tmp_path)
    assert isinstance(grid.scheduler, SuccessiveHalving)
    assert isinstance(grid.search_alg, RungAwareVariants)
    assert grid.search_alg.max_concurrent == 2 and grid.scheduler.concurrency == 2
    assert grid.scheduler.expected_trials == 6 and grid.scheduler.rungs == [30, 90]
    assert (grid.metric, grid.mode) == ("zeroshot_top1", "max")
    asha = _tuner_config(sweep(scheduler="asha"), concurrency=2, sweep_dir=tmp_path)
    assert isinstance(asha.search_alg, BasicVariantGenerator)
    # Tune ignores max_concurrent_trials for a search algorithm passed in: the limit is its own.
    assert asha.search_alg.max_concurrent == 2
    assert isinstance(asha.scheduler, AsyncHyperBandScheduler)
    optuna = _tuner_config(sweep(search="optuna", scheduler="none", num_samples=6), 3, tmp_path)
    assert isinstance(optuna.search_alg, OptunaSearch)
    assert optuna.max_concurrent_trials == 3 and optuna.num_samples == 6
    assert isinstance(optuna.scheduler, FIFOScheduler)
    halving_optuna = _tuner_config(sweep(search="optuna", num_samples=6), 3, tmp_path)
    assert isinstance(halving_optuna.search_alg, RungAwareLimiter)
    assert halving_optuna.scheduler.expected_trials == 6
    rand = _tuner_config(sweep(search="random", num_samples=5), 1, tmp_path)
    assert isinstance(rand.search_alg, BasicVariantGenerator) and rand.num_samples == 5


def test_halving_rungs_fall_on_probes_and_margins_are_checked():
    with pytest.raises(ValueError, match="grace period 25 must be a multiple of the probe"):
        check_sweep(sweep(grace_period=25), TRAIN)
    with pytest.raises(ValueError, match="keep_within_se must not be negative"):
        check_sweep(sweep(keep_within_se=-1.0), TRAIN)
    # ASHA judges whatever report comes first past a rung: no such constraint.
    check_sweep(sweep(grace_period=25, scheduler="asha"), TRAIN)
    for name in ("tiny", "demo", "datacomp-small"):
        assert get_preset(name).sweep.scheduler == "halving"


def test_concurrency_fits_whole_trials_into_the_cluster():
    two_cores = {"CPU": 2.0}
    # 2 workers x 0.5 CPU (the training config's) + 0.5 for data + 0.05 for the Tune
    # function: one trial at a time.
    big = sweep(data_cpus_per_trial=0.5)
    assert concurrent_trials(big, TRAIN, two_cores) == 1
    # 1 worker x 0.5 + 0.25 + 0.05 = 0.8 CPU: two trials.
    small = sweep(data_cpus_per_trial=0.25)
    one_worker = dataclasses.replace(TRAIN, num_workers=1)
    assert concurrent_trials(small, one_worker, two_cores) == 2
    # The demo's own: one worker on 1 CPU + 0.25 for data + 0.05: one trial at a time.
    assert concurrent_trials(SweepConfig(), get_preset("demo", sweep=True).train, two_cores) == 1
    # GPUs bound it: 8 GPUs, 2 per trial, plenty of CPUs.
    gpu_train = dataclasses.replace(TRAIN, use_gpu=True, cpus_per_worker=4)
    assert concurrent_trials(big, gpu_train, {"CPU": 96.0, "GPU": 8.0}) == 4
    assert concurrent_trials(sweep(max_concurrent_trials=3), TRAIN, two_cores) == 3
    with pytest.raises(ValueError, match="one trial needs 1.55 CPUs"):
        concurrent_trials(big, TRAIN, {"CPU": 1.0})


def _job(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pretrain_sweep_on_own_data_needs_a_val_folder(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://example.com/a.jpg,a red square\n")
    done = _job("pretrain.py", "--sweep", "--input", str(urls), "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: a sweep ranks trials on a held-out image folder: pass --val-dataset"
    ]
    assert not (tmp_path / "r" / "sweep").exists()


def test_sweep_job_refuses_a_run_dir_without_shards(tmp_path):
    val = tmp_path / "val" / "red"
    val.mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(val / "0.png")
    run = tmp_path / "run"
    done = _job("sweep.py", "--run-dir", str(run), "--val-dataset", str(val.parent))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no Parquet shards in {run / 'data' / 'shards'}: run jobs/prepare_data.py first"
    ]
