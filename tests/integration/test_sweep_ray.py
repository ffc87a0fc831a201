"""A real sweep through the real CLI: watched live, killed mid-way, resumed, reported, exported.

`python jobs/sweep.py` runs on a run directory of real Parquet shards (solid-colour images
captioned with their colour) with its own local Ray, under the default scheduler (synchronous
successive halving). report.html is read while trials are still running; the driver is
SIGKILLed once a rung has been judged; rerunning the same command resumes the sweep. Then
everything a user reads is checked: the rung decisions, the leaderboard, report.html and its
PNGs, the TensorBoard hparams sessions, the exported winner (against its checkpoint), the
evaluation and summary.json.
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
from pipeline.tune.scheduler import judge
from tests.integration.test_train_ray import COLOURS, _write_shards

# Two trial starts before the first rung is judged, then the resumed one: slow on a busy
# machine, and the kill-and-resume fixture counts toward the first test's time.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 16
TRIALS = 2
# Two learning rates, one too small to move the weights: the trial that learns the colours
# ranks above the one that cannot, so ASHA has something to stop. (Two seeds each, four trials,
# cost this file three more minutes of the suite for the same checks.)
SWEEP_FLAGS = [
    "--temperatures", "0.05", "--batch-sizes", "32", "--lr-rule", "swept",
    "--lrs", "0.005,0.000000001", "--seeds", "0", "--max-steps", str(MAX_STEPS),
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


def _judged(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("event") in ("promoted", "stopped")]


def _kill_when_a_rung_is_judged(run: Path, log: Path) -> tuple[dict[str, list[dict]], str]:
    """Start the sweep, SIGKILL its driver once a rung is judged (and Tune saved its state).

    Returns the histories at the kill and report.html as read while the sweep was running."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            _command(run), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # Every trial reaches the first rung before any ends (minutes on a busy machine).
        deadline = time.monotonic() + 900
        ended_at, live_page = None, None
        report = run / "sweep" / "report.html"
        while time.monotonic() < deadline and proc.poll() is None:
            histories = _histories(run)
            ended = [h for h in histories.values() if any("end" in r for r in h)]
            if live_page is None and report.exists() and len(ended) < len(histories):
                live_page = report.read_text()
            if any(_judged(h) for h in histories.values()) and ended_at is None:
                ended_at = time.monotonic()
            # Tune writes its experiment state every few seconds: give it time to record it.
            if ended_at is not None and time.monotonic() - ended_at > 12:
                break
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()}"
        assert ended_at is not None, f"no rung judged in time:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies; its local Ray goes with it
        proc.wait()
        return _histories(run), live_page
    finally:
        try:  # what is left of the Ray processes this test started (same process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def swept(run_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    before, live_page = _kill_when_a_rung_is_judged(run_dir, logs / "killed.log")
    done = subprocess.run(_command(run_dir), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"before": before, "stdout": done.stdout, "live_page": live_page}


def test_report_is_readable_while_the_sweep_runs(swept):
    page = swept["live_page"]
    assert page is not None, "report.html was not written while trials were still running"
    # Written mid-sweep: it lists trials, and some of them were not over yet.
    counts = re.search(r"(\d+) paused at a rung, (\d+) running", page)
    assert counts and int(counts[1]) + int(counts[2]) > 0, page[:2000]
    assert page.count("<tr") >= 2  # the leaderboard's header and at least one trial


def test_resume_keeps_finished_trials_and_completes_the_rest(run_dir, swept):
    before, after = swept["before"], _histories(run_dir)
    assert len(after) == TRIALS
    # A rung judged before the kill is not judged again after it: each trial has one decision
    # per rung, and those taken before the kill stand.
    judged_before = {(t, r["rung"]): r["event"] for t, h in before.items() for r in _judged(h)}
    assert judged_before
    judged_after = [(t, r["rung"], r["event"]) for t, h in after.items() for r in _judged(h)]
    assert len(judged_after) == len({(t, rung) for t, rung, _ in judged_after})
    assert all(judged_before.get((t, rung), event) == event for t, rung, event in judged_after)
    # A trial that had finished is not trained again: its history is as it was at the kill.
    finished_before = [t for t, h in before.items() if any("end" in r for r in h)]
    assert all(after[t] == before[t] for t in finished_before)
    # Trials paused at a rung were resumed from their checkpoints: more than one start each.
    starts = {t: sum("params" in r for r in h) for t, h in after.items()}
    resumed = [t for t, h in after.items() if any(r.get("event") == "resumed" for r in h)]
    assert resumed and all(starts[t] > 1 for t in resumed)
    _, trials = read_sweep(run_dir / "sweep")
    assert all(t["status"] in ("completed", "stopped") for t in trials)
    assert "resuming the sweep" in swept["stdout"]


def test_rungs_judged_by_the_rule_and_a_learner_wins(run_dir, swept):
    _, trials = read_sweep(run_dir / "sweep")
    # Each rung was judged on the set of values the trials reported there (the decision the
    # pure rule gives that set, whatever order they came in), each of those trials once.
    for rung in (4, 8):
        values = {
            t["trial_id"]: r["zeroshot_top1"]
            for t in trials
            for r in t["history"]
            if r["step"] == rung and any(e.get("rung") == rung for e in t["events"])
        }
        decided = {
            t["trial_id"]: e
            for t in trials
            for e in t["events"]
            if e["event"] in ("promoted", "stopped") and e["rung"] == rung
        }
        assert set(decided) == set(values) and values
        probe = {r.get("zeroshot_images") for t in trials for r in t["history"]}
        assert probe == {2 * len(COLOURS)}  # the tiny preset's 2 images a class
        expected = judge(values, 2, 1.0, 2 * len(COLOURS))
        for trial_id, event in decided.items():
            assert (event["event"] == "promoted") == expected[trial_id]["promoted"]
            assert event["bar"] == pytest.approx(expected[trial_id]["bar"])
    # On 8 probe images the standard error is ~15 points: a trial that cannot learn (at chance,
    # 25%) may stay within it of the cutoff and go on; the stops themselves are the rule's
    # (checked above, and on the demo by benchmarks/bench_sweep.py).
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert all(t["steps"] < MAX_STEPS and t["stopped_at"] for t in stopped)
    assert sum(t["steps"] for t in trials) <= TRIALS * MAX_STEPS
    winner = trials[0]
    assert winner["status"] == "completed" and winner["hparams"]["lr"] == 0.005
    assert winner["final_top1"] > max(t["final_top1"] for t in trials if t["hparams"]["lr"] < 1e-6)


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
    assert summary["sweep"]["trials"] == TRIALS
    # No training run here: the dashboards named are the sweep's, and they are on disk.
    assert "train" not in summary["paths"]
    assert summary["paths"]["tensorboard"] == str(run_dir / "sweep")
    for name in ("tensorboard", "sweep_report", "model", "eval_results"):
        assert Path(summary["paths"][name]).exists(), name
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert summary["eval"]["top1"] == results["top1"]
    # The model says where it came from, and each trial's resolved config is on disk.
    card = json.loads((run_dir / "model" / "run_card.json").read_text())
    assert card["stage"] == "sweep" and card["sweep_winner"]["trial_id"] == winner["trial_id"]
    assert card["final_step"] == MAX_STEPS and card["eval"]["top1"] == results["top1"]
    for trial in trials:
        saved = json.loads(
            (run_dir / "sweep" / f"trial_{trial['trial_id']}" / "config.json").read_text()
        )
        # The flags the sweep does not own reach every trial: --zeroshot-every 4.
        assert (saved["train"]["max_steps"], saved["train"]["zeroshot_every_steps"]) == (
            MAX_STEPS,
            4,
        )
        assert saved["train"]["lr"] == trial["hparams"]["lr"]
    spec = json.loads((run_dir / "config.json").read_text())
    assert spec["stages"] == ["sweep", "evaluate"] and spec["options"]["sweep"] is True
    assert results["num_images"] == 4 * 3
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["sweep"]["winner"]["trial_id"] == winner["trial_id"]
    assert "eval" in stages
