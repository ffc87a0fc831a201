"""A dead Ray cluster never hangs a job (issue 15, item 9): an address only remembered in
Ray's temp folder is skipped and Ray starts locally; one named explicitly fails in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening, then closed: connects are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def test_an_explicit_dead_address_is_one_error_line_within_seconds(tmp_path):
    dead = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--preset", "tiny", "--run-dir",
         str(tmp_path / "run"), "--address", dead],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the Ray cluster at {dead} ")
    assert time.monotonic() - start < 60  # the old code waited on the dead address


def test_a_dead_ray_address_variable_fails_before_ray_starts(monkeypatch):
    sys.path.insert(0, str(ROOT / "jobs"))
    from common import init_ray

    dead = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"at {dead} \(RAY_ADDRESS\) does not answer"):
        init_ray(None)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="not a host:port address"):
        init_ray("nonsense")
