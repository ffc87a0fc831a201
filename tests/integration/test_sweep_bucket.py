"""A sweep whose run directory is a bucket (issue 13): a real S3-compatible server (moto) on
127.0.0.1, the real `jobs/sweep.py`, its driver SIGKILLed once a rung is judged, the same
command again resuming it from the bucket alone.

Two trials (one learns the colours, one cannot) one at a time on 2 CPUs: rung 4 stops the
second and promotes the first, which the kill catches on its way to the next rung.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from pipeline import storage
from pipeline.train.loop import CHECKPOINT_FILE
from pipeline.tune.report import read_sweep
from tests.integration.test_sweep_ray import _image_folder
from tests.integration.test_train_ray import _write_shards

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 16
FLAGS = [
    "--temperatures", "0.05", "--batch-sizes", "32", "--lr-rule", "swept",
    "--lrs", "0.005,0.000000001", "--seeds", "0", "--max-steps", str(MAX_STEPS),
    "--grace-period", "4", "--reduction-factor", "2", "--zeroshot-every", "4",
]  # fmt: skip


def _histories(sweep_uri: str) -> dict[str, list[dict]]:
    out = {}
    for path in storage.glob(sweep_uri, "trial_*/history.jsonl"):
        lines = storage.read_text(path).splitlines()
        out[storage.name(storage.parent(path))] = [json.loads(x) for x in lines if x]
    return out


def _judged(history: list[dict]) -> bool:
    return any(r.get("event") in ("promoted", "stopped") for r in history)


def _files_under(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()}


def test_a_sweep_in_a_bucket_is_killed_and_resumed_from_the_bucket(bucket, tmp_path):
    local = tmp_path / "inputs"
    _write_shards(local / "shards", 128, files=2)
    run_uri = f"{bucket}/runs/sweep"
    storage.upload(str(local / "shards"), f"{run_uri}/data/shards")
    storage.upload(str(_image_folder(local / "val", per_class=4, offset=0)), f"{bucket}/val")
    storage.upload(str(_image_folder(local / "eval", per_class=3, offset=3)), f"{bucket}/eval")
    work = tmp_path / "cwd"  # the job's working directory: nothing may appear in it
    work.mkdir()
    command = [
        sys.executable, str(REPO / "jobs" / "sweep.py"), "--preset", "tiny",
        "--run-dir", run_uri, "--address", "local",
        "--val-dataset", f"{bucket}/val", "--eval-dataset", f"{bucket}/eval", *FLAGS,
    ]  # fmt: skip
    sweep_uri = f"{run_uri}/sweep"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline, judged_at = time.monotonic() + 900, None
        while time.monotonic() < deadline and proc.poll() is None:
            if judged_at is None and any(_judged(h) for h in _histories(sweep_uri).values()):
                judged_at = time.monotonic()
            # Tune saves its experiment state to the bucket every few seconds.
            if judged_at is not None and time.monotonic() - judged_at > 12:
                break
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended before the kill:\n{log.read_text()[-3000:]}"
        assert judged_at is not None, f"no rung judged in time:\n{log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:  # the driver's local Ray, in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = _histories(sweep_uri)
    # Tune's experiment state is in the bucket, beside the trials' folders.
    assert storage.glob(sweep_uri, "experiment_state-*.json"), storage.glob(sweep_uri, "*")

    done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming the sweep" in done.stdout + done.stderr

    after = _histories(sweep_uri)
    assert set(after) == set(before) and len(after) == 2
    for trial, lines in before.items():  # what was written before the kill stands
        assert after[trial][: len(lines)] == lines
    _, trials = read_sweep(sweep_uri)
    by_status = {t["status"]: t for t in trials}
    assert set(by_status) == {"completed", "stopped"}, [t["status"] for t in trials]
    stopped, winner = by_status["stopped"], by_status["completed"]
    assert stopped["steps"] == 4 and stopped["hparams"]["lr"] < 1e-6
    assert after[stopped["dir"]] == before[stopped["dir"]]  # not trained again
    # The promoted trial went on from its checkpoint at the rung: its later reports follow
    # step 4 (none from step 1 again), and it reached the end.
    # A restart from scratch would report step 4 again after a later one.
    steps = [r["step"] for r in after[winner["dir"]] if "step" in r and "event" not in r]
    assert steps[0] == 4 and steps[-1] == MAX_STEPS and steps == sorted(steps), steps
    assert winner["checkpoint"].startswith(f"{sweep_uri}/{winner['dir']}/")
    blob = storage.read_bytes(storage.join(winner["checkpoint"], CHECKPOINT_FILE))
    state = torch.load(io.BytesIO(blob), weights_only=True)
    assert state["step"] == MAX_STEPS

    # The report, the leaderboard, the exported winner and the run's record: in the bucket.
    for name in ("report.html", "heatmap.png", "curves.png", "leaderboard.json"):
        assert storage.exists(f"{sweep_uri}/{name}"), name
    assert storage.glob(f"{sweep_uri}/tensorboard", "*/events.out.tfevents.*")
    # The exported weights are the winner's last checkpoint's.
    exported = load(storage.read_bytes(f"{run_uri}/model/open_clip_model.safetensors"))
    assert set(exported) == set(state["model"])
    for name, tensor in state["model"].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    summary = storage.read_json(f"{run_uri}/summary.json")
    assert summary["sweep"]["winner"]["trial_id"] == winner["trial_id"]
    assert summary["paths"]["sweep_report"] == f"{sweep_uri}/report.html"
    assert storage.read_json(f"{run_uri}/eval/results.json")["num_images"] == 4 * 3
    # --show reads the leaderboard from the bucket.
    show = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "sweep.py"), "--show", run_uri],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert show.returncode == 0 and f"winner: {winner['trial_id']}" in show.stdout, show.stderr
    assert _files_under(work) == set()
