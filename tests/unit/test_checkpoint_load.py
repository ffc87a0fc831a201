"""Checkpoints load with torch.load(weights_only=True): tensors and plain values, no code."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.loop import CHECKPOINT_FILE, build_optimizer, load_checkpoint_model
from pipeline.train.modeling import create_model


class _RunsCode:
    """What a pickle can do on load: call anything, here touch a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_loops_checkpoint_layout_loads_safely(tmp_path):
    cfg = TrainConfig()
    model = create_model(cfg.model, cfg.init_temperature)
    optimizer = build_optimizer(model, cfg)
    model.logit_scale.grad = torch.ones_like(model.logit_scale)
    optimizer.step()  # Adam's moments in the state
    state = {  # the keys train_loop_per_worker saves
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 5,
        "epoch": 0,
        "data_plan": {"chunks": 3, "rows": 96, "world": 2, "per_worker_batch": 16, "seed": 0},
        "zeroshot_top1": 0.25,
        "resumes": [5],
    }
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # the worker's resume load
    loaded = load_checkpoint_model(tmp_path, cfg)
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    victim = tmp_path / "pwned"
    torch.save({"model": _RunsCode(victim)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_model(tmp_path, TrainConfig())
    assert not victim.exists()
