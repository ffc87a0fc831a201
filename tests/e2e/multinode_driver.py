"""Driver of test_cluster_multinode: the tiny preset's prepare and train against a running
cluster, as one Ray job, then what Ray's state API says ran where, as one JSON line after
`RESULT `.

Training spreads its workers over the nodes (placement SPREAD) and runs long enough to be
interrupted; everything else is the tiny preset as `jobs/pretrain.py --preset tiny` runs it.
The report also says, for each node, where a process it starts keeps temporary files, its
working directory and the S3 endpoint it sees: the test checks that the nodes share no disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import pretrain  # noqa: E402
from pipeline.config import get_preset  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.spec import spec_of  # noqa: E402


def _state(job_id: str, dashboard: str) -> dict:
    from ray.util.state import list_actors, list_tasks

    # Task events reach the GCS in batches, a second or so after the tasks ran.
    time.sleep(3)
    tasks = list_tasks(dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
    actors = list_actors(dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
    return {
        "tasks": [
            {"name": t.name, "node_id": t.node_id, "resources": t.required_resources}
            for t in tasks
            if t.node_id
        ],
        "actors": [
            {
                "class_name": a.class_name,
                "node_id": a.node_id,
                "state": a.state,
                "placement_group_id": a.placement_group_id,
                "resources": a.required_resources,
            }
            for a in actors
        ],
    }


def _node_disks() -> list[dict]:
    """Per alive node: TMPDIR, working directory and S3 endpoint of a task that ran there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> dict:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "tmpdir": tempfile.gettempdir(),
            "cwd": os.getcwd(),
            "s3_endpoint": os.environ.get("AWS_ENDPOINT_URL"),
        }

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return ray.get(
        [
            where.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote()
            for node in nodes
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--dashboard", required=True, help="the state API's address")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    args = parser.parse_args()

    cfg = get_preset("tiny")
    train = dataclasses.replace(
        cfg.train,
        # Two workers of half a CPU (not auto, which would size one per node to the node): the
        # head alone holds both after the worker node dies.
        num_workers=2,
        cpus_per_worker=0.5,
        placement_strategy="SPREAD",
        max_steps=args.max_steps,
        checkpoint_every_steps=args.checkpoint_every,
        log_every_steps=1,  # every step in TensorBoard: the restored attempt's first step shows
        zeroshot_every_steps=0,
    )
    cfg = dataclasses.replace(cfg, train=train)

    import ray

    ray.init(address=args.address, configure_logging=False, log_to_driver=False)
    run = RunDir.at(args.run_dir)
    spec = spec_of(cfg, run.root, ("prepare", "train"))
    disks = _node_disks()
    prepared = pretrain.prepare(spec, run)
    trained = pretrain.train(spec, run)
    job_id = ray.get_runtime_context().get_job_id()
    report = {
        "prepare": prepared,
        "train": trained,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "driver": {"tmpdir": tempfile.gettempdir(), "cwd": os.getcwd()},
        "node_disks": disks,
        **_state(job_id, args.dashboard),
    }
    print("RESULT " + json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
