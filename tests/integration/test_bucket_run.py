"""Runs that live in a bucket (issue 13): a real S3-compatible server (moto) on 127.0.0.1.

The tiny pipeline runs end to end with its run dir, its URL list and its image folders in the
bucket, and leaves nothing under a local path; a training worker killed mid-run is replaced and
resumes from the checkpoint Ray Train keeps in the bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from pipeline import pretrain, storage
from pipeline.config import TrainConfig
from pipeline.demo import build_demo_corpus, serve_demo, write_url_list
from pipeline.rundir import RunDir
from pipeline.spec import Inputs, Options, build_spec, validate
from pipeline.train.loop import CHECKPOINT_FILE, run_training
from tests.integration.test_train_ray import _train_workers_of_this_ray, _write_shards

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def _keys(bucket: str, prefix: str = "") -> list[str]:
    name = bucket.removeprefix("s3://")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def test_tiny_pipeline_end_to_end_in_a_bucket(ray_local, bucket, tmp_path, monkeypatch):
    # The inputs: the demo's images served on loopback, their URL list and the labelled eval
    # and validation folders copied to the bucket.
    corpus = tmp_path / "corpus"
    spec_cfg = build_spec(preset="tiny", run_dir=str(tmp_path / "unused"), stages=())
    build_demo_corpus(corpus, spec_cfg.config.demo)
    storage.upload(str(corpus / "eval"), f"{bucket}/inputs/eval")
    storage.upload(str(corpus / "val"), f"{bucket}/inputs/val")
    run_uri = f"{bucket}/runs/tiny"
    work = tmp_path / "cwd"  # the job's working directory: it must stay empty
    work.mkdir()
    monkeypatch.chdir(work)
    with serve_demo(corpus / "www") as base_url:
        urls = write_url_list(corpus, base_url)
        storage.upload(str(urls), f"{bucket}/inputs/urls.parquet")
        spec = validate(
            build_spec(
                preset="tiny",
                run_dir=run_uri,
                stages=("prepare", "train", "evaluate"),
                flags={"prepare.download.allowed_networks": (("127.0.0.1/32",), "test")},
                inputs=Inputs(
                    url_list=f"{bucket}/inputs/urls.parquet",
                    eval_dataset=f"{bucket}/inputs/eval",
                    val_dataset=f"{bucket}/inputs/val",
                ),
                options=Options(),
            )
        )
        assert spec.run_dir == run_uri
        run = RunDir.at(spec.run_dir)
        local_before = _files_under(tmp_path)
        pretrain.prepare(spec, run)  # shard tasks read the list and write shards in the bucket
        pretrain.train(spec, run)
        pretrain.evaluate(spec, run)
        summary = pretrain.summary(spec, run)

    keys = set(_keys(bucket, "runs/tiny/"))
    prefix = "runs/tiny/"
    for key in ("manifest.json", "summary.json", "eval/results.json", "model/run_card.json",
                "model/open_clip_config.json", "model/open_clip_model.safetensors",
                "data/stats.json"):  # fmt: skip
        assert prefix + key in keys, key
    assert any(k.startswith(prefix + "data/shards/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(prefix + "data/progress/part-") for k in keys)
    assert any(k.startswith(prefix + "train/checkpoint_") for k in keys), sorted(keys)
    assert any("tfevents" in k and k.startswith(prefix + "train/") for k in keys)
    assert any("tfevents" in k and k.startswith(prefix + "eval/tensorboard/") for k in keys)
    assert sorted(run.manifest()["stages"]) == ["eval", "prepare", "train"]
    results = storage.read_json(run.eval_results_path)
    assert 0 <= results["top1"] <= 1 and results["dataset"] == f"{bucket}/inputs/eval"
    assert summary["paths"]["model"] == f"{run_uri}/model"
    # Nothing of the run landed on a local path: not in the working dir, not beside the inputs.
    assert _files_under(work) == []
    assert _files_under(tmp_path) == local_before
    assert not (work / "s3:").exists()

    # The exported model loads with open_clip after a plain copy (jobs/export.py).
    out = tmp_path / "exported"
    subprocess.run(
        [sys.executable, str(REPO / "jobs" / "export.py"), "--run-dir", run_uri, "--to", str(out)],
        cwd=work, check=True, timeout=300,
    )  # fmt: skip
    assert sorted(os.listdir(out)) == [
        "open_clip_config.json", "open_clip_model.safetensors", "run_card.json"
    ]  # fmt: skip
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    exported = load_file(out / "open_clip_model.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())


def test_a_killed_worker_resumes_from_its_checkpoint_in_the_bucket(ray_local, bucket, tmp_path):
    shards = tmp_path / "shards"
    _write_shards(shards, 96)
    storage.upload(str(shards), f"{bucket}/run/data/shards")
    run_uri = f"{bucket}/run"
    cfg = TrainConfig(
        num_workers=2,  # a worker killed while its peer waits in the gather: the hard case
        cpus_per_worker=0.5,
        global_batch_size=32,
        max_steps=30,
        warmup_steps=1,
        checkpoint_every_steps=5,
        log_every_steps=5,
        zeroshot_every_steps=0,
    )
    outcome = {}

    def train():
        outcome["result"], outcome["metrics"] = run_training(
            cfg, f"{run_uri}/data/shards", 96, run_uri
        )

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 600
    # Two checkpoints in the bucket: the first one's report has certainly completed.
    while sum(k.endswith(CHECKPOINT_FILE) for k in _keys(bucket, "run/train/")) < 2:
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.5)
    victims = _train_workers_of_this_ray(ray_local)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)

    assert outcome["metrics"]["step"] == 30
    assert outcome["result"].checkpoint.path.startswith(run_uri.removeprefix("s3://"))
    with outcome["result"].checkpoint.as_directory() as d:
        state = torch.load(f"{d}/{CHECKPOINT_FILE}", weights_only=True)
    assert state["step"] == 30
    assert len(state["resumes"]) == 1 and state["resumes"][0] % 5 == 0 and state["resumes"][0] > 0
    assert "run/model/open_clip_model.safetensors" in _keys(bucket, "run/model/")
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
