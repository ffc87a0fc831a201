"""One job per run dir: the lease refuses a second holder, and a stale one is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.lock import LEASE, Lease, RunDirBusy, hold_run_dir

ROOT = Path(__file__).resolve().parents[2]


def _lease(root: Path, **fields) -> None:
    root.mkdir(parents=True, exist_ok=True)
    record = {"host": "elsewhere", "pid": 1, "started": 0.0, "heartbeat": time.time(), "token": "t"}
    (root / LEASE).write_text(json.dumps({**record, **fields}))


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with hold_run_dir(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=rf"in use by another job: pid {os.getpid()} on "):
            with hold_run_dir(tmp_path / "run"):
                pass
    with hold_run_dir(tmp_path / "run"):  # released: free again
        pass
    assert not (tmp_path / "run" / LEASE).exists()


def test_released_on_an_exception_too(tmp_path):
    with pytest.raises(KeyError):
        with hold_run_dir(tmp_path):
            raise KeyError("boom")
    assert not (tmp_path / LEASE).exists()


def test_the_heartbeat_moves(tmp_path):
    with hold_run_dir(tmp_path, interval=0.05):
        first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first


def test_a_live_lease_of_another_host_is_respected(tmp_path):
    _lease(tmp_path, host="node-7", pid=4242)
    with pytest.raises(RunDirBusy, match="pid 4242 on node-7"):
        Lease(tmp_path, interval=1.0, stale_after=3).acquire()


def test_a_lease_without_heartbeats_is_taken_over(tmp_path):
    _lease(tmp_path, host="node-7", heartbeat=time.time() - 10)
    lease = Lease(tmp_path, interval=1.0, stale_after=3).acquire()  # 10 s > 3 x 1 s
    assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token
    lease.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A real process holds the lease and is killed with SIGKILL: its lease stays behind."""
    script = (
        "import sys, time; from pipeline.lock import hold_run_dir\n"
        f"with hold_run_dir({str(tmp_path)!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} "):
            Lease(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LEASE).exists()  # left behind by the killed holder
    with hold_run_dir(tmp_path) as lease:  # heartbeat still fresh, but its pid is gone
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token


def test_an_unreadable_lease_is_stale(tmp_path):
    (tmp_path / LEASE).write_text("{half a lea")
    with hold_run_dir(tmp_path):
        pass


def test_racers_for_a_stale_lease_end_with_exactly_one_holder(tmp_path):
    for _ in range(5):
        _lease(tmp_path, host="node-7", heartbeat=0.0)
        won, refused, start = [], [], threading.Barrier(8)

        def race(start=start, won=won, refused=refused):
            start.wait()
            try:
                won.append(Lease(tmp_path, interval=1.0, stale_after=3).acquire())
            except RunDirBusy:
                refused.append(1)

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7
        assert json.loads((tmp_path / LEASE).read_text())["token"] == won[0].token
        won[0].release()


def test_a_second_prepare_job_gets_one_error_line(tmp_path):
    """The front door: refused before Ray starts, exit 2, one line naming the holder."""
    run = tmp_path / "run"
    with hold_run_dir(run):
        proc = subprocess.run(
            [sys.executable, "jobs/prepare_data.py", "--preset", "tiny", "--run-dir", str(run)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run directory ")
    assert f"pid {os.getpid()} on " in lines[0]
    assert not (run / "data").exists()  # nothing was touched
