"""train.num_workers "auto": the layout chosen from the cluster, and the line that says why
(no Ray: the cluster is given as its nodes' CPUs and GPUs)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from pipeline import pretrain
from pipeline.config import TrainConfig, get_preset
from pipeline.rundir import RunDir
from pipeline.spec import spec_of
from pipeline.train.layout import Cluster, resolve_layout
from pipeline.train.loop import build_trainer, check_config
from pipeline.tune.sweep import trial_resources, trial_train_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

from common import job_parser, spec_from_args  # noqa: E402

AUTO = TrainConfig()  # the default is auto


def test_the_default_is_auto_and_integers_still_work():
    assert AUTO.num_workers == "auto"
    parser = job_parser("test", ("train",))
    for flags, value in (
        ([], "auto"),
        (["--num-workers", "2"], 2),
        (["--num-workers", "auto"], "auto"),
    ):
        spec = spec_from_args(parser, parser.parse_args(flags), ("train",))
        assert spec.config.train.num_workers == value
    # The spec (and so RUN/config.json) keeps the word, not what it resolved to.
    assert spec.to_dict()["config"]["train"]["num_workers"] == "auto"


@pytest.mark.parametrize("value", [0, -1, "four", True])
def test_anything_else_is_refused_before_ray(value):
    with pytest.raises(ValueError, match="neither auto nor a positive integer"):
        check_config(dataclasses.replace(AUTO, num_workers=value))


def test_a_config_file_may_say_auto_or_a_count(tmp_path):
    parser = job_parser("test", ("train",))
    for text, value in (("train: {num_workers: 3}", 3), ("train: {num_workers: auto}", "auto")):
        (tmp_path / "c.yaml").write_text(text)
        args = parser.parse_args(
            ["--config", str(tmp_path / "c.yaml"), "--global-batch-size", "96"]
        )
        assert spec_from_args(parser, args, ("train",)).config.train.num_workers == value


def test_two_cores_no_gpu_one_worker_on_both():
    layout = resolve_layout(AUTO, Cluster(((2.0, 0.0),)))
    assert (layout.num_workers, layout.threads, layout.use_gpu, layout.auto) == (1, 2, False, True)
    # The worker leaves Ray Data's decode tasks room beside it (0.25 CPU each).
    assert layout.cpus_per_worker == 1.5
    assert layout.why.startswith("auto: 1 worker x (1.5 CPU, 2 threads): ")
    assert "this machine has 2 CPUs and no GPU" in layout.why
    assert "\n" not in layout.why


def test_a_bigger_node_keeps_a_quarter_for_decoding():
    layout = resolve_layout(AUTO, Cluster(((16.0, 0.0),), local=False))
    assert (layout.num_workers, layout.cpus_per_worker, layout.threads) == (1, 12.0, 12)
    assert "the cluster's one node has 16 CPUs" in layout.why


def test_gpus_one_worker_each():
    cfg = dataclasses.replace(AUTO, use_gpu=True, cpus_per_worker=4)
    layout = resolve_layout(cfg, Cluster(((32.0, 8.0),)))
    assert (layout.num_workers, layout.use_gpu, layout.cpus_per_worker, layout.threads) == (
        8,
        True,
        4,
        4,
    )
    assert "one per GPU (8 in the cluster)" in layout.why
    # 6 GPUs do not split a batch of 256: the most that do, and the message says why.
    layout = resolve_layout(cfg, Cluster(((16.0, 4.0), (16.0, 2.0))))
    assert layout.num_workers == 4
    assert "so the global batch 256 splits evenly" in layout.why


def test_use_gpu_without_a_gpu_is_refused_rather_than_run_on_cpus():
    cfg = dataclasses.replace(AUTO, use_gpu=True)
    with pytest.raises(ValueError, match="has no GPU now .* give --num-workers N"):
        resolve_layout(cfg, Cluster(((8.0, 0.0),)))


def test_gpus_are_left_alone_when_use_gpu_is_off():
    layout = resolve_layout(AUTO, Cluster(((8.0, 1.0),)))
    assert (layout.num_workers, layout.use_gpu) == (1, False)
    assert "train.use_gpu is off" in layout.why


def test_several_cpu_nodes_one_worker_each_sized_to_the_smallest():
    layout = resolve_layout(AUTO, Cluster(((0.0, 0.0), (8.0, 0.0), (4.0, 0.0)), local=False))
    # The head with no CPUs runs no worker; 4 CPUs - a quarter = 3 each.
    assert (layout.num_workers, layout.cpus_per_worker, layout.threads) == (2, 3.0, 3)
    assert "2 CPU nodes: one worker per node" in layout.why


def test_an_integer_is_taken_as_given_without_a_cluster():
    cfg = dataclasses.replace(AUTO, num_workers=2, cpus_per_worker=0.5)
    layout = resolve_layout(cfg, None)
    assert (layout.num_workers, layout.cpus_per_worker, layout.threads, layout.auto) == (
        2,
        0.5,
        1,
        False,
    )
    # The trainer asks Ray for exactly that (no Ray needed to build it).
    scaling = build_trainer(cfg, Path("/nonexistent"), 10_000, Path("/tmp")).scaling_config
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5}


def test_the_trainer_asks_for_the_layout_it_is_given(tmp_path):
    layout = resolve_layout(AUTO, Cluster(((2.0, 0.0),)))
    trainer = build_trainer(AUTO, tmp_path, 10_000, tmp_path, layout=layout)
    assert trainer.scaling_config.num_workers == 1
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.5}
    assert trainer.train_loop_config["threads"] == 2


def test_a_sweep_trial_gets_one_worker_for_auto():
    sweep = get_preset("demo").sweep
    params = {"init_temperature": 0.1, "learn_temperature": False, "global_batch_size": 128}
    params["seed"] = 0
    trial = trial_train_config(AUTO, sweep, params)
    assert trial.num_workers == 1
    assert trial_resources(sweep, AUTO)["CPU"] == pytest.approx(
        sweep.driver_cpus_per_trial + AUTO.cpus_per_worker + sweep.data_cpus_per_trial
    )
    two = dataclasses.replace(AUTO, num_workers=2)
    assert trial_train_config(two, sweep, params).num_workers == 2


def test_dry_run_shows_auto_and_what_it_would_be_here(tmp_path, capsys):
    spec = spec_of(get_preset("tiny"), tmp_path / "run", ("train",), dry_run=True)
    rows = pretrain.plan(spec, RunDir.at(spec.run_dir))
    text = pretrain.format_plan(spec, rows)
    assert '"num_workers": "auto"' in text
    assert "num_workers auto -> 1 worker x (" in text


def test_summary_reports_seconds_per_stage_and_the_layout(tmp_path):
    run = RunDir.at(tmp_path / "run")
    spec = spec_of(get_preset("tiny"), run.root, ("train",))
    layout = resolve_layout(AUTO, Cluster(((2.0, 0.0),)))
    run.mark_done(
        "train",
        "x",
        metrics={"step": 4, "loss": 1.0, "samples_per_second": 9.0},
        layout=dataclasses.asdict(layout),
    )
    seconds = {"setup": 2.0, "ray_start": 3.04, "train": 40.0}
    summary = pretrain.summary(spec, run, seconds, 45.5)
    assert summary["stage_seconds"] == {"setup": 2.0, "ray_start": 3.0, "train": 40.0}
    assert summary["wall_seconds"] == 45.5
    assert (summary["train"]["workers"], summary["train"]["threads_per_worker"]) == (1, 2)
    assert json.loads(Path(run.summary_path).read_text())["stage_seconds"]["train"] == 40.0
    line = [x for x in pretrain.format_summary(summary).splitlines() if x.startswith("time")]
    assert line == ["time : 46s in all (setup 2s, ray_start 3s, train 40s)"]


def test_the_train_stage_splits_its_time_at_the_workers_marks():
    marks = {"marks_loop_at": 105.0, "marks_ready_at": 107.5, "marks_first_batch_at": 109.0}
    metrics = {**marks, "marks_end_at": 400.0, "step": 360}
    assert pretrain.train_seconds(metrics, 100.0, 403.0) == {
        "workers_start": 5.0,
        "model_and_data_plan": 2.5,
        "first_batch": 1.5,
        "steps": 291.0,
        "checkpoint_export": 3.0,
    }
    assert pretrain.train_seconds({"step": 360}, 100.0, 403.0) == {}  # no marks: no split


def test_dry_run_with_use_gpu_on_a_machine_without_one_is_not_refused(tmp_path, monkeypatch):
    import pipeline.train.layout as layout_module

    monkeypatch.setattr(layout_module, "this_machine", lambda: Cluster(((2.0, 0.0),)))
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_gpu=True))
    spec = spec_of(cfg, tmp_path / "run", ("train",), dry_run=True)
    (row,) = pretrain.plan(spec, RunDir.at(spec.run_dir))
    assert row["action"] == "run"  # the cluster Ray joins may have the GPUs
    assert "num_workers auto: decided from the cluster once Ray starts" in row["resources"]


def test_the_train_split_prints_in_the_order_it_happens(tmp_path):
    run = RunDir.at(tmp_path / "run")
    spec = spec_of(get_preset("tiny"), run.root, ("train",))
    split = {"steps": 90.0, "checkpoint_export": 8.0, "workers_start": 48.0}
    run.mark_done("train", "x", metrics={"step": 4, "loss": 1.0, "samples_per_second": 9.0},
                  seconds=split)  # fmt: skip
    summary = pretrain.summary(spec, run, {"train": 150.0}, 151.0)
    text = pretrain.format_summary(summary)
    assert "       train: workers_start 48s, steps 90s, checkpoint_export 8s" in text
