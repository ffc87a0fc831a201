"""Two Ray nodes on this machine (`ray start --head` + `ray start --address`, token auth on):
prepare runs on both, training spreads its workers over both, and when the worker node is
killed mid-training the run restores its last checkpoint on the head and finishes.

One driver runs the tiny preset's prepare then train (tests/e2e/multinode_driver.py); the
worker node is killed once training has registered its first checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_cluster import LocalCluster
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("multinode_driver.py")
MAX_STEPS, CHECKPOINT_EVERY = 12, 4
# One task per input shard (read, fetch, filter, tokenize, write), then one per shard after dedup.
PREPARE_STAGES = ("prepare_shard", "finalize_shard")


def _latest_checkpoint_step(storage: Path) -> int | None:
    """The step of the checkpoint Ray Train has registered (and would restore), from its own
    snapshot of its checkpoint manager."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return None
    latest = state.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepare + train on two nodes, the worker node killed after the first checkpoint."""
    # 2 logical CPUs a node: after losing the worker node the head still holds both training
    # workers (0.5 CPU each) and the data tasks that feed them (0.25 each).
    cluster = LocalCluster(head_cpus=2)
    run_dir = tmp_path_factory.mktemp("multinode") / "run"
    log = run_dir.parent / "driver.log"
    out = log.open("w")
    driver = None
    try:
        # A dead node is declared after 3 missed 1 s health checks (default: 5 x 3 s).
        cluster.start(
            system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        )
        worker_port = cluster.add_node(num_cpus=2)
        driver = subprocess.Popen(
            [
                sys.executable,
                str(DRIVER),
                "--address",
                cluster.address,
                "--dashboard",
                cluster.dashboard_url,
                "--run-dir",
                str(run_dir),
                "--max-steps",
                str(MAX_STEPS),
                "--checkpoint-every",
                str(CHECKPOINT_EVERY),
            ],
            cwd=REPO,
            env=cluster.env,
            # A file, not a pipe: nobody reads a pipe while the driver runs, and a full one
            # would block it.
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while (step_at_kill := _latest_checkpoint_step(run_dir / "train")) is None:
            assert driver.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no training checkpoint within 600 s"
            time.sleep(0.2)
        cluster.kill_node(worker_port)
        driver.wait(timeout=600)
        output = log.read_text()
        assert driver.returncode == 0, output[-5000:]
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert lines, output[-5000:]
        yield run_dir, json.loads(lines[-1].removeprefix("RESULT ")), step_at_kill
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        out.close()
        cluster.shutdown()


def test_prepare_runs_tasks_on_both_nodes(run):
    run_dir, report, _ = run
    assert report["prepare"]["samples"] > 0
    # prepare's own work: its shard tasks.
    work = [
        w
        for w in report["tasks"] + report["actors"]
        if any(stage in w.get("name", w.get("class_name", "")) for stage in PREPARE_STAGES)
    ]
    ran = sorted({(w.get("name") or w["class_name"], w["node_id"][:8]) for w in work})
    assert {s for s in PREPARE_STAGES if any(s in name for name, _ in ran)} == set(PREPARE_STAGES)
    # The head (the driver's node) and the worker node both ran prepare's tasks.
    nodes = {w["node_id"] for w in work}
    assert len(nodes) == 2 and report["driver_node"] in nodes, ran
    # Data stages ask for CPUs only: on a cloud cluster the autoscaler adds CPU nodes for them.
    # (An actor's method calls run on the resources the actor holds.)
    for w in work:
        assert "GPU" not in (w["resources"] or {}), w
    assert all(0 < (w["resources"] or {}).get("CPU", 0) <= 1 for w in work), work


def _logged_steps(tensorboard_dir: Path) -> list[list[int]]:
    """Steps logged by each training attempt (rank 0 opens one event file per attempt)."""
    attempts = []
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        # A killed attempt may not have flushed its last scalars, or any.
        tags = accumulator.Tags()["scalars"]
        losses = accumulator.Scalars("train/loss") if "train/loss" in tags else []
        attempts.append(sorted(e.step for e in losses))
    return attempts


def test_training_spreads_over_both_nodes_and_survives_losing_one(run):
    run_dir, report, step_at_kill = run
    # It finished: every configured step, and the model exported from the last checkpoint.
    assert report["train"]["step"] == MAX_STEPS
    assert (run_dir / "model" / "open_clip_config.json").exists()

    # Two attempts (each a placement group of 2 workers): the first spread over both nodes,
    # the second, after the worker node died, on the head alone.
    attempts: dict[str, list[dict]] = {}
    for actor in report["actors"]:
        if actor["class_name"] == "RayTrainWorker":
            attempts.setdefault(actor["placement_group_id"], []).append(actor)
    on_head = sorted(
        sorted(w["node_id"] == report["driver_node"] for w in workers)
        for workers in attempts.values()
    )
    assert on_head == [[False, True], [True, True]], attempts

    # The restored attempt started from a registered checkpoint, not from step 0: its first
    # logged step follows a checkpoint step at least as late as the one registered at the kill.
    first, second = _logged_steps(run_dir / "train" / "tensorboard")
    assert first[:1] in ([], [1]), first  # a killed attempt may not have flushed its scalars
    resumed_from = second[0] - 1
    assert resumed_from % CHECKPOINT_EVERY == 0, second
    assert step_at_kill <= resumed_from < MAX_STEPS, (step_at_kill, second)
    assert second == list(range(resumed_from + 1, MAX_STEPS + 1))
