"""One contrastive training step: open_clip's losses, with feature-cache gradient accumulation.

Pure torch with rank and world size passed in (open_clip's ClipLoss style), so the step runs
and is tested in one process as well as on K Ray Train workers.
"""

from __future__ import annotations

import contextlib

import torch

LOSSES = ("clip", "siglip")


def build_loss(kind: str, rank: int, world_size: int) -> torch.nn.Module:
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "clip":
        # Local loss + gather with grad: each worker scores its rows against every worker's
        # columns, so K workers compute the loss and gradients of one global batch.
        return ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(image features, text features, (logit scale[, logit bias])) of an open_clip forward."""
    if isinstance(out, dict):
        extra = (out["logit_scale"],) + ((out["logit_bias"],) if "logit_bias" in out else ())
        return out["image_features"], out["text_features"], extra
    return out[0], out[1], tuple(out[2:])


def contrastive_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images_BCHW: torch.Tensor,
    texts_BL: torch.Tensor,
    accum_freq: int = 1,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Forward and backward over one (local) batch; gradients are left in ``.grad``.

    With ``accum_freq`` > 1 this is open_clip's feature cache: features of every micro-batch
    are first computed without gradients, then each micro-batch is recomputed with gradients
    and the loss is taken over the whole batch with the other micro-batches' cached features,
    so the summed gradients equal those of the full batch while activations are held for one
    micro-batch only. Unlike open_clip, the logit scale (and bias) keep their gradient in the
    last micro-step only, so they too match the full batch instead of counting accum_freq
    times. (Models with BatchNorm see micro-batch statistics, as in open_clip.)
    Returns the loss of the batch, detached.
    """
    autocast = autocast or contextlib.nullcontext()
    if accum_freq == 1:
        with autocast:
            image_f, text_f, extra = _split_output(model(images_BCHW, texts_BL))
            loss = loss_fn(image_f, text_f, *extra)
        loss.backward()
        return loss.detach()

    if images_BCHW.shape[0] % accum_freq:
        raise ValueError(
            f"local batch {images_BCHW.shape[0]} does not split into accum_freq={accum_freq} "
            "equal micro-batches"
        )
    images = images_BCHW.chunk(accum_freq)
    texts = texts_BL.chunk(accum_freq)
    with torch.no_grad(), autocast:
        cached = [_split_output(model(i, t))[:2] for i, t in zip(images, texts, strict=True)]
    image_cache = [c[0] for c in cached]
    text_cache = [c[1] for c in cached]
    no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce once, after the last backward
    for j in range(accum_freq):
        last = j == accum_freq - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast:
                image_f, text_f, extra = _split_output(model(images[j], texts[j]))
                if not last:
                    extra = tuple(x.detach() for x in extra)
                all_image = torch.cat(image_cache[:j] + [image_f] + image_cache[j + 1 :])
                all_text = torch.cat(text_cache[:j] + [text_f] + text_cache[j + 1 :])
                loss = loss_fn(all_image, all_text, *extra)
            loss.backward()
    return loss.detach()
