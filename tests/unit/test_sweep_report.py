"""The sweep's leaderboard, report.html, hparams events and --show, from synthetic histories."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pipeline.config import SweepConfig, TrainConfig
from pipeline.tune.report import (
    format_leaderboard,
    read_sweep,
    write_hparams,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 6


def _hparams(temperature, batch, lr=1e-3, learn=True, seed=0):
    return {
        "temperature": temperature,
        "learn_temperature": learn,
        "batch_size": batch,
        "lr": lr,
        "seed": seed,
    }


def write_trial(sweep_dir: Path, trial_id: str, hparams, top1s, end, with_checkpoint=True):
    """A history.jsonl as TrialHistory writes it: params, one line per report, the end."""
    d = sweep_dir / f"trial_{trial_id}"
    d.mkdir(parents=True)
    params = {
        "init_temperature": hparams["temperature"],
        "learn_temperature": hparams["learn_temperature"],
        "global_batch_size": hparams["batch_size"],
        "seed": hparams["seed"],
    }
    lines = [{"trial_id": trial_id, "params": params, "hparams": hparams}]
    for i, top1 in enumerate(top1s):
        step = 2 * (i + 1)
        checkpoint = d / "train" / f"checkpoint_{step}"
        if with_checkpoint:
            checkpoint.mkdir(parents=True)
        lines.append(
            {
                "step": step, "zeroshot_top1": top1, "loss": 3.0 - step / 10,
                "logit_scale": 1 / hparams["temperature"], "checkpoint_path": str(checkpoint),
            }
        )  # fmt: skip
    if end:
        lines.append({"end": end})
    (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """Six trials: two completed, two stopped by ASHA, one errored, one still running."""
    d = tmp_path / "run" / "sweep"
    d.mkdir(parents=True)
    config = {
        "sweep": dataclasses.asdict(SweepConfig(max_steps=MAX_STEPS)),
        "train": dataclasses.asdict(TrainConfig()),
        "val_dataset": "/data/val",
    }
    (d / "sweep_config.json").write_text(json.dumps(config))
    write_trial(d, "a_00000", _hparams(0.07, 64), [0.2, 0.5, 0.6], "complete")
    write_trial(d, "a_00001", _hparams(0.07, 128), [0.3, 0.6, 0.8], "complete")
    write_trial(d, "a_00002", _hparams(0.5, 64), [0.1], "complete")  # stopped at step 2
    write_trial(d, "a_00003", _hparams(0.5, 128), [0.25, 0.3], "complete")  # stopped at step 4
    write_trial(d, "a_00004", _hparams(0.02, 64), [0.9], "error")
    write_trial(d, "a_00005", _hparams(0.02, 128), [0.4], None)
    return d


def test_statuses_ranking_and_winner(sweep_dir):
    config, trials = read_sweep(sweep_dir)
    assert config["sweep"]["max_steps"] == MAX_STEPS
    by_id = {t["trial_id"]: t for t in trials}
    assert {k: t["status"] for k, t in by_id.items()} == {
        "a_00000": "completed",
        "a_00001": "completed",
        "a_00002": "stopped",
        "a_00003": "stopped",
        "a_00004": "error",
        "a_00005": "running",
    }
    # Ranked by the last measured top-1.
    assert [t["trial_id"] for t in trials] == [
        "a_00004", "a_00001", "a_00000", "a_00005", "a_00003", "a_00002",
    ]  # fmt: skip
    best = by_id["a_00001"]
    assert (best["final_top1"], best["best_top1"], best["steps"]) == (0.8, 0.8, 6)
    assert best["final_temperature"] == pytest.approx(0.07)
    assert best["checkpoint"].endswith("checkpoint_6")


def test_a_resumed_trial_keeps_its_newest_report_per_step(tmp_path, sweep_dir):
    # The driver died after step 4; the resumed trial reported step 4 again, then 6.
    d = write_trial(sweep_dir, "b_00000", _hparams(0.1, 64), [0.1, 0.2], None)
    with (d / "history.jsonl").open("a") as f:
        f.write('{"step": 4, "zeroshot_top1": 0.7, "lo')  # cut short by the kill
        f.write("\n" + json.dumps({"trial_id": "b_00000", "params": {}, "hparams": {}}) + "\n")
        for step, top1 in ((4, 0.25), (6, 0.35)):
            f.write(json.dumps({"step": step, "zeroshot_top1": top1}) + "\n")
        f.write(json.dumps({"end": "complete"}) + "\n")
    _, trials = read_sweep(sweep_dir)
    t = next(t for t in trials if t["trial_id"] == "b_00000")
    assert [(r["step"], r["zeroshot_top1"]) for r in t["history"]] == [
        (2, 0.1),
        (4, 0.25),
        (6, 0.35),
    ]
    assert t["status"] == "completed"


def test_leaderboard_text(sweep_dir):
    _, trials = read_sweep(sweep_dir)
    text = format_leaderboard(trials, sweep_dir)
    lines = text.splitlines()
    assert lines[0].endswith("6 trials, 2 stopped early, 22 training steps")
    assert lines[1].split() == [
        "#", "trial", "temp", "learn", "batch", "lr", "seed", "steps", "status", "top1",
        "best", "end", "temp", "loss", "stopped:", "top1", "<", "bar",
    ]  # fmt: skip
    rows = [line.split() for line in lines[3:-1]]
    assert [r[1] for r in rows] == [t["trial_id"] for t in trials]
    assert rows[1][1:11] == [
        "a_00001", "0.07", "yes", "128", "1.00e-03", "0", "6", "completed", "80.0%", "80.0%",
    ]  # fmt: skip
    # The errored trial ranks first by accuracy but cannot win.
    assert lines[-1] == "winner: a_00001 (top1 80.0% at step 6)"


def test_report_html_references_pngs_that_exist(sweep_dir):
    summary = write_report(sweep_dir)
    page = (sweep_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == ["heatmap.png", "curves.png"]
    for name in images:
        data = (sweep_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert page.count("<tr") == 1 + 6  # header + one row per trial
    assert '<tr class="winner"><td>2</td><td>a_00001</td>' in page
    assert summary["winner"]["trial_id"] == "a_00001"
    assert (summary["trials"], summary["stopped_early"], summary["steps_total"]) == (6, 2, 22)
    saved = json.loads((sweep_dir / "leaderboard.json").read_text())
    assert [t["trial_id"] for t in saved["leaderboard"]][:2] == ["a_00004", "a_00001"]


def test_hparams_are_readable_by_tensorboard(sweep_dir):
    _, trials = read_sweep(sweep_dir)
    tb = write_hparams(trials, sweep_dir / "tensorboard")
    write_hparams(trials, tb)  # rewritten, not appended: one session per trial
    runs = sorted(p.name for p in tb.iterdir())
    assert runs == sorted(t["trial_id"] for t in trials)
    events = EventAccumulator(str(tb / "a_00001"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["temperature"].number_value == pytest.approx(0.07)
    assert hp["batch_size"].number_value == 128
    assert hp["learn_temperature"].bool_value is True
    assert hp["status"].string_value == "completed"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"hparams/final_top1", "hparams/best_top1", "hparams/steps"} <= metric_tags
    # The HPARAMS tab reads each metric as the run's scalar of that tag.
    assert events.Scalars("hparams/final_top1")[-1].value == pytest.approx(0.8)
    assert [e.step for e in events.Scalars("sweep/zeroshot_top1")] == [2, 4, 6]


def _jobs_sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "sweep.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_show_prints_the_leaderboard(sweep_dir):
    done = _jobs_sweep("--show", str(sweep_dir.parent))
    assert done.returncode == 0, done.stderr
    _, trials = read_sweep(sweep_dir)
    assert done.stdout.strip() == format_leaderboard(trials, sweep_dir)


def test_show_without_a_sweep_is_one_error_line(tmp_path):
    done = _jobs_sweep("--show", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no sweep in {tmp_path / 'sweep'}: sweep_config.json is missing"
    ]
