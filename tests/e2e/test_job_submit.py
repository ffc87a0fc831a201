"""End to end, as a user runs it: `ray start --head` on 127.0.0.1 with token authentication,
then `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- python
jobs/pretrain.py --preset tiny`, as README.md's cluster section says."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from local_cluster import LocalCluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    cluster = LocalCluster(head_cpus=2)
    try:
        cluster.start()
        cluster.wait_for_job_agent()
        yield cluster.dashboard_url, cluster.env
    finally:
        cluster.shutdown()


def test_submit_tiny_pipeline(ray_head, tmp_path):
    address, env = ray_head
    run_dir = tmp_path / "run"
    submit = [
        "ray", "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
        "--working-dir", ".", "--",
        "python", "jobs/pretrain.py", "--preset", "tiny", "--run-dir", str(run_dir),
    ]  # fmt: skip
    job = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout, job.stdout[-2000:]
    assert "== Summary (tiny) ==" in job.stdout

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"demo", "prepare", "train", "eval"}

    # Every input row ends in exactly one of shards or rejects.
    urls = pq.read_table(run_dir / "demo" / "urls.parquet")
    shards = pq.read_table(run_dir / "data" / "shards")
    rejects = pq.read_table(run_dir / "data" / "rejects")
    assert shards.num_rows + rejects.num_rows == urls.num_rows
    assert len(set(shards.column("key").to_pylist())) == shards.num_rows
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["samples"] == shards.num_rows and stats["rejects"] == rejects.num_rows

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for key in ("top1", "top5", "seen_top1", "heldout_top1", "mean_per_class_recall"):
        assert 0.0 <= results[key] <= 1.0, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["top1"] == results["top1"]
    assert Path(summary["paths"]["model"]) == run_dir / "model"
    # Seconds per part of the command, each positive, together within its wall time.
    seconds = summary["stage_seconds"]
    assert set(seconds) == {"setup", "ray_start", "prepare", "train", "eval"}
    # Connecting to a running cluster may round to 0.0 s; the stages themselves take time.
    assert all(v >= 0 for v in seconds.values()), seconds
    assert all(seconds[stage] > 0 for stage in ("prepare", "train", "eval")), seconds
    assert sum(seconds.values()) <= summary["wall_seconds"] + 0.5  # each rounded to 0.1 s
    # The train stage's own split, from its workers' marks; auto chose one worker on 2 CPUs.
    assert set(summary["train_seconds"]) == {
        "workers_start", "model_and_data_plan", "first_batch", "steps", "checkpoint_export"
    }  # fmt: skip
    assert sum(summary["train_seconds"].values()) <= seconds["train"] + 0.5
    assert (summary["train"]["workers"], summary["train"]["threads_per_worker"]) == (1, 2)
    assert "[train] workers: auto: 1 worker x (1.5 CPU, 2 threads)" in job.stdout
    assert "time : " in job.stdout

    # The export loads with open_clip alone and gives the eval job's figure.
    # (within one image of 128: batch sizes may differ, and with them the last float bits)
    direct = _direct_zero_shot_top1(run_dir / "model", run_dir / "demo" / "eval")
    assert direct == pytest.approx(results["top1"], abs=0.008)

    # Rerunning the same run directory skips every finished stage.
    rerun = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    for stage in ("prepare", "train", "eval"):
        assert f"[{stage}] already finished" in rerun.stdout


def test_submission_without_the_right_token_is_refused(ray_head, tmp_path):
    address, env = ray_head
    # No token at all: neither RAY_AUTH_TOKEN nor ~/.ray/auth_token (HOME is an empty folder).
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)
    wrong_token = {**env, "RAY_AUTH_TOKEN": "0" * 64}
    for attempt in (no_token, wrong_token):
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--", "echo", "owned"],
            cwd=tmp_path,
            env=attempt,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = submit.stdout + submit.stderr
        assert submit.returncode != 0, output[-2000:]
        assert "owned" not in submit.stdout
        assert "401" in output or "nauthorized" in output or "authentication" in output.lower()
    # Nothing ran: the cluster's own job list (read with the token) has no such job.
    listing = subprocess.run(
        ["ray", "job", "list", "--address", address], env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "echo owned" not in listing.stdout


def _direct_zero_shot_top1(model_dir: Path, eval_dir: Path) -> float:
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    folders = sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
    classnames = (eval_dir / "classnames.txt").read_text().splitlines()
    templates = [t for t in (eval_dir / "templates.txt").read_text().splitlines() if t.strip()]
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=None
    )
    correct = total = 0
    with torch.no_grad():
        for label, folder in enumerate(folders):
            images = torch.stack(
                [
                    preprocess(Image.open(p).convert("RGB"))
                    for p in sorted((eval_dir / folder).iterdir())
                ]
            )
            features = model.encode_image(images, normalize=True)
            predictions = (features @ classifier).argmax(dim=1).numpy()
            correct += int(np.sum(predictions == label))
            total += len(predictions)
    return correct / total
