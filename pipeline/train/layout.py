"""How many training workers, and how many CPUs and torch threads each: `train.num_workers`
"auto" (the default) decided from the cluster, or an integer taken as given.

The spec keeps "auto"; the layout is a separate value, derived once the cluster is known (after
Ray starts) and passed down to the trainer, the manifest and the summary. Rules for "auto":

- GPUs (with train.use_gpu): one worker per GPU in the cluster, as many as split the batch;
  none yet (an autoscaling cluster adds them on demand) is an error: give a count.
- CPUs only, one node (a laptop, or a one-node cluster): one worker using all the node's
  cores, bar a little for Ray Data's decode tasks. On CPUs every extra worker adds a gradient
  all-reduce and a feature gather per step between processes that share the same cores: on 2
  cores two gloo workers train at 0.58x of one process using both (benchmarks/README.md).
- CPUs only, several nodes: one worker per node (the smallest node's cores each), so the
  compute of every node is used and the all-reduce crosses the network once per node.
- A sweep's trial: one worker (its configured CPUs); trials run side by side instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.config import TrainConfig

AUTO = "auto"
# On 2 cores two gloo workers reach this fraction of one two-thread process (bench_train.py).
TWO_WORKERS_RATIO = 0.58


@dataclass(frozen=True)
class Cluster:
    """What a layout is decided from: (CPUs, GPUs) of each alive node that can run work."""

    nodes: tuple[tuple[float, float], ...]
    local: bool = True  # the driver's own machine (one node): "this machine" in the message

    @property
    def cpus(self) -> float:
        return sum(c for c, _ in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(g for _, g in self.nodes)


@dataclass(frozen=True)
class Layout:
    num_workers: int
    cpus_per_worker: float  # the worker's Ray CPU request
    threads: int  # torch compute threads on each worker
    use_gpu: bool
    auto: bool  # chosen by "auto", not given
    why: str  # one line: what was chosen and why

    def describe(self) -> str:
        per = f"{self.cpus_per_worker:g} CPU" + (" + 1 GPU" if self.use_gpu else "")
        return (
            f"{self.num_workers} worker{'s' if self.num_workers != 1 else ''} x "
            f"({per}, {self.threads} thread{'s' if self.threads != 1 else ''})"
        )


def torch_threads(cpus: float) -> int:
    """Compute threads for a worker holding `cpus`: a share of a core is still one thread,
    and 1.5 CPUs on a 2-core machine compute on both."""
    return max(1, math.ceil(cpus))


def check_num_workers(value: object) -> None:
    """ValueError unless `value` is "auto" or a positive integer (before Ray starts)."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.num_workers: {value!r} is neither auto nor a positive integer")


def _splits(cfg: TrainConfig, workers: int) -> bool:
    per = cfg.global_batch_size // workers
    return cfg.global_batch_size % workers == 0 and per % cfg.accum_freq == 0


def resolve_layout(cfg: TrainConfig, cluster: Cluster | None, *, trial: bool = False) -> Layout:
    """The workers `cfg` trains on, in `cluster` (None: unknown, fine for an integer)."""
    if cfg.num_workers != AUTO:
        check_num_workers(cfg.num_workers)
        return Layout(
            cfg.num_workers,
            cfg.cpus_per_worker,
            torch_threads(cfg.cpus_per_worker),
            cfg.use_gpu,
            False,
            f"{cfg.num_workers} workers as set (train.num_workers)",
        )
    if trial:
        return Layout(
            1,
            cfg.cpus_per_worker,
            torch_threads(cfg.cpus_per_worker),
            cfg.use_gpu,
            True,
            "auto: one worker per trial, trials side by side (a sweep's parallelism is its trials)",
        )
    if cluster is None:
        raise ValueError("train.num_workers is auto: the layout needs the cluster (start Ray)")
    if cfg.use_gpu and cluster.gpus >= 1:
        gpus = int(cluster.gpus)
        workers = next(n for n in range(gpus, 0, -1) if _splits(cfg, n))
        why = f"one per GPU ({gpus} in the cluster)"
        if workers < gpus:
            why += f", {workers} so the global batch {cfg.global_batch_size} splits evenly"
        return Layout(
            workers,
            cfg.cpus_per_worker,
            torch_threads(cfg.cpus_per_worker),
            True,
            True,
            f"auto: {workers} GPU worker{'s' if workers > 1 else ''}: {why}",
        )
    if cfg.use_gpu:
        # An autoscaling cluster may have no GPU node up yet: auto cannot count what it will add.
        raise ValueError(
            "train.num_workers is auto with train.use_gpu, but the cluster has no GPU now (an "
            "autoscaling cluster adds GPU nodes on demand): give --num-workers N"
        )
    cpu_nodes = [c for c, _ in cluster.nodes if c >= 1]
    if not cpu_nodes:
        raise ValueError("train.num_workers is auto, but no node of the cluster has a whole CPU")
    cores = min(cpu_nodes)
    # What stays free for Ray Data's decode tasks beside the worker: two tasks in flight on a
    # small node, a quarter of a bigger one (decoding keeps pace with one worker's steps).
    keep = max(2 * cfg.data_cpus_per_task, cores / 4)
    cpus = max(1.0, cores - keep)
    threads = torch_threads(cpus)
    gpu_note = " (GPUs present, but train.use_gpu is off)" if cluster.gpus else ""
    if len(cpu_nodes) == 1:
        where = "this machine" if cluster.local else "the cluster's one node"
        workers = 1
        why = (
            f"{where} has {cores:g} CPUs and no GPU{gpu_note}; one process on every core beats "
            f"several all-reducing over the same cores (2 on 2 cores: {TWO_WORKERS_RATIO}x)"
        )
    else:
        workers = next(n for n in range(len(cpu_nodes), 0, -1) if _splits(cfg, n))
        why = (
            f"{len(cpu_nodes)} CPU nodes{gpu_note}: one worker per node, each on the smallest "
            f"node's {cores:g} CPUs less {keep:g} for Ray Data's decoding"
        )
    chosen = Layout(workers, cpus, threads, False, True, "").describe()
    return Layout(workers, cpus, threads, False, True, f"auto: {chosen}: {why}")


def cluster_now() -> Cluster:
    """The running Ray cluster's alive nodes (call after ray.init)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    pairs = tuple(
        (float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
        for n in nodes
    )
    local = len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here
    return Cluster(pairs, local=local)


def this_machine() -> Cluster:
    """This machine as a one-node cluster, without starting Ray (a dry run's guess)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    import torch

    return Cluster(((float(cpus), float(torch.cuda.device_count())),), local=True)
