"""End to end, as a user runs it: `ray start --head` on 127.0.0.1 with token authentication,
then `ray job submit --working-dir . -- python jobs/pretrain.py --preset tiny`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes: `ray stop` would also kill other local clusters."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="e2e-ray-", dir="/tmp")
    gcs, dashboard, *others = _free_ports(9)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = [
        "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Explicit ports: another local Ray (the integration tests') holds the defaults.
        f"--dashboard-agent-listen-port={others[0]}", f"--dashboard-agent-grpc-port={others[1]}",
        f"--runtime-env-agent-port={others[2]}", f"--metrics-export-port={others[3]}",
        f"--ray-client-server-port={others[4]}", f"--node-manager-port={others[5]}",
        f"--object-manager-port={others[6]}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(address, env)
        yield address, env
    finally:
        _kill_cluster(temp_dir)


def _wait_for_job_agent(address: str, env: dict[str, str]) -> None:
    """The head answers before its job agent is up; submitting then fails with a 500."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["ray", "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"Ray job API at {address} never came up: {probe.stderr[-2000:]}")


def test_submit_tiny_pipeline(ray_head, tmp_path):
    address, env = ray_head
    run_dir = tmp_path / "run"
    submit = [
        "ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
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

    # The export loads with open_clip alone and gives the eval job's figure.
    # (within one image of 128: batch sizes may differ, and with them the last float bits)
    direct = _direct_zero_shot_top1(run_dir / "model", run_dir / "demo" / "eval")
    assert direct == pytest.approx(results["top1"], abs=0.008)

    # Rerunning the same run directory skips every finished stage.
    rerun = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    for stage in ("prepare", "train", "eval"):
        assert f"[{stage}] already finished" in rerun.stdout


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
