"""Prepare on a cluster as the cluster YAMLs shape it: a head with 0 CPUs (it only coordinates)
and worker nodes, the job sent with `ray job submit` (issue 14, item 6).

The job starts with one 1-CPU worker node; mid-prepare a 3-CPU node joins, as an autoscaler
adds one for the queued shard tasks, and prepare widens to use it (more shard tasks at once
than the first node alone could ever be given). Every shard is written by a process on a
worker node, none by the driver on the head; the added node is then killed (kill -9 of its
raylet and everything under it) mid-prepare, and the run still ends with every input row in
exactly one place."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_cluster import LocalCluster
from PIL import Image

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROWS, PER_SHARD = 1200, 50  # 24 shards, each ~1.5 s to fetch at 25 ms a response
ADDED_CPUS = 3


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(0.025)  # slow enough that the kill lands mid-prepare
        number = int(self.path.strip("/").split("/")[-1])
        body = _jpeg(number)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _nodes(cluster: LocalCluster) -> list[dict]:
    out = subprocess.run(
        ["ray", "list", "nodes", "--address", cluster.dashboard_url, "--format", "json"],
        env=cluster.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_workers_write_the_shards_and_losing_a_node_loses_no_row(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(ROWS)]
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo of thing {i}" for i in urls]}),
                   url_list)  # fmt: skip
    run_dir = tmp_path / "run"
    cluster = LocalCluster(head_cpus=0)
    try:
        cluster.start()
        keep = cluster.add_node(num_cpus=1)
        cluster.wait_for_job_agent()
        before = {n["node_id"]: n for n in _nodes(cluster)}
        head = next(i for i, n in before.items() if n["is_head_node"])
        submit = [
            "ray", "job", "submit", "--address", cluster.dashboard_url,
            "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--",
            "python", "jobs/prepare_data.py", "--preset", "tiny", "--input", str(url_list),
            "--run-dir", str(run_dir), "--allowed-networks", "127.0.0.1/32",
            "--rows-per-shard", str(PER_SHARD),
        ]  # fmt: skip
        job = subprocess.Popen(
            submit, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        staged = run_dir / "data" / "staged"

        def wait_for(what: str, done) -> None:
            deadline = time.monotonic() + 600
            while not done([json.loads(p.read_text()) for p in staged.glob("part-*.json")]):
                assert job.poll() is None, job.stdout.read()[-4000:]
                assert time.monotonic() < deadline, f"not in 600 s: {what}"
                time.sleep(0.1)

        wait_for("a shard staged", lambda markers: len(markers) >= 1)
        doomed = cluster.add_node(num_cpus=ADDED_CPUS)  # the autoscaler's new node
        (added,) = {n["node_id"] for n in _nodes(cluster)} - set(before)
        wait_for(
            f"{ADDED_CPUS} shards staged on the added node",
            lambda markers: sum(m["node_id"] == added for m in markers) >= ADDED_CPUS,
        )
        cluster.kill_node(doomed)
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, output[-4000:]
        del keep
    finally:
        cluster.shutdown()
        server.shutdown()

    data = run_dir / "data"
    markers = [json.loads(p.read_text()) for p in sorted((data / "progress").glob("part-*.json"))]
    assert len(markers) == ROWS // PER_SHARD
    # Written on worker nodes, never on the head where the driver runs.
    writers = {m["node_id"] for m in markers} | {m["finalized"]["node_id"] for m in markers}
    assert head not in writers and added in writers
    # The added node was used in full: more shard tasks ran at once than the window prepare
    # starts with on one 1-CPU node (2 in flight) would allow.
    edges = sorted([(m["started"], 1) for m in markers] + [(m["finished"], -1) for m in markers])
    assert max(itertools.accumulate(step for _, step in edges)) > 2
    rows = lambda folder: [  # noqa: E731
        r for f in sorted((data / folder).glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    shards, rejects = rows("shards"), rows("rejects")
    # No row lost, none duplicated: each URL exactly once, and all images are good ones.
    assert Counter(r["url"] for r in shards + rejects) == Counter(urls)
    assert len(shards) == ROWS and not rejects
