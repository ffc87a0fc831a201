"""Crash at the commit points that need Ray (pipeline.faults; the others run in
tests/unit/test_crash_points.py): the end of the prepare stage, and a checkpoint save.
After each crash the same call again gives what an uninterrupted run gives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline import faults, pretrain
from pipeline.config import TrainConfig, get_preset
from pipeline.rundir import RunDir
from pipeline.spec import spec_of
from pipeline.train.loop import CHECKPOINT_FILE, run_training
from tests.integration.test_prepare_resume import outcome, server, write_list  # noqa: F401
from tests.integration.test_train_ray import _write_shards

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_injected_crash")]


def _stats(run: RunDir) -> dict:
    """stats.json without what depends on timing or on the folder."""
    stats = json.loads(Path(run.stats_path).read_text())
    for stage in stats["stages"].values():
        stage.pop("seconds")
    return {k: v for k, v in stats.items() if k not in ("wall_seconds", "images_per_second",
                                                        "rows_this_run", "paths")}  # fmt: skip


def test_crash_at_the_end_of_prepare_then_rerun(ray_local, server, tmp_path, monkeypatch):  # noqa: F811
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{i}" for i in range(10)] + [f"{base}/gone/{i}" for i in range(2)]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    cfg = get_preset("tiny")
    download = dataclasses.replace(cfg.prepare.download, allowed_networks=("127.0.0.1/32",))
    cfg = dataclasses.replace(
        cfg, prepare=dataclasses.replace(cfg.prepare, rows_per_shard=6, download=download)
    )

    def prepare(root):
        run = RunDir.at(root)
        spec = spec_of(cfg, root, ("prepare",), url_list=str(url_list))
        pretrain.prepare(spec, run, log=lambda *_: None)
        return run

    reference = prepare(tmp_path / "reference")
    for point in ("prepare.stats", "prepare.funnel", "manifest"):
        monkeypatch.setenv(faults.ENV, point)
        faults.reset()
        with pytest.raises(faults.InjectedCrash):
            prepare(tmp_path / point)
        monkeypatch.delenv(faults.ENV)
        run = prepare(tmp_path / point)  # the same command again
        assert outcome(run.root) == outcome(reference.root), point
        assert _stats(run) == _stats(reference), point
        assert (
            run.stage("prepare")["samples"] == 10 and (Path(run.root) / "data/funnel.png").exists()
        )


def test_crash_at_checkpoint_save_then_rerun(ray_local, tmp_path, monkeypatch):
    """Rank 0 dies after writing its second checkpoint file, before Ray Train took it: the
    rerun resumes from the first checkpoint and ends where an uninterrupted run ends."""
    shards = tmp_path / "data" / "shards"
    _write_shards(shards, 64, files=2)
    cfg = TrainConfig(num_workers=1, cpus_per_worker=1.0, global_batch_size=16, max_steps=6,
                      warmup_steps=1, checkpoint_every_steps=2, log_every_steps=2,
                      zeroshot_every_steps=0, max_failures=0)  # fmt: skip
    monkeypatch.setenv(faults.ENV, "checkpoint.save@2")  # reaches the worker via runtime_env
    with pytest.raises(Exception, match="crash injected at commit point 'checkpoint.save'"):
        run_training(cfg, shards, 64, tmp_path)
    monkeypatch.delenv(faults.ENV)
    result, metrics = run_training(cfg, shards, 64, tmp_path)
    assert metrics["step"] == 6
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/{CHECKPOINT_FILE}", weights_only=True)
    assert state["step"] == 6 and state["resumes"] == [2]  # from the checkpoint before the crash
    assert (tmp_path / "model" / "open_clip_config.json").exists()
