"""Eval's embedding actors: a GPU each when the cluster has GPUs (or training asked for them),
CPUs otherwise; the actor count fits the GPUs there are. Pure functions of the cluster's
resources, as `ray.cluster_resources()` reports them: no Ray started."""

from __future__ import annotations

import pytest

from pipeline.evaluate import embedding_resources
from pipeline.pretrain import eval_resources
from pipeline.spec import build_spec

CPU_ONLY = {"CPU": 16.0, "memory": 6.4e10}
EIGHT_GPUS = {"CPU": 96.0, "GPU": 8.0, "memory": 6.4e11}
ONE_GPU = {"CPU": 8.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("cluster", "use_gpu", "concurrency", "expected"),
    [
        (CPU_ONLY, None, None, (False, 8)),  # half the CPUs, at most 8
        ({"CPU": 2.0}, None, None, (False, 1)),
        ({"CPU": 1.0}, None, None, (False, 1)),  # never zero actors
        (EIGHT_GPUS, None, None, (True, 8)),  # one actor per GPU
        (EIGHT_GPUS, None, 4, (True, 4)),
        (ONE_GPU, None, 4, (True, 1)),  # more actors than GPUs would only wait
        (EIGHT_GPUS, False, None, (False, 8)),  # asked for CPUs: CPUs it is
        (CPU_ONLY, True, 4, (True, 4)),  # GPU nodes not up yet: the requests bring them
    ],
)
def test_embedding_resources(cluster, use_gpu, concurrency, expected):
    assert embedding_resources(cluster, use_gpu, concurrency) == expected


def test_pipeline_eval_uses_the_gpus_the_cluster_has(tmp_path):
    spec = build_spec(preset="demo", run_dir=str(tmp_path / "run"), stages=("evaluate",))
    assert spec.config.train.use_gpu is False and spec.config.eval.concurrency == 1
    cfg, use_gpu = eval_resources(spec, CPU_ONLY)
    assert (use_gpu, cfg.concurrency) == (False, 1)
    # The same run on a machine with a GPU: eval takes it, though training ran on CPUs.
    cfg, use_gpu = eval_resources(spec, ONE_GPU)
    assert (use_gpu, cfg.concurrency) == (True, 1)
    assert cfg.batch_size == spec.config.eval.batch_size  # only the actor count may change


def test_pipeline_eval_on_a_gpu_cluster_scaled_down(tmp_path):
    spec = build_spec(preset="datacomp-small", run_dir=str(tmp_path / "run"), stages=("evaluate",))
    assert spec.config.train.use_gpu and spec.config.eval.concurrency == 4
    # GPU nodes up: 4 actors, one GPU each; on one GPU, one actor.
    assert eval_resources(spec, EIGHT_GPUS)[0].concurrency == 4
    assert eval_resources(spec, EIGHT_GPUS)[1] is True
    assert eval_resources(spec, ONE_GPU)[0].concurrency == 1
    # The autoscaler let the GPU nodes go after training: the actors still ask for GPUs.
    cfg, use_gpu = eval_resources(spec, CPU_ONLY)
    assert (use_gpu, cfg.concurrency) == (True, 4)
