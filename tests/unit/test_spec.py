"""The run spec: preset -> config file -> flags, generated flags, identities, dry run (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import pretrain
from pipeline.config import get_preset
from pipeline.rundir import RunDir, StageConfigMismatch
from pipeline.spec import SpecError, build_spec, diff, spec_of

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

from common import job_parser, spec_from_args  # noqa: E402

PRETRAIN = ("train", "prepare", "eval", "sweep", "demo")
INPUTS = ("url_list", "val_dataset", "eval_dataset")


def spec(args: list[str], sections=PRETRAIN, stages=("prepare", "train", "evaluate"), **kw):
    parser = job_parser("test", sections, inputs=INPUTS)
    return spec_from_args(parser, parser.parse_args(args), stages, **kw)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


# -- precedence -----------------------------------------------------------------------------
def test_config_file_overrides_the_preset_and_flags_override_the_file(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "train:\n  lr: 0.001\n  weight_decay: 0.05\nprepare:\n  download:\n    image_size: 96\n"
    )
    s = spec(["--preset", "tiny", "--config", str(yaml_file), "--lr", "0.003"])
    cfg = s.config
    assert cfg.train.lr == 0.003  # flag over file
    assert cfg.train.weight_decay == 0.05  # file over preset
    assert cfg.prepare.download.image_size == 96
    assert cfg.train.global_batch_size == get_preset("tiny").train.global_batch_size  # preset
    assert dict(s.set_by) == {
        "train.lr": "--lr",
        "train.weight_decay": str(yaml_file),
        "prepare.download.image_size": str(yaml_file),
    }
    # JSON with dotted keys works the same; lists become tuples.
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"prepare.filters.caption_blocklist": ["spam", "ad"]}))
    cfg = spec(["--config", str(json_file)]).config
    assert cfg.prepare.filters.caption_blocklist == ("spam", "ad")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lrr: 0.1\n", "unknown field 'train.lrr' (did you mean 'train.lr'?)"),
        ("train:\n  epochs: ten\n", "field 'train.epochs': expected an integer, got 'ten'"),
        ("train:\n  use_gpu: 1\n", "field 'train.use_gpu': expected true or false"),
        ("prepare:\n  download:\n    resize_mode: stretch\n", "'stretch' is not one of no,"),
        ("- 1\n- 2\n", "expected a mapping of fields"),
    ],
)
def test_a_bad_config_file_names_the_field_and_the_file(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SpecError) as err:
        spec(["--config", str(bad)])
    assert message in str(err.value) and str(bad) in str(err.value)


def test_a_bad_config_file_is_one_error_line_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"loss": "hinge"}}))
    run = tmp_path / "run"
    done = _run("jobs/pretrain.py", "--config", str(bad), "--run-dir", str(run))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {bad}: field 'train.loss': 'hinge' is not one of clip, siglip"
    ]
    assert not run.exists()


# -- generated flags ------------------------------------------------------------------------
def test_short_names_and_dotted_paths_set_the_same_field():
    a = spec(["--image-size", "128", "--min-image-size", "50", "--thread-count", "4"]).config
    b = spec(
        ["--prepare.download.image_size", "128", "--prepare.filters.min_image_side", "50"]
        + ["--prepare.download.thread_count", "4"]
    ).config
    assert a == b
    assert (a.prepare.download.image_size, a.prepare.filters.min_image_side) == (128, 50)
    cfg = spec(["--caption-blocklist", "spam,^ad ", "--encode-format", "webp"]).config
    assert cfg.prepare.filters.caption_blocklist == ("spam", "^ad")
    assert cfg.prepare.download.encode_format == "webp"


def test_booleans_switch_both_ways_and_old_names_still_work():
    on = spec(["--preset", "datacomp-small"]).config.train
    assert on.use_gpu is True
    off = spec(["--preset", "datacomp-small", "--no-use-gpu", "--no-learn-temperature"])
    assert (off.config.train.use_gpu, off.config.train.learn_temperature) == (False, False)
    assert spec(["--fixed-temperature"]).config.train.learn_temperature is False
    assert spec(["--train.use_gpu"]).config.train.use_gpu is True
    none = spec(["--near-duplicate-distance", "none", "--preset", "datacomp-small"]).config
    assert none.prepare.filters.near_duplicate_distance is None


def test_choices_are_listed_and_enforced():
    done = _run("jobs/prepare_data.py", "--resize-mode", "stretch")
    assert done.returncode == 2
    assert "invalid choice: 'stretch'" in done.stderr and "center_crop" in done.stderr
    help_text = _run("jobs/prepare_data.py", "--help").stdout
    assert "--resize-mode {no,keep_ratio,center_crop,border}" in help_text
    for flag in ("--image-size", "--encode-quality", "--timeout", "--retries", "--rows-per-shard"):
        assert flag in help_text, flag


def test_a_job_offers_only_the_flags_it_uses():
    train = job_parser("t", ("train",), inputs=("val_dataset",))
    options = {o for a in train._actions for o in a.option_strings}
    assert {"--lr", "--weight-decay", "--warmup-steps", "--log-every-steps"} <= options
    assert "--image-size" not in options and "--input" not in options
    prepare = job_parser("p", ("prepare", "demo"), inputs=("url_list",))
    options = {o for a in prepare._actions for o in a.option_strings}
    assert "--lr" not in options and "--grace-period" not in options
    # A sweep field added to SweepConfig gets its flags without being listed anywhere.
    sweep = job_parser("s", ("sweep", "train", "eval"))
    options = {o for a in sweep._actions for o in a.option_strings}
    assert {"--grace-period", "--sweep.grace_period", "--max-concurrent"} <= options
    assert "--sweep.max_concurrent_trials" in options


# -- sweeps ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--init-temperature", "0.1"], "sweep.temperatures"),
        (["--global-batch-size", "64"], "sweep.batch_sizes"),
        (["--lr", "1e-3"], "sweep.lr_rule"),
        (["--seed", "3"], "sweep.seeds"),
        (["--max-steps", "9"], "sweep.max_steps"),
    ],
)
def test_a_flag_naming_a_swept_field_is_refused(flags, named):
    with pytest.raises(SpecError) as err:
        spec(flags, sweep=True)
    assert flags[0] in str(err.value) and named in str(err.value)


def test_every_other_flag_applies_to_every_trial():
    from pipeline.tune.sweep import trial_train_config

    s = spec(["--preset", "tiny", "--warmup-steps", "3", "--weight-decay", "0.3"], sweep=True)
    assert s.stages == ("prepare", "sweep", "evaluate")
    params = {"init_temperature": 0.1, "learn_temperature": True, "global_batch_size": 32}
    trial = trial_train_config(s.config.train, s.config.sweep, {**params, "seed": 0})
    assert (trial.warmup_steps, trial.weight_decay) == (3, 0.3)
    assert trial.init_temperature == 0.1  # the axis


def test_a_config_file_naming_a_swept_field_is_refused_too(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("train:\n  seed: 4\n")
    with pytest.raises(SpecError, match="sweep.seeds"):
        spec(["--config", str(f)], sweep=True)


# -- identities -----------------------------------------------------------------------------
def _shards(folder: str | Path, rows: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [str(i) for i in range(rows)]}), folder / "00000.parquet")


def test_a_refused_rerun_names_every_changed_field(tmp_path):
    run = RunDir.at(tmp_path / "run")
    _shards(run.shards, 10)
    old = build_spec(stages=("train",), run_dir=str(run.root))
    pretrain.finish(run, "train", pretrain.train_identity(old, run), metrics={})
    new = build_spec(
        stages=("train",),
        run_dir=str(run.root),
        flags={"train.lr": (1e-3, "--lr"), "train.epochs": (3, "--epochs")},
    )
    with pytest.raises(StageConfigMismatch) as err:
        pretrain.decide(run, "train", pretrain.train_identity(new, run), force=False)
    epochs = old.config.train.epochs  # the demo preset's
    assert "lr: 0.002 -> 0.001" in str(err.value) and f"epochs: {epochs} -> 3" in str(err.value)
    assert pretrain.decide(run, "train", pretrain.train_identity(old, run), False).run is False


def test_new_shards_make_train_and_eval_run_again(tmp_path):
    """prepare --force leaving other shards: the finished train (and eval of its model) rerun."""
    run = RunDir.at(tmp_path / "run")
    _shards(run.shards, 10)
    s = build_spec(stages=("train",), run_dir=str(run.root))
    pretrain.finish(run, "train", pretrain.train_identity(s, run), metrics={})
    assert not pretrain.decide(run, "train", pretrain.train_identity(s, run), False).run
    (Path(run.train) / "checkpoint_000001").mkdir(parents=True)
    _shards(run.shards, 12)  # prepare wrote other shards
    decision = pretrain.decide(run, "train", pretrain.train_identity(s, run), False)
    assert decision.run and decision.fresh
    assert decision.why.startswith("its input changed since it ran: inputs.shards (from prepare): ")
    log: list[str] = []
    pretrain.begin(s, run, "train", pretrain.train_identity(s, run), log.append, run.train)
    assert not (Path(run.train) / "checkpoint_000001").exists()  # no stale checkpoint to resume
    assert log == [f"[train] {decision.why}: running it again"]
    # Eval's identity holds the model's weights.
    Path(run.model).mkdir(parents=True)
    (Path(run.model) / "open_clip_model.safetensors").write_bytes(b"weights one")
    before = pretrain.model_fingerprint(run.model)
    (Path(run.model) / "open_clip_model.safetensors").write_bytes(b"weights two")
    assert pretrain.model_fingerprint(run.model) != before


def test_diff_lists_nested_changes_with_old_and_new_values():
    old = {"config": {"a": 1, "b": {"c": [1, 2]}}, "inputs": {"x": "1"}}
    new = {"config": {"a": 1, "b": {"c": [1, 3]}, "d": True}, "inputs": {"x": "1"}}
    assert diff(old, new) == ["config.b.c: [1, 2] -> [1, 3]", "config.d: (absent) -> true"]


# -- dry run and saved spec -----------------------------------------------------------------
def _ray_refused(monkeypatch):
    """Makes the jobs' init_ray fail the test (Ray may already be up in this pytest process:
    the integration tests' session cluster, so ray.is_initialized() says nothing here)."""
    import common

    def refuse(address):
        raise AssertionError("init_ray was called")

    monkeypatch.setattr(common, "init_ray", refuse)
    return common.run_spec


def test_dry_run_prints_the_plan_without_ray_or_writes(tmp_path, capsys, monkeypatch):
    run_spec = _ray_refused(monkeypatch)
    run = tmp_path / "run"
    s = spec(["--preset", "tiny", "--run-dir", str(run), "--dry-run", "--lr", "0.001"])
    run_spec(s, address=None)
    out = capsys.readouterr().out
    assert not run.exists()
    resolved = json.loads(out.split("== Resolved spec ==\n")[1].split("\n\n== Plan")[0])
    assert resolved["config"]["train"]["lr"] == 0.001
    assert resolved["set_by"] == {"train.lr": "--lr"}
    assert "prepare   RUN      not finished yet" in out
    assert "num_workers auto -> 1 worker x (" in out and "2 epochs of the shards" in out
    # Once shards exist the plan counts the steps, and a finished stage shows as skipped.
    _shards(run / "data" / "shards", 128)
    flags = ["--preset", "tiny", "--run-dir", str(run), "--dry-run", "--num-workers", "2"]
    s = spec(flags, stages=("train",))
    rows = pretrain.plan(s, RunDir.at(run))
    assert rows[0]["steps"] == "4 steps of 64 samples"  # 2 epochs x 128 rows / 64
    assert rows[0]["resources"].startswith("2 workers x (0.5 CPU, 1 thread)")
    pretrain.finish(RunDir.at(run), "train", pretrain.train_identity(s, RunDir.at(run)))
    (row,) = pretrain.plan(s, RunDir.at(run))
    assert row["action"] == "skip" and "already finished" in row["why"]


def test_the_resolved_spec_round_trips_through_json(tmp_path):
    s = spec_of(get_preset("tiny"), tmp_path / "run", ("train",))
    data = json.loads(json.dumps(s.to_dict()))
    assert data["config"]["train"] == json.loads(json.dumps(s.to_dict()["config"]["train"]))
    assert data["run_dir"] == str((tmp_path / "run").resolve())


# -- outputs --------------------------------------------------------------------------------
def test_run_card_describes_the_model(tmp_path):
    import open_clip
    import ray
    import torch

    run = RunDir.at(tmp_path / "run")
    _shards(run.shards, 10)
    s = build_spec(stages=("train",), run_dir=str(run.root))
    ident = pretrain.train_identity(s, run)
    metrics = {"step": 40, "logit_scale": 20.0, "loss": 1.5}
    pretrain.write_run_card(s, run, ident, metrics, global_batch_size=64)
    card = json.loads((Path(run.model) / "run_card.json").read_text())
    assert (card["final_step"], card["samples_seen"]) == (40, 40 * 64)
    assert card["temperature"] == pytest.approx(0.05)
    assert card["shards_fingerprint"] == pretrain.shards_fingerprint(run.shards)
    assert card["spec"]["config"]["train"]["lr"] == s.config.train.lr
    assert card["versions"] == {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "ray": ray.__version__,
    }
    pretrain._add_eval_to_run_card(run, {"top1": 0.5, "top5": 0.9})
    assert json.loads((Path(run.model) / "run_card.json").read_text())["eval"]["top1"] == 0.5


def test_clip_benchmark_shape():
    from pipeline.evaluate import clip_benchmark_keys

    keys = clip_benchmark_keys(
        {"top1": 0.5, "top5": 0.75, "mean_per_class_recall": 0.4}, model="RUN/model"
    )
    assert keys["task"] == "zeroshot_classification"
    assert keys["metrics"] == {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.4}


def test_progress_line():
    from pipeline.train.loop import progress_line

    metrics = {
        "epoch": 1,
        "loss": 3.4123,
        "logit_scale": 14.285714,
        "lr": 0.0019,
        "samples_per_second": 1234.4,
        "data_wait_fraction": 0.031,
    }
    assert progress_line(40, 312, metrics, 130) == (
        "[train] step 40/312 epoch 1 loss 3.412 temp 0.0700 lr 1.90e-03 1234 samples/s "
        "data wait 3% ETA 2m10s"
    )


def test_log_level_hides_ray_internal_warnings_only_by_default():
    import logging

    from pipeline.console import set_ray_console_level

    def shown(message: str, level: int = logging.WARNING) -> bool:
        record = logging.LogRecord("ray.data.x", level, __file__, 1, message, None, None)
        console = [
            h for h in logging.getLogger("ray.data").handlers if "File" not in type(h).__name__
        ]
        return all(h.filter(record) and record.levelno >= h.level for h in console)

    try:
        set_ray_console_level("warning")
        assert not shown("Progress bars disabled. To enable, set ...")
        assert not shown("Cluster resources are not enough ... The job may hang forever")
        assert shown("a block failed to read")
        assert not shown("Starting execution of Dataset", logging.INFO)
        set_ray_console_level("info")
        assert shown("Progress bars disabled. To enable, set ...")
        assert shown("Starting execution of Dataset", logging.INFO)
    finally:
        set_ray_console_level("warning")


def test_prepare_prints_its_progress_from_the_shard_markers(tmp_path):
    import time

    progress = tmp_path / "progress"
    progress.mkdir()
    lines: list[str] = []
    with pretrain.shard_ticker(progress, total=4, log=lines.append, every_s=0.05):
        (progress / "part-00000.json").write_text("{}")
        (progress / "fingerprint").write_text("x")  # not a marker
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        (progress / "part-00001.json").write_text("{}")
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert lines[0].startswith("[prepare] 1/4 shards finished after ")
    assert lines[1].startswith("[prepare] 2/4 shards finished after ") and "ETA" in lines[1]


def test_a_refused_rerun_stops_before_ray_and_writes_nothing(tmp_path, monkeypatch):
    run_spec = _ray_refused(monkeypatch)

    run = RunDir.at(tmp_path / "run")
    _shards(run.shards, 10)
    old = build_spec(stages=("train",), run_dir=str(run.root))
    pretrain.finish(run, "train", pretrain.train_identity(old, run), metrics={})
    new = spec(
        ["--run-dir", str(run.root), "--lr", "0.001"], sections=("train",), stages=("train",)
    )
    with pytest.raises(StageConfigMismatch, match=r"train\.lr: 0\.002 -> 0\.001"):
        run_spec(new, address=None)
    assert not (Path(run.root) / "config.json").exists()
