"""A batch that kills its download actor (as the OOM killer would) is retried by Ray Data on
a new actor; after two deaths its rows are rejected as worker_crash, each of them, and the
run finishes instead of killing actor after actor (issue 15, item 5)."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import get_preset
from pipeline.data.prepare import read_url_list, run_prepare
from pipeline.rundir import RunDir
from tests.integration.test_prepare_resume import write_list

pytestmark = pytest.mark.integration


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (i * 20 % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _pid_of_client(port: int) -> int | None:
    """The process whose TCP socket has local port `port` (from /proc, as ss -p finds it)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue
    return None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        kind, _, number = urlsplit(self.path).path.strip("/").partition("/")
        if kind == "poison":  # SIGKILL the process that asked, found by its socket
            pid = _pid_of_client(self.client_address[1])
            if pid is not None:
                with self.server.lock:
                    self.server.kills += 1
                os.kill(pid, signal.SIGKILL)
                return
        body = _jpeg(int(number))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_batch_that_kills_its_actor_twice_is_rejected_row_by_row(ray_local, tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.lock, srv.kills = True, threading.Lock(), 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        urls = [f"{base}/img/{i}" for i in range(4)]
        urls += [f"{base}/img/4", f"{base}/poison/5", f"{base}/img/6", f"{base}/img/7"]
        urls += [f"{base}/img/{i}" for i in range(8, 12)]
        cfg = get_preset("tiny").prepare
        download = dataclasses.replace(
            cfg.download, allowed_networks=("127.0.0.1/32",), batch_size=4, concurrency=1,
            retries=0, timeout=5.0,
        )  # fmt: skip
        cfg = dataclasses.replace(cfg, download=download)
        run = RunDir.at(tmp_path / "run")
        stats = run_prepare(read_url_list(str(write_list(tmp_path / "u.parquet", urls))), run, cfg)
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.kills == 2  # two actors died on the batch, the third never fetched it
    assert stats["samples"] == 8 and stats["rejects"] == 4
    assert stats["stages"]["download"]["drops"] == {"worker_crash": 4}
    rejects = [
        r for f in sorted(Path(run.rejects).glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert sorted(r["url"] for r in rejects) == sorted(urls[4:8])  # the batch's rows, each once
    assert Counter(r["reason"] for r in rejects) == {"worker_crash": 4}
