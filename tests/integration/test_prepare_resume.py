"""Resume: `kill -9` in the middle of a real jobs/prepare_data.py run, then the same command
again, gives exactly the outputs of an uninterrupted run without refetching finished shards;
--retry-failed fetches again only the rows that failed for transient reasons."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import pretrain
from pipeline.config import get_preset
from pipeline.data.prepare import read_url_list, run_prepare
from pipeline.rundir import RunDir
from pipeline.spec import spec_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 420  # the tiny preset's 150 input rows per shard: 3 shards
THROTTLE_S = 0.02  # one response at a time, 20 ms each: a shard takes ~3 s to download


def image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = [image(i) for i in range(NUM_IMAGES)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server, path = self.server, urlsplit(self.path).path
        with server.lock:
            server.hits[path] += 1
            first_time = server.hits[path] == 1
            if server.throttle:
                time.sleep(server.throttle)
        kind, _, number = path.strip("/").partition("/")
        if kind == "slow" and first_time:  # hangs the first time, as a stuck worker would
            time.sleep(15)
        if kind in ("img", "slow") or (kind == "flaky" and not first_time):
            body, status = IMAGES[int(number)], 200
        else:  # /flaky/N fails the first time, as an overloaded origin does; the rest 404
            body, status = b"busy", 503 if kind == "flaky" else 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.request_queue_size = True, 128
    srv.lock, srv.hits, srv.throttle = threading.Lock(), Counter(), 0.0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def write_list(path: Path, urls: list[str]) -> Path:
    captions = [f"a photo of thing {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


def outcome(run_root: str | Path) -> Counter:
    """(key, url, "sample") or (key, url, stage, reason) for every row written, counted; the
    run dir local or in a bucket."""
    from pipeline import storage
    from pipeline.data.prepare.chunks import forget_listings  # s3fs caches listings

    root = str(run_root)
    forget_listings(root)
    out: Counter = Counter()
    for folder in ("shards", "rejects"):
        for f in storage.list_files(storage.join(root, "data", folder), ".parquet"):
            for r in storage.read_parquet(f).to_pylist():
                fate = ("sample",) if folder == "shards" else (r["stage"], r["reason"])
                out[(r["key"], r["url"], *fate)] += 1
    return out


def file_names(run_root: str | Path, folder: str) -> list[str]:
    return sorted(p.name for p in (Path(run_root) / "data" / folder).iterdir())


def _session_pids(tmpdir: str) -> list[int]:
    """Processes of the Ray session with its own temp dir: Ray's workers rename themselves
    (ray::prepare_shard), so their environment (RAY_TMPDIR) is checked besides the command line."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if tmpdir.encode() in cmdline or f"RAY_TMPDIR={tmpdir}".encode() in environ:
            pids.append(int(pid))
    return pids


def _kill_session(tmpdir: str) -> None:
    """SIGKILL what is left of the Ray session the killed job started, until nothing is: a
    surviving worker would finish its shard after the kill and the rerun would not fetch it."""
    for _ in range(100):
        pids = _session_pids(tmpdir)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of {tmpdir} survive SIGKILL: {_session_pids(tmpdir)}")


def test_kill_minus_9_then_rerun_equals_an_uninterrupted_run(ray_local, server, tmp_path, request):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(NUM_IMAGES)]
    urls[7] = f"{base}/missing"  # a few rejects too, one a duplicate URL
    urls[300] = urls[3]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    run_dir = tmp_path / "run"
    # A Ray of its own, with its own temp dir (short: Unix socket paths are limited).
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        sys.executable,
        str(ROOT / "jobs" / "prepare_data.py"),
        "--preset",
        "tiny",
        "--input",
        str(url_list),
        "--run-dir",
        str(run_dir),
        "--allowed-networks",
        "127.0.0.1/32",
        "--address",
        "local",
    ]
    progress = run_dir / "data" / "progress"
    # A shard is fetched once its marker is written: the final one, or (dedup on, as in the
    # tiny preset) the staged one, which waits for the dedup step over all shards' hashes.
    fetched = lambda: [*progress.glob("part-?????.json"), *staged.glob("part-?????.json")]  # noqa: E731
    staged = run_dir / "data" / "staged"
    server.hits.clear()
    server.throttle = THROTTLE_S
    job = subprocess.Popen(
        command, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not fetched():
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 300 s"
            time.sleep(0.02)
        os.killpg(job.pid, signal.SIGKILL)  # the job and every process in its group
        job.wait()
    finally:
        server.throttle = 0.0
        _kill_session(ray_tmp)
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    done_at_kill = sorted({int(p.stem[5:]) for p in fetched()})
    assert len(done_at_kill) in (1, 2), done_at_kill
    assert "prepare" not in RunDir.at(run_dir).manifest()["stages"]
    before = Counter(server.hits)

    server.hits.clear()
    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    _kill_session(ray_tmp)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout + rerun.stderr
    assert RunDir.at(run_dir).stage("prepare")["samples"] == NUM_IMAGES - 2

    # Finished shards were not fetched again; everything else was, once.
    finished = {urls[i] for c in done_at_kill for i in range(c * 150, (c + 1) * 150)}
    refetched = {f"{base}{p}" for p in server.hits}
    assert not refetched & finished
    assert refetched == set(urls) - finished
    assert before  # the killed run had fetched something

    # The same outputs as an uninterrupted run of the same configuration.
    cfg = get_preset("tiny").prepare
    cfg = dataclasses.replace(
        cfg, download=dataclasses.replace(cfg.download, allowed_networks=("127.0.0.1/32",))
    )
    reference = tmp_path / "reference"
    run_prepare(read_url_list(str(url_list)), RunDir.at(reference), cfg)
    resumed = outcome(run_dir)
    assert resumed == outcome(reference)
    assert sum(resumed.values()) == NUM_IMAGES
    samples = [k for k in resumed if k[2] == "sample"]
    assert len(samples) == len({k[0] for k in samples}) == NUM_IMAGES - 2  # keys unique
    assert Counter(k[2:] for k in resumed.elements() if k[2] != "sample") == {
        ("input", "duplicate_url"): 1,
        ("download", "http_404"): 1,
    }
    # No leftovers of the killed attempt beside the shards.
    assert file_names(run_dir, "shards") == file_names(reference, "shards")
    assert file_names(run_dir, "rejects") == file_names(reference, "rejects")


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_retry_failed_refetches_only_transient_failures(
    ray_local, server, tmp_path, where, request
):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(12)]
    urls += [f"{base}/flaky/{i}" for i in range(100, 106)]  # 503 once, then fine
    urls += [f"{base}/gone/{i}" for i in range(2)]  # 404: not transient, never retried
    url_list = write_list(tmp_path / "urls.parquet", urls)
    cfg = get_preset("tiny")
    prepare = dataclasses.replace(
        cfg.prepare,
        rows_per_shard=8,
        download=dataclasses.replace(
            cfg.prepare.download, allowed_networks=("127.0.0.1/32",), retries=0
        ),
    )
    cfg = dataclasses.replace(cfg, prepare=prepare)
    # The run dir on this disk, or in a bucket (issue 13: every commit point is an object).
    root = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    run = RunDir.at(f"{root}/run")

    def prepare(**options):
        spec = spec_of(cfg, run.root, ("prepare",), url_list=str(url_list), **options)
        return pretrain.prepare(spec, run, log=lambda *_: None)

    server.hits.clear()
    first = prepare()
    assert first["stages"]["download"]["drops"] == {"http_503": 6, "http_404": 2}
    assert prepare() == first  # finished: a plain rerun does nothing

    second = prepare(retry_failed=True)
    assert second["samples"] == 18 and second["rejects"] == 2
    assert second["stages"]["download"]["drops"] == {"http_404": 2}
    assert run.stage("prepare")["samples"] == 18
    got = outcome(run.root)
    assert sum(got.values()) == len(urls) == len(got)  # each row in exactly one place
    assert sorted(k[1] for k in got if k[2] != "sample") == urls[-2:]
    # Only the transient failures were fetched again.
    assert {p: n for p, n in server.hits.items() if n > 1} == {
        urlsplit(u).path: 2 for u in urls if "/flaky/" in u
    }

    # Nothing transient is left: another retry fetches nothing and changes nothing.
    server.hits.clear()
    assert prepare(retry_failed=True)["samples"] == 18
    assert server.hits == Counter()
    assert outcome(run.root) == got


# The job of test_kill_minus_9_on_a_bucket: run_prepare with a run directory and a URL list that
# are s3:// URIs (RunDir's paths as strings: all prepare does with them goes through storage).
BUCKET_JOB = """
import dataclasses, sys, ray
from pipeline import storage
from pipeline.config import get_preset
from pipeline.data.prepare import run_prepare

@dataclasses.dataclass(frozen=True)
class Run:
    root: str
    @property
    def shards(self): return storage.join(self.root, "data", "shards")
    @property
    def rejects(self): return storage.join(self.root, "data", "rejects")
    @property
    def stats_path(self): return storage.join(self.root, "data", "stats.json")

cfg = get_preset("tiny").prepare
cfg = dataclasses.replace(
    cfg, download=dataclasses.replace(cfg.download, allowed_networks=("127.0.0.1/32",))
)
ray.init(address="local", num_cpus=2, include_dashboard=False)
stats = run_prepare(sys.argv[1], Run(sys.argv[2]), cfg, log=print)
print("samples", stats["samples"])
"""


def test_kill_minus_9_on_a_bucket_then_rerun(ray_local, server, bucket, tmp_path, request):
    from pipeline import storage
    from pipeline.data.prepare.chunks import forget_listings  # s3fs caches listings

    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(NUM_IMAGES)]
    urls[7] = f"{base}/missing"
    urls[300] = urls[3]
    local_list = write_list(tmp_path / "urls.parquet", urls)
    url_list = f"{bucket}/lists/urls.parquet"
    storage.upload(local_list, url_list)
    root = f"{bucket}/run"
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    env["RAY_raylet_start_wait_time_s"] = "300"  # a loaded machine starts Ray slowly
    command = [sys.executable, "-c", BUCKET_JOB, url_list, root]
    staged = storage.join(root, "data", "staged")
    server.hits.clear()
    server.throttle = THROTTLE_S
    job = subprocess.Popen(
        command, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (forget_listings(staged) or storage.list_files(staged, ".json")):
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard staged in 300 s"
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        server.throttle = 0.0
        _kill_session(ray_tmp)
    forget_listings(staged)
    done_at_kill = [int(storage.name(p)[5:10]) for p in storage.list_files(staged, ".json")]
    assert len(done_at_kill) in (1, 2), done_at_kill

    server.hits.clear()
    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    _kill_session(ray_tmp)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"samples {NUM_IMAGES - 2}" in rerun.stdout
    finished = {urls[i] for c in done_at_kill for i in range(c * 150, (c + 1) * 150)}
    assert not {f"{base}{p}" for p in server.hits} & finished  # staged shards not refetched

    cfg = get_preset("tiny").prepare
    cfg = dataclasses.replace(
        cfg, download=dataclasses.replace(cfg.download, allowed_networks=("127.0.0.1/32",))
    )
    reference = tmp_path / "reference"
    run_prepare(read_url_list(str(local_list)), RunDir.at(reference), cfg)
    forget_listings(root)
    assert outcome(root) == outcome(reference)
    # Nothing of the killed attempt is left beside the shards, and every shard has a marker.

    def names(folder: str) -> list[str]:
        return [storage.name(p) for p in storage.list_files(storage.join(root, "data", folder))]

    assert names("shards") == file_names(reference, "shards")
    assert names("rejects") == file_names(reference, "rejects")
    markers = [n for n in names("progress") if n.startswith("part-")]
    assert markers == [f"part-{c:05d}.json" for c in range(3)]
    marker = storage.read_json(storage.join(root, "data", "progress", markers[0]))
    assert {"node_id", "hostname", "pid", "started", "finished"} <= set(marker)


def test_max_failure_rate_stops_a_mostly_dead_list(ray_local, server, tmp_path):
    from pipeline.data.prepare.run import TooManyFailures

    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/gone/{i}" for i in range(300)] + [f"{base}/img/{i}" for i in range(10)]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    cfg = get_preset("tiny").prepare
    cfg = dataclasses.replace(
        cfg,
        rows_per_shard=100,
        max_failure_rate=0.5,
        download=dataclasses.replace(cfg.download, allowed_networks=("127.0.0.1/32",), retries=0),
    )
    lines: list[str] = []
    with pytest.raises(
        TooManyFailures, match=r"failed to download \(\d+% > --max-failure-rate 50%"
    ):
        run_prepare(str(url_list), RunDir.at(tmp_path / "run"), cfg, log=lines.append)
    # A live failure-rate line per finished shard, and the shards finished before the stop kept.
    dead = re.compile(r"part-0000[012]: 100/100 rows failed to download \(100%\)")
    assert any(dead.search(x) for x in lines), lines
    assert list((tmp_path / "run" / "data" / "staged").glob("part-*.json"))


def test_a_stalled_shard_is_run_again(ray_local, server, tmp_path):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(8)] + [f"{base}/slow/8"]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    cfg = get_preset("tiny").prepare
    cfg = dataclasses.replace(
        cfg,
        stall_minutes=0.05,  # 3 s without a finished batch
        download=dataclasses.replace(
            cfg.download, allowed_networks=("127.0.0.1/32",), timeout=30.0, retries=0
        ),
    )
    lines: list[str] = []
    server.hits.clear()
    stats = run_prepare(str(url_list), RunDir.at(tmp_path / "run"), cfg, log=lines.append)
    assert any("part-00000: no progress for 3 s: run again" in x for x in lines), lines
    assert stats["samples"] == 9  # the second attempt got every row
    assert server.hits["/slow/8"] >= 2
