"""Two Ray nodes on this machine (`ray start --head` + `ray start --address`, token auth on) that
share no disk: the run dir lives on a bucket (a moto S3 server on 127.0.0.1) and each node keeps
its files in a folder of its own (Ray's temp dir, the TMPDIR and working directory of every
process it starts). Prepare runs on both, training spreads its workers over both, and when the
worker node is killed mid-training the run restores its last checkpoint from the bucket on the
head and finishes. No stage leaves run data under a local path: every output is in the bucket.

One driver runs the tiny preset's prepare then train (tests/e2e/multinode_driver.py), the demo
corpus its input: its images served from the driver's machine (the demo's web), its URL list in
the run dir; the worker node is killed once training has registered its first checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from local_cluster import LocalCluster
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import storage

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("multinode_driver.py")
MAX_STEPS, CHECKPOINT_EVERY = 12, 4
# One task per input shard (read, fetch, filter, tokenize, write), then one per shard after dedup.
PREPARE_STAGES = ("prepare_shard", "finalize_shard")
# What run data looks like on a disk, beside the names of the objects the run wrote: shards,
# rejects and URL lists, model weights, checkpoints, TensorBoard events.
RUN_DATA_SUFFIXES = (".parquet", ".safetensors", ".pt")
# Build and cache folders that the run never writes (searched by modification time otherwise).
NOT_SEARCHED = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _latest_checkpoint_step(train: str) -> int | None:
    """The step of the checkpoint Ray Train has registered (and would restore), from its own
    snapshot of its checkpoint manager, read from the bucket."""
    try:
        state = storage.read_json(storage.join(train, "checkpoint_manager_snapshot.json"))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    latest = state.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2")
    pages = pages.paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _run_data_under(roots: list[Path], names: set[str], since: float) -> list[str]:
    """Files under `roots` that look like run data: named as an object of the run, or with a run
    output's suffix, or a TensorBoard event file; written after `since` (all of a folder made
    for this run)."""
    found = []
    for root in roots:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in NOT_SEARCHED]
            for base in files:
                path = os.path.join(folder, base)
                looks = base in names or base.endswith(RUN_DATA_SUFFIXES) or "tfevents" in base
                try:
                    if looks and os.stat(path).st_mtime >= since:
                        found.append(path)
                except OSError:  # removed while walking
                    continue
    return sorted(found)


@dataclass(frozen=True)
class Run:
    uri: str
    bucket: str
    prefix: str  # the run dir's key prefix in the bucket, "/"-terminated
    report: dict
    step_at_kill: int
    node_dirs: list[str]
    local_run_data: list[str]  # files of run data found under local paths after the run
    searched: list[str]  # the local folders searched
    log: str


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_server):
    """Prepare + train on two nodes with no shared disk, the run dir on the bucket, the worker
    node killed after the first checkpoint."""
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    prefix = "runs/multinode/"
    run_uri = f"s3://{bucket}/{prefix.rstrip('/')}"
    # 2 logical CPUs a node: after losing the worker node the head still holds both training
    # workers (0.5 CPU each) and the data tasks that feed them (0.25 each).
    cluster = LocalCluster(head_cpus=2, separate_disks=True)
    logs = tmp_path_factory.mktemp("multinode")
    log = logs / "driver.log"
    out = log.open("w")
    driver = None
    started = time.time()
    try:
        # The nodes and the driver reach the S3 server through the environment conftest set.
        assert cluster.env["AWS_ENDPOINT_URL"] == s3_server
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
                run_uri,
                "--max-steps",
                str(MAX_STEPS),
                "--checkpoint-every",
                str(CHECKPOINT_EVERY),
            ],
            # The repository, so the nodes' workers import this checkout (Ray puts the driver's
            # working directory on their path); it is searched for run data afterwards.
            cwd=REPO,
            env=cluster.head_env,  # the driver runs on the head's machine
            # A file, not a pipe: nobody reads a pipe while the driver runs, and a full one
            # would block it.
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while (step_at_kill := _latest_checkpoint_step(f"{run_uri}/train")) is None:
            assert driver.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no training checkpoint within 600 s"
            time.sleep(0.5)
        cluster.kill_node(worker_port)
        driver.wait(timeout=600)
        output = log.read_text()
        assert driver.returncode == 0, output[-5000:]
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert lines, output[-5000:]
        # Every local place a stage could have written: each node's folder (the killed node's
        # left as it was), the driver's working directory, this test's folder, Ray's default
        # results folder. Searched before any test copies run data down to read it.
        names = {key.rsplit("/", 1)[-1] for key in _keys(bucket, prefix)}
        roots = [*map(Path, cluster.node_dirs), REPO, logs, Path.home() / "ray_results"]
        found = _run_data_under(roots, names, since=started)
        yield Run(
            uri=run_uri,
            bucket=bucket,
            prefix=prefix,
            report=json.loads(lines[-1].removeprefix("RESULT ")),
            step_at_kill=step_at_kill,
            node_dirs=list(cluster.node_dirs),
            local_run_data=found,
            searched=[str(r) for r in roots],
            log=output,
        )
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        out.close()
        cluster.shutdown()


def test_the_nodes_share_no_disk_and_the_run_lives_in_the_bucket(run):
    # Each node's processes kept their temporary files and worked in a folder of their own;
    # every node reached the S3 server.
    head_dir, worker_dir = run.node_dirs
    disks = {d["node_id"]: d for d in run.report["node_disks"]}
    assert len(disks) == 2, disks
    head = disks.pop(run.report["driver_node"])
    (worker,) = disks.values()
    assert (head["tmpdir"], head["cwd"]) == (os.path.join(head_dir, "tmp"), head_dir), head
    assert (worker["tmpdir"], worker["cwd"]) == (os.path.join(worker_dir, "tmp"), worker_dir)
    assert head["s3_endpoint"] == worker["s3_endpoint"] == os.environ["AWS_ENDPOINT_URL"]
    assert run.report["driver"]["tmpdir"] == os.path.join(head_dir, "tmp")

    # The demo's URL list is in the run dir, and the shard tasks of both nodes read it there.
    urls = f"{run.uri}/demo/urls.parquet"
    assert f" rows from {urls}\n" in run.log, run.log[-3000:]
    assert storage.read_parquet(urls)["url"][0].as_py().startswith("http://127.0.0.1:")

    # Everything the run wrote is in the bucket.
    keys = set(_keys(run.bucket, run.prefix))
    for key in ("manifest.json", "data/stats.json", "demo/urls.parquet", "train/.identity.json",
                "train/checkpoint_manager_snapshot.json", "model/run_card.json",
                "model/open_clip_config.json", "model/open_clip_model.safetensors"):  # fmt: skip
        assert run.prefix + key in keys, key
    for folder, suffix in (
        ("data/shards/", ".parquet"),
        ("data/progress/part-", ".json"),
        ("train/checkpoint_", "/state.pt"),
        ("train/tensorboard/events.out.tfevents.", ""),
    ):
        assert any(k.startswith(run.prefix + folder) and k.endswith(suffix) for k in keys), folder
    assert sorted(storage.read_json(f"{run.uri}/manifest.json")["stages"]) == [
        "demo", "prepare", "train"
    ]  # fmt: skip

    # ... and none of it under a local path: not on either node, not where the driver ran.
    # Only a checkpoint that the killed node's rank 0 was staging for its upload (a temporary
    # folder of its own process, which the kill left behind) may remain there.
    staging = os.path.join(worker_dir, "tmp", "clip-ckpt-")
    left = [p for p in run.local_run_data if not p.startswith(staging)]
    assert left == [], (run.searched, left)
    assert not (REPO / "s3:").exists()


def test_prepare_runs_tasks_on_both_nodes(run):
    report = run.report
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


def test_training_spreads_over_both_nodes_and_survives_losing_one(run, tmp_path):
    report = run.report
    # It finished: every configured step, and the model exported from the last checkpoint.
    assert report["train"]["step"] == MAX_STEPS
    assert storage.exists(f"{run.uri}/model/open_clip_config.json")

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

    # The restored attempt started from a checkpoint in the bucket, not from step 0: its first
    # logged step follows a checkpoint step at least as late as the one registered at the kill.
    tensorboard = tmp_path / "tensorboard"  # the event files, copied down from the bucket to read
    storage.download(f"{run.uri}/train/tensorboard", tensorboard)
    first, second = _logged_steps(tensorboard)
    assert first[:1] in ([], [1]), first  # a killed attempt may not have flushed its scalars
    resumed_from = second[0] - 1
    assert resumed_from % CHECKPOINT_EVERY == 0, second
    assert run.step_at_kill <= resumed_from < MAX_STEPS, (run.step_at_kill, second)
    assert second == list(range(resumed_from + 1, MAX_STEPS + 1))
