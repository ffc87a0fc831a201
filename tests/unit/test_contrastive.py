"""The training step without Ray: accumulation gives the full batch's gradients; losses, config."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.contrastive import build_loss, contrastive_step
from pipeline.train.loop import check_config
from pipeline.train.modeling import create_model, model_config

# A LayerNorm-only model: with BatchNorm (the demo ResNet) micro-batches see other statistics,
# so no accumulation scheme can match the full batch exactly (open_clip's caveat too).
VIT = "clip-demo-vit-tiny"


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model_config(VIT)["vision_cfg"]["image_size"]
    ctx = model_config(VIT)["text_cfg"]["context_length"]
    images = torch.randn(n, 3, size, size, generator=g)
    texts = torch.randint(1, 400, (n, ctx), generator=g)
    texts[:, -3:] = 0  # padding, as real tokens have
    return images, texts


def _grads(model, loss_kind: str, images, texts, accum_freq: int):
    model.zero_grad(set_to_none=True)
    loss = contrastive_step(model, build_loss(loss_kind, 0, 1), images, texts, accum_freq)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_feature_cache_accumulation_matches_the_full_batch(loss_kind):
    torch.manual_seed(0)
    bias = -10.0 if loss_kind == "siglip" else None
    model = create_model(VIT, 0.07, bias)
    images, texts = _batch(16)

    full_loss, full = _grads(model, loss_kind, images, texts, accum_freq=1)
    acc_loss, acc = _grads(copy.deepcopy(model), loss_kind, images, texts, accum_freq=4)

    assert set(acc) == set(full)
    assert "logit_scale" in full  # the temperature's gradient is compared too, not counted 4x
    torch.testing.assert_close(acc_loss, full_loss, rtol=0, atol=1e-5)
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-4, atol=1e-5, msg=name)
    # A different batch gives different gradients: the comparison can fail.
    _, other = _grads(model, loss_kind, *_batch(16, seed=1), accum_freq=1)
    assert not torch.allclose(other["logit_scale"], full["logit_scale"])


def test_accumulation_refuses_an_uneven_split():
    model = create_model(VIT)
    images, texts = _batch(6)
    with pytest.raises(ValueError, match="accum_freq=4"):
        contrastive_step(model, build_loss("clip", 0, 1), images, texts, accum_freq=4)


def test_siglip_model_carries_a_bias_and_clip_does_not():
    assert create_model(VIT, 0.1, -10.0).logit_bias.item() == pytest.approx(-10.0)
    assert getattr(create_model(VIT), "logit_bias", None) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": "hinge"}, "loss 'hinge'"),
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"global_batch_size": 100, "num_workers": 3}, "does not split over 3 workers"),
        ({"global_batch_size": 64, "accum_freq": 3}, "accum_freq=3"),
        ({"init_temperature": 0.001}, "initial temperature"),
        ({"placement_strategy": "RANDOM"}, "placement strategy"),
    ],
)
def test_bad_training_config_is_refused_with_the_reason(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(TrainConfig(**changes))
    check_config(TrainConfig())  # the defaults pass
