"""A Ray cluster of `ray start` nodes on this machine, as a user starts one, for the e2e tests.

Every node listens on 127.0.0.1 at ports chosen here (other local Rays hold the defaults),
keeps its files in this cluster's own temp dir, and has token authentication on. With
`separate_disks`, each node has a folder of its own instead, as separate machines with no
shared disk would: Ray's temp dir, the TMPDIR and the working directory of every process the
node starts. Only processes started here are ever stopped: `ray stop` would also end other
local clusters.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _short_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="e2e-ray-", dir="/tmp")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now running."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces; the fields after it do not.
            stat = (proc / "stat").read_text()
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def _descendants(root: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found.extend(children)
        frontier.extend(children)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    """`ray start --head` plus `ray start --address` worker nodes, all on 127.0.0.1."""

    head_cpus: int = 2
    # Each node in its own folder (see the module's docstring); False: one temp dir for all.
    separate_disks: bool = False
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir: str = field(default_factory=_short_temp_dir)
    env: dict[str, str] = field(init=False)
    # Every node's folder (the head's temp_dir first): what shutdown stops and removes.
    node_dirs: list[str] = field(init=False)
    gcs_port: int = field(init=False)
    dashboard_port: int = field(init=False)

    def __post_init__(self):
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.node_dirs = [self.temp_dir]

    def node_env(self, node_dir: str) -> dict[str, str]:
        """The environment of a node's processes (and of a driver on that node)."""
        if not self.separate_disks:
            return self.env
        scratch = os.path.join(node_dir, "tmp")
        os.makedirs(scratch, exist_ok=True)
        return {**self.env, "TMPDIR": scratch}

    @property
    def head_env(self) -> dict[str, str]:
        """The environment for a driver on the head node."""
        return self.node_env(self.temp_dir)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self, temp_dir: str) -> tuple[list[str], int]:
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        flags = [
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        return flags, node_manager

    def start(self, system_config: dict | None = None) -> None:
        flags, _ = self._node_ports(self.temp_dir)
        (client,) = free_ports(1)
        command = [
            "ray", "start", "--head", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client}", f"--num-cpus={self.head_cpus}", *flags,
        ]  # fmt: skip
        if system_config:
            command.append(f"--system-config={json.dumps(system_config)}")
        self._run(command, self.temp_dir)

    def add_node(self, num_cpus: int) -> int:
        """Start a worker node; returns its node manager port, which names it for kill_node."""
        node_dir = self.temp_dir
        if self.separate_disks:
            node_dir = _short_temp_dir()
            self.node_dirs.append(node_dir)
        flags, node_manager = self._node_ports(node_dir)
        command = ["ray", "start", f"--address={self.address}", f"--num-cpus={num_cpus}", *flags]
        self._run(command, node_dir)
        return node_manager

    def _run(self, command: list[str], node_dir: str) -> None:
        # With separate disks the node's processes start in its folder: a relative path written
        # by any of them lands there, never in the repository.
        cwd = node_dir if self.separate_disks else None
        env = self.node_env(node_dir)
        done = subprocess.run(
            command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stdout}\n{done.stderr}")

    def kill_node(self, node_manager_port: int) -> list[int]:
        """kill -9 a worker node: its raylet and everything the raylet started (workers, agents),
        as when a spot instance disappears. Returns the pids killed."""
        raylets = [
            pid
            for pid in _parents()
            if f"--node_manager_port={node_manager_port}" in _cmdline(pid)
            and any(d in _cmdline(pid) for d in self.node_dirs)
            and "/raylet " in _cmdline(pid)
        ]
        assert len(raylets) == 1, f"expected one raylet on port {node_manager_port}: {raylets}"
        pids = [*_descendants(raylets[0]), raylets[0]]
        _kill(pids)
        return pids

    def shutdown(self) -> None:
        """Stop this cluster's processes only (matched by its nodes' temp dirs), then remove
        their files."""
        _kill([pid for pid in _parents() if any(d in _cmdline(pid) for d in self.node_dirs)])
        for node_dir in self.node_dirs:
            shutil.rmtree(node_dir, ignore_errors=True)

    def wait_for_job_agent(self, timeout_s: float = 120) -> None:
        """The head answers before its job agent is up; submitting then fails with a 500."""
        deadline = time.monotonic() + timeout_s
        while True:
            probe = subprocess.run(
                ["ray", "job", "list", "--address", self.dashboard_url],
                env=self.env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Ray job API never came up: {probe.stderr[-2000:]}")
            time.sleep(2)
