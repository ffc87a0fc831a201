"""A real sweep through the real CLI: killed mid-way, resumed, reported, its winner exported.

`python jobs/sweep.py` runs on a run directory of real Parquet shards (solid-colour images
captioned with their colour) with its own local Ray. The driver is SIGKILLed once a trial has
finished; rerunning the same command resumes the sweep. Then everything a user reads is
checked: the leaderboard, report.html and its PNGs, the TensorBoard hparams sessions, the
exported winner (against its checkpoint), the evaluation and summary.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.train.loop import CHECKPOINT_FILE
from pipeline.tune.report import read_sweep
from tests.integration.test_train_ray import COLOURS, _write_shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 16
# Two learning rates (one too small to move the weights) x two seeds: the trials that learn
# the colours rank above the ones that cannot, so ASHA has something to stop.
SWEEP_FLAGS = [
    "--temperatures", "0.05", "--batch-sizes", "32", "--lr-rule", "swept",
    "--lrs", "0.005,0.000000001", "--seeds", "0,1", "--max-steps", str(MAX_STEPS),
    "--grace-period", "4", "--reduction-factor", "2", "--zeroshot-every", "4",
]  # fmt: skip


def _image_folder(root: Path, per_class: int, offset: int) -> Path:
    for name, (r, g, b) in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = (offset + 7 * i) % 40
            colour = (max(r - shade, 0), max(g - shade, 0), max(b - shade, 0))
            Image.new("RGB", (64 + i, 64 + i), colour).save(root / name / f"{i}.png")
    (root / "templates.txt").write_text("a photo of something {}\n")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sweep-run")
    _write_shards(run / "data" / "shards", 256, files=2)
    _image_folder(run / "val", per_class=4, offset=0)
    _image_folder(run / "eval", per_class=3, offset=3)
    return run


def _command(run: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "jobs" / "sweep.py"), "--preset", "tiny",
        "--run-dir", str(run), "--address", "local",
        "--val-dataset", str(run / "val"), "--eval-dataset", str(run / "eval"), *SWEEP_FLAGS,
    ]  # fmt: skip


def _histories(run: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((run / "sweep").glob("trial_*/history.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
        out[path.parent.name] = lines
    return out


def _kill_when_a_trial_ended(run: Path, log: Path) -> dict[str, list[dict]]:
    """Start the sweep, SIGKILL its driver once a trial has ended (and Tune saved its state)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            _command(run), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 400
        ended_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            ended = [h for h in _histories(run).values() if any("end" in r for r in h)]
            if ended and ended_at is None:
                ended_at = time.monotonic()
            # Tune writes its experiment state every few seconds: give it time to record it.
            if ended_at is not None and time.monotonic() - ended_at > 12:
                break
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()}"
        assert ended_at is not None, f"no trial ended in time:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies; its local Ray goes with it
        proc.wait()
        return _histories(run)
    finally:
        try:  # what is left of the Ray processes this test started (same process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def swept(run_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    before = _kill_when_a_trial_ended(run_dir, logs / "killed.log")
    assert not (run_dir / "sweep" / "report.html").exists()
    done = subprocess.run(_command(run_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"before": before, "stdout": done.stdout}


def test_resume_keeps_finished_trials_and_completes_the_rest(run_dir, swept):
    before, after = swept["before"], _histories(run_dir)
    assert len(after) == 4
    finished_before = [t for t, h in before.items() if any("end" in r for r in h)]
    assert finished_before
    starts = {t: sum("params" in r for r in h) for t, h in after.items()}
    # A trial that had finished is not trained again: still one start, the same reports.
    assert any(starts[t] == 1 and after[t] == before[t] for t in finished_before)
    _, trials = read_sweep(run_dir / "sweep")
    assert all(t["status"] in ("completed", "stopped") for t in trials)
    assert "resuming the sweep" in swept["stdout"]


def test_asha_stopped_the_trials_that_do_not_learn(run_dir, swept):
    _, trials = read_sweep(run_dir / "sweep")
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, [(t["trial_id"], t["status"], t["final_top1"]) for t in trials]
    assert all(t["steps"] < MAX_STEPS for t in stopped)
    assert sum(t["steps"] for t in trials) < 4 * MAX_STEPS
    winner = trials[0]
    assert winner["status"] == "completed" and winner["hparams"]["lr"] == 0.005
    assert winner["final_top1"] > max(t["final_top1"] for t in stopped)


def test_report_and_hparams_are_readable(run_dir, swept):
    sweep_dir = run_dir / "sweep"
    page = (sweep_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == ["heatmap.png", "curves.png"]
    for name in images:
        assert (sweep_dir / name).stat().st_size > 5_000
    _, trials = read_sweep(sweep_dir)
    for t in trials:
        assert f"<td>{t['trial_id']}</td>" in page
        events = EventAccumulator(str(sweep_dir / "tensorboard" / t["trial_id"]))
        events.Reload()
        assert set(events.PluginTagToContent("hparams")) == {
            "_hparams_/experiment",
            "_hparams_/session_start_info",
            "_hparams_/session_end_info",
        }
        final = events.Scalars("hparams/final_top1")[-1].value
        assert final == pytest.approx(t["final_top1"])
    # --show prints the same leaderboard the job printed at its end.
    shown = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "sweep.py"), "--show", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and shown.stdout.strip() in swept["stdout"]


def test_winner_is_exported_evaluated_and_named_in_the_summary(run_dir, swept):
    _, trials = read_sweep(run_dir / "sweep")
    winner = trials[0]
    # The exported weights are the winner's last checkpoint, loadable with open_clip alone.
    state = torch.load(Path(winner["checkpoint"]) / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == winner["steps"] == MAX_STEPS
    exported = load_file(str(run_dir / "model" / "open_clip_model.safetensors"))
    assert set(exported) == set(state["model"])
    for name, tensor in state["model"].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'model'}")
    assert model.encode_image(preprocess(Image.new("RGB", (64, 64))).unsqueeze(0)).shape[0] == 1

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sweep"]["winner"]["trial_id"] == winner["trial_id"]
    assert summary["sweep"]["winner"]["hparams"] == winner["hparams"]
    assert summary["sweep"]["trials"] == 4
    # No training run here: the dashboards named are the sweep's, and they are on disk.
    assert "train" not in summary["paths"]
    assert summary["paths"]["tensorboard"] == str(run_dir / "sweep")
    for name in ("tensorboard", "sweep_report", "model", "eval_results"):
        assert Path(summary["paths"][name]).exists(), name
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert summary["eval"]["top1"] == results["top1"]
    assert results["num_images"] == 4 * 3
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["sweep"]["winner"]["trial_id"] == winner["trial_id"]
    assert "eval" in stages
