"""Bad storage input through the real jobs (issue 13): a bucket that does not exist, missing
credentials, a scheme without its package, a read-only run dir, an input that is not there.
Each is one `error: PATH: what is missing` line, exit status 2, before any stage starts, and
nothing is written (the bucket stays empty, no local folder named `s3:` appears)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from pipeline import lock, storage

ROOT = Path(__file__).resolve().parents[2]


def _job(args: list[str], cwd: Path, env: dict | None = None, job: str = "pretrain.py"):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / job), "--preset", "tiny", *args],
        cwd=cwd, capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert list(cwd.iterdir()) == []  # nothing written where the job ran
    return lines[0]


def _objects(bucket: str) -> list[str]:
    out = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    return [o["Key"] for o in out.get("Contents", [])]


def test_a_bucket_that_does_not_exist(s3_server, tmp_path):
    line = _job(["--run-dir", "s3://no-such-bucket-13/run"], tmp_path)
    assert (
        line == "error: s3://no-such-bucket-13/run: cannot write there (the bucket does not exist)"
    )


def test_missing_credentials(bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",  # no instance-role lookup on a laptop or CI
    )
    work = tmp_path / "work"
    work.mkdir()
    line = _job(["--run-dir", f"{bucket}/run"], work, env=env)
    assert line.startswith(f"error: {bucket}/run: cannot write there (no valid credentials")
    assert _objects(bucket) == []


def test_a_scheme_without_its_package(tmp_path):
    # adlfs (Azure) is not a dependency: fsspec knows the scheme, the package is missing.
    line = _job(["--run-dir", "az://container/run"], tmp_path)
    assert line.startswith("error: az://container/run: ") and "adlfs" in line


def test_a_read_only_run_dir(tmp_path):
    # /sys refuses new files even to root, where a chmod would not.
    line = _job(["--run-dir", "/sys/clip-run"], tmp_path)
    assert line.startswith("error: /sys/clip-run: cannot write there (/sys is read-only")
    assert not Path("/sys/clip-run").exists()


def test_an_input_list_or_eval_folder_not_in_the_bucket(bucket, tmp_path):
    line = _job(["--run-dir", f"{bucket}/run", "--input", f"{bucket}/urls.parquet"], tmp_path)
    assert line == f"error: {bucket}/urls.parquet: not found"
    line = _job(
        ["--run-dir", f"{bucket}/run", "--eval-dataset", f"{bucket}/eval"], tmp_path, job="eval.py"
    )
    assert line == f"error: {bucket}/eval: not found"
    assert _objects(bucket) == []  # the write probe of the run dir was removed


def test_the_s3_lease_admits_one_job_and_is_released(bucket):
    # Conditional writes (If-None-Match: *, If-Match: ETag) on a real S3 server.
    root = f"{bucket}/run"
    first = lock.Lease(root, interval=60).acquire()
    assert isinstance(first.store, lock.S3LeaseStore)
    with pytest.raises(lock.RunDirBusy, match="in use by another job"):
        lock.Lease(root, interval=60).acquire()
    assert not first.store.replace_if("another token", b"{}")  # a racer's stale token loses
    first.release()
    assert not storage.exists(f"{root}/{lock.LEASE}")
    second = lock.Lease(root, interval=60).acquire()
    assert storage.read_json(f"{root}/{lock.LEASE}")["token"] == second.token
    second.release()


def test_a_stale_s3_lease_is_taken_over_once(bucket):
    root = f"{bucket}/run"
    dead = lock.Lease(root, interval=60)
    storage.write_json(
        f"{root}/{lock.LEASE}",
        {"host": "gone", "pid": 1, "started": 0, "heartbeat": 0, "token": "old"},
    )
    taker = dead.acquire()  # its heartbeat is ancient: stale, replaced under If-Match
    assert storage.read_json(f"{root}/{lock.LEASE}")["token"] == taker.token
    assert not lock.S3LeaseStore(f"{root}/{lock.LEASE}").delete_if("old")
    taker.release()
