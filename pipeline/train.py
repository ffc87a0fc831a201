"""Contrastive training on Ray Train V2: train_loop_per_worker and the TorchTrainer it runs in.

Parquet shards stream through Ray Data (decode + augment run as CPU tasks beside
the workers); each worker computes open_clip's ClipLoss with negatives gathered
from every other worker (local_loss + gather_with_grad, as open_clip trains).
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig, from_dict
from pipeline.modeling import create_model, export_local_dir, model_config, resolve_model_name

CHECKPOINT_FILE = "state.pt"


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # open_clip's rule: gains, biases and the logit scale are not decayed.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in params if _no_weight_decay(n, p)], "weight_decay": 0.0},
            {
                "params": [p for n, p in params if not _no_weight_decay(n, p)],
                "weight_decay": cfg.weight_decay,
            },
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),  # CLIP's betas for transformers
        eps=1e-6,
    )


def decode_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data stage: JPEG bytes → normalised CHW float32, with open_clip's train transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(PreprocessCfg(size=image_size), is_train=True)
    images = [transform(Image.open(io.BytesIO(jpg)).convert("RGB")).numpy() for jpg in batch["jpg"]]
    return {
        "image": np.stack(images).astype(np.float32),
        "tokens": np.stack(batch["tokens"]).astype(np.int64),
    }


def build_train_dataset(shards: Path, model: str, cpus_per_task: float = 0.25):
    """The shards as a Ray Data stream of (image, tokens); block order reshuffled each epoch.

    Read and decode run as fractional-CPU tasks: the training workers hold the other
    CPUs, and a task asking for a whole one would wait forever on a small machine.
    """
    import ray

    return (
        ray.data.read_parquet(str(shards), num_cpus=cpus_per_task)
        .select_columns(["jpg", "tokens"])
        .randomize_block_order()
        .map_batches(
            decode_images,
            fn_kwargs={"image_size": model_config(model)["vision_cfg"]["image_size"]},
            batch_size=128,
            num_cpus=cpus_per_task,
        )
    )


def _save_checkpoint(state: dict[str, Any]):
    import ray.train

    tmp = tempfile.mkdtemp(prefix="clip-ckpt-")
    torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
    return ray.train.Checkpoint.from_directory(tmp)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    cfg = from_dict(TrainConfig, config["train"])
    num_samples: int = config["num_samples"]
    tensorboard_dir: str | None = config.get("tensorboard_dir")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    per_worker_batch = cfg.global_batch_size // world
    steps_per_epoch = num_samples // (per_worker_batch * world)
    total_steps = steps_per_epoch * cfg.epochs

    model = create_model(cfg.model, cfg.init_temperature)
    if not cfg.learn_temperature:
        model.logit_scale.requires_grad_(False)
    optimizer = build_optimizer(model, cfg)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    unwrapped = model.module if hasattr(model, "module") else model
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, max(total_steps, 1))
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    writer = None
    if rank == 0 and tensorboard_dir:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(tensorboard_dir)

    shard = ray.train.get_dataset_shard("train")
    window = {"samples": 0, "seconds": 0.0, "wait": 0.0}
    totals = {"samples": 0, "seconds": 0.0, "wait": 0.0}
    loss_value = float("nan")
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = shard.iter_torch_batches(
            batch_size=per_worker_batch,
            drop_last=True,
            local_shuffle_buffer_size=per_worker_batch * 4,
            local_shuffle_seed=cfg.seed + epoch * world + rank,
            prefetch_batches=2,
        )
        tick = time.perf_counter()
        for i, batch in enumerate(batches):
            if i >= steps_per_epoch or step >= total_steps:
                break
            if i < skip:  # resumed mid-epoch: this epoch's first `skip` steps are done
                tick = time.perf_counter()
                continue
            waited = time.perf_counter() - tick
            images = batch["image"].to(device, non_blocking=True)
            texts = batch["tokens"].to(device, non_blocking=True)
            lr = scheduler(step)
            with autocast:
                image_features, text_features, logit_scale = model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                unwrapped.logit_scale.clamp_(0, np.log(cfg.max_logit_scale))
            step += 1
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            samples = per_worker_batch * world
            for acc in (window, totals):
                acc["samples"] += samples
                acc["seconds"] += elapsed
                acc["wait"] += waited
            loss_value = loss.item()
            if step % cfg.log_every_steps == 0 or step == total_steps:
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "logit_scale": unwrapped.logit_scale.exp().item(),
                    "lr": lr,
                    "samples_per_second": window["samples"] / max(window["seconds"], 1e-9),
                    "data_wait_fraction": window["wait"] / max(window["seconds"], 1e-9),
                }
                if writer:
                    for name, value in metrics.items():
                        if name != "step":
                            writer.add_scalar(f"train/{name}", value, step)
                    writer.flush()
                window = {"samples": 0, "seconds": 0.0, "wait": 0.0}
            if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                _report(rank, unwrapped, optimizer, step, loss_value, totals)
    if writer:
        writer.close()


def _report(rank, model, optimizer, step, loss_value, totals) -> None:
    import ray.train

    metrics = {
        "step": step,
        "loss": loss_value,
        "samples_per_second": totals["samples"] / max(totals["seconds"], 1e-9),
        "data_wait_fraction": totals["wait"] / max(totals["seconds"], 1e-9),
    }
    checkpoint = None
    if rank == 0:  # every rank holds the same weights; one copy is enough
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        checkpoint = _save_checkpoint(state)
    ray.train.report(metrics, checkpoint=checkpoint)


def build_trainer(cfg: TrainConfig, shards: Path, num_samples: int, storage: Path):
    """A TorchTrainer over the shards; rerun with the same storage it resumes its checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resolve_model_name(cfg.model)  # fail on the driver, with a clear message, before Ray starts
    if num_samples < cfg.global_batch_size:
        raise ValueError(
            f"only {num_samples} training samples, fewer than one global batch "
            f"({cfg.global_batch_size}); lower the batch size or prepare more data"
        )
    if cfg.global_batch_size % cfg.num_workers:
        raise ValueError(
            f"global batch {cfg.global_batch_size} does not split over {cfg.num_workers} workers"
        )
    # Ray rebuilds the config on each worker; absolute paths survive a --working-dir change.
    config = {
        "train": dataclasses.asdict(cfg),
        "num_samples": num_samples,
        "tensorboard_dir": str(storage / "train" / "tensorboard"),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": build_train_dataset(shards, cfg.model)},
    )


def load_checkpoint_model(checkpoint_dir: str | Path, cfg: TrainConfig) -> torch.nn.Module:
    state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, weights_only=False)
    model = create_model(cfg.model, cfg.init_temperature)
    model.load_state_dict(state["model"])
    return model


def run_training(cfg: TrainConfig, shards: Path, num_samples: int, storage: Path):
    """Train, then export the final checkpoint to STORAGE/model; returns (result, metrics)."""
    result = build_trainer(cfg, shards, num_samples, storage).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {storage / 'train'}")
    with result.checkpoint.as_directory() as d:
        model = load_checkpoint_model(d, cfg)
    export_local_dir(model, model_config(cfg.model), storage / "model")
    return result, dict(result.metrics or {})
