"""A dead local Ray remembered in Ray's temp folder is skipped: Ray starts here, saying so
(issue 15, item 9). Starts a private Ray in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_dead_address_left_in_rays_temp_folder_starts_ray_here():
    # A short private temp folder: Ray's socket paths must fit in 107 characters.
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        with socket.socket() as s:  # bound, never listening: connects to it are refused
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        Path(temp, "ray").mkdir()
        Path(temp, "ray", "ray_current_cluster").write_text(
            dead
        )  # what a killed `ray start` leaves
        script = (
            "import sys; sys.path.insert(0, 'jobs'); from common import init_ray; import ray\n"
            "init_ray(None)\n"
            "print('cpus', ray.cluster_resources().get('CPU'), flush=True)\n"
            "ray.shutdown()\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"note: the local Ray at {dead} " in proc.stderr
        assert "cpus " in proc.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
