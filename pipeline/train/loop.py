"""Contrastive training on Ray Train V2: train_loop_per_worker and the TorchTrainer it runs in.

Each worker streams its part of a deterministic data plan (pipeline/train/ingest.py) through
Ray Data, whose CPU tasks decode and augment beside the workers; the step
(pipeline/train/contrastive.py) is open_clip's ClipLoss with negatives gathered from every
worker, or SigLIP's loss, with feature-cache accumulation. Checkpoints hold the model,
optimizer and step; the step is also the data position, so a restored run neither repeats
nor skips an epoch's rows.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import console, storage
from pipeline.config import TrainConfig, from_dict
from pipeline.console import set_ray_console_level
from pipeline.faults import commit_point, worker_env
from pipeline.train.contrastive import LOSSES, build_loss, contrastive_step
from pipeline.train.ingest import list_chunks, rank_dataset, rank_items, steps_per_epoch
from pipeline.train.layout import (
    AUTO,
    Layout,
    check_num_workers,
    cluster_now,
    resolve_layout,
    torch_threads,
)
from pipeline.train.modeling import create_model, export_local_dir, model_config, resolve_model_name
from pipeline.train.probe import ZeroShotProbe

CHECKPOINT_FILE = "state.pt"
# The last report's copy of this start's wall-clock marks (pipeline.pretrain.train_seconds).
MARKS = {
    "start_loop_at": "marks_loop_at",
    "start_ready_at": "marks_ready_at",
    "start_first_batch_at": "marks_first_batch_at",
}


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


def _autocast(precision: str, device: torch.device):
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _plan_signature(chunks, world: int, per_worker_batch: int, seed: int) -> dict[str, Any]:
    """What fixes the data order: a checkpoint restored under another plan says so in the log."""
    return {
        "chunks": len(chunks),
        "rows": sum(c.rows for c in chunks),
        "world": world,
        "per_worker_batch": per_worker_batch,
        "seed": seed,
    }


def _epoch_bounds(steps_per_epoch: list[int], step: int) -> int:
    """The epoch that global step ``step`` (0-based) belongs to."""
    return int(np.searchsorted(np.cumsum(steps_per_epoch), step, side="right"))


def training_schedule(cfg: TrainConfig, chunks, world: int) -> list[int]:
    """Steps of each epoch; with max_steps, as many epochs as it takes."""
    per_worker_batch = cfg.global_batch_size // world
    if not cfg.max_steps:
        return steps_per_epoch(chunks, cfg.epochs, cfg.seed, world, per_worker_batch)
    steps: list[int] = []
    while sum(steps) < cfg.max_steps:
        steps += steps_per_epoch(chunks, len(steps) + 1, cfg.seed, world, per_worker_batch)[-1:]
        if steps[-1] == 0:
            raise ValueError("an epoch of the shards holds no full batch per worker")
    steps[-1] -= sum(steps) - cfg.max_steps
    return steps


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from open_clip_train.scheduler import cosine_lr

    # Wall-clock marks of this start (a first start or a resume), sent with its first report: a
    # sweep's benchmark splits a trial's start-up with them (epoch seconds, this node's clock).
    startup, startup_sent = {"start_loop_at": time.time()}, False
    cfg = from_dict(TrainConfig, config["train"])
    # open_clip gathers with torch.distributed.nn.all_gather, which torch now warns about on
    # every call: one line per step per worker would bury the training log.
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    # Ray's notices on this worker follow the job's --log-level. Ray Train logs its per-report
    # "Reporting training result N: TrainingReport(...)" on a logger named by its file path,
    # a child of the root logger, which Ray Train sets to INFO here: the root follows too.
    level = config.get("log_level", console.DEFAULT)
    set_ray_console_level(level)
    logging.getLogger().setLevel(level.upper())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The layout's threads (all of a CPU node's cores under "auto"), else the CPUs it holds.
    torch.set_num_threads(config.get("threads") or torch_threads(cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    per_worker_batch = cfg.global_batch_size // world
    chunks = list_chunks(config["shards"], world)
    epoch_steps = training_schedule(cfg, chunks, world)
    total_steps = sum(epoch_steps)

    model = create_model(
        cfg.model, cfg.init_temperature, cfg.init_logit_bias if cfg.loss == "siglip" else None
    )
    if not cfg.learn_temperature:
        model.logit_scale.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg)
    step, zeroshot_top1, resumes = 0, None, []
    signature = _plan_signature(chunks, world, per_worker_batch, cfg.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # Onto the CPU: a GPU run's tensors would otherwise come back on the GPU they were
            # saved from, before this worker's model is there.
            state = torch.load(
                os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True
            )
        model.load_state_dict(state["model"])
        step, zeroshot_top1 = state["step"], state.get("zeroshot_top1")
        resumes = [*state.get("resumes", []), step]  # the steps this run restarted from
        if state.get("data_plan") != signature and rank == 0:
            print(
                f"warning: the shards or the worker layout changed since the checkpoint "
                f"({state.get('data_plan')} -> {signature}); data order restarts from step {step}"
            )
    model = ray.train.torch.prepare_model(model)
    if checkpoint:
        # Once the parameters are on their device: the optimizer puts its state (Adam's moments)
        # on each parameter's device as it loads it, and a step with the moments still on the
        # CPU and the parameters on a GPU fails.
        optimizer.load_state_dict(state["optimizer"])
    device = ray.train.torch.get_device()
    unwrapped = model.module if hasattr(model, "module") else model
    # The scheduler is a pure function of the step: restoring the step restores it.
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, max(total_steps, 1))
    loss_fn = build_loss(cfg.loss, rank, world)
    autocast = _autocast(cfg.precision, device)
    image_size = model_config(cfg.model)["vision_cfg"]["image_size"]
    mean = torch.tensor(unwrapped.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(unwrapped.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)

    writer = probe = None
    if rank == 0:
        if config.get("tensorboard_dir"):
            from tensorboardX import SummaryWriter

            # tensorboardX writes s3:// itself (boto3, AWS_ENDPOINT_URL); other URIs and
            # local folders go through the local path or are uploaded by the event writer.
            writer = SummaryWriter(config["tensorboard_dir"])
        if config.get("zeroshot_dataset") and cfg.zeroshot_every_steps:
            probe = ZeroShotProbe(
                config["zeroshot_dataset"], cfg.model, image_size, cfg.zeroshot_images_per_class
            )

    items = rank_items(
        chunks,
        cfg.seed,
        world,
        rank,
        per_worker_batch,
        len(epoch_steps),
        start_step=step,
    )
    batches = iter(
        rank_dataset(items, image_size, cfg.data_cpus_per_task).iter_torch_batches(
            batch_size=per_worker_batch, prefetch_batches=4
        )
    )
    startup["start_ready_at"] = time.time()  # model, checkpoint, probe and data plan ready
    window = {"samples": 0, "seconds": 0.0, "wait": 0.0}
    totals = {"samples": 0, "seconds": 0.0, "wait": 0.0}
    loss_value, grad_norm = float("nan"), float("nan")
    started = False
    tick = time.perf_counter()
    while step < total_steps:
        batch = next(batches)
        waited = time.perf_counter() - tick
        startup.setdefault("start_first_batch_at", time.time())
        images = batch["image"].to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
        texts = batch["tokens"].to(device, non_blocking=True)
        lr = scheduler(step)
        optimizer.zero_grad(set_to_none=True)
        loss = contrastive_step(model, loss_fn, images, texts, cfg.accum_freq, autocast)
        max_norm = cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        optimizer.step()
        with torch.no_grad():
            unwrapped.logit_scale.clamp_(0, np.log(cfg.max_logit_scale))
        step += 1
        elapsed = time.perf_counter() - tick
        tick = time.perf_counter()
        # The run's totals start after the first batch: pipeline start-up is not throughput.
        for acc in (window, totals) if started else (window,):
            acc["samples"] += per_worker_batch * world
            acc["seconds"] += elapsed
            acc["wait"] += waited
        started = True
        loss_value = loss.item()
        epoch = _epoch_bounds(epoch_steps, step - 1)
        probe_now = probe is not None and (
            step % cfg.zeroshot_every_steps == 0 or step == total_steps
        )
        if probe_now:
            zeroshot_top1 = probe(unwrapped, device)
        if step % cfg.log_every_steps == 0 or step == total_steps or probe_now:
            metrics = _metrics(epoch, loss_value, unwrapped, lr, grad_norm, window)
            if probe_now:
                metrics["zeroshot_top1"] = zeroshot_top1
            if writer:
                for name, value in metrics.items():
                    writer.add_scalar(f"train/{name}", value, step)
                writer.flush()
            if rank == 0:
                remaining = (total_steps - step) * totals["seconds"] / max(step - 1, 1)
                # Straight to stdout: Ray Train's patched print would also log it, twice.
                sys.stdout.write(progress_line(step, total_steps, metrics, remaining) + "\n")
                sys.stdout.flush()
            window = {"samples": 0, "seconds": 0.0, "wait": 0.0}
        report_now = step % cfg.checkpoint_every_steps == 0 or step == total_steps
        zeroshot_due = cfg.zeroshot_every_steps and step % cfg.zeroshot_every_steps == 0
        if report_now or (config.get("zeroshot_dataset") and zeroshot_due):
            run_metrics = _metrics(epoch, loss_value, unwrapped, lr, grad_norm, totals)
            metrics = {"step": step, **run_metrics, **(startup if not startup_sent else {})}
            startup_sent = True  # the marks go with the first report after this start only
            if step == total_steps:  # and, renamed, with the last: the driver splits its time
                metrics.update({MARKS[k]: v for k, v in startup.items()}, marks_end_at=time.time())
            if zeroshot_top1 is not None:
                metrics["zeroshot_top1"] = zeroshot_top1
                if probe is not None:
                    # The probe's size: a sweep's rungs read top-1's binomial standard error.
                    metrics["zeroshot_images"] = len(probe.labels_N)
            state = None
            if rank == 0 and report_now:  # every rank holds the same weights; one copy is enough
                state = {
                    "model": unwrapped.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "data_plan": signature,
                    "zeroshot_top1": zeroshot_top1,
                    "resumes": resumes,
                }
            _report(metrics, state)
    if writer:
        writer.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(step: int, total: int, metrics: dict[str, float], eta_seconds: float) -> str:
    """The console's line for a training step (rank 0, every log_every_steps)."""
    line = (
        f"[train] step {step}/{total} epoch {int(metrics['epoch'])} "
        f"loss {metrics['loss']:.3f} temp {1 / metrics['logit_scale']:.4f} "
        f"lr {metrics['lr']:.2e} {metrics['samples_per_second']:.0f} samples/s "
        f"data wait {100 * metrics['data_wait_fraction']:.0f}% ETA {_duration(eta_seconds)}"
    )
    if metrics.get("zeroshot_top1") is not None:
        line += f" val top1 {100 * metrics['zeroshot_top1']:.1f}%"
    return line


def _metrics(epoch, loss_value, model, lr, grad_norm, timing) -> dict[str, float]:
    """The logged figures; throughput and data wait over `timing`'s steps."""
    return {
        "epoch": epoch,
        "loss": loss_value,
        "logit_scale": model.logit_scale.exp().item(),
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_second": timing["samples"] / max(timing["seconds"], 1e-9),
        "data_wait_fraction": timing["wait"] / max(timing["seconds"], 1e-9),
    }


def _report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    import ray.train

    if not state:
        ray.train.report(metrics)
        return
    # report uploads the checkpoint to the run's storage before it returns (SYNC mode); the
    # local copy then goes, or every checkpoint of a long run would stay behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="clip-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        commit_point("checkpoint.save")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def check_config(cfg: TrainConfig) -> None:
    """Refuse a configuration that cannot train, with the reason, before any worker starts."""
    resolve_model_name(cfg.model)
    problems = []
    if cfg.loss not in LOSSES:
        problems.append(f"loss {cfg.loss!r} is not one of {', '.join(LOSSES)}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision {cfg.precision!r} is not auto, bf16 or fp32")
    if cfg.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        problems.append(f"placement strategy {cfg.placement_strategy!r} is not a Ray strategy")
    workers = 0
    try:
        check_num_workers(cfg.num_workers)
        # "auto" resolves to a count that splits the batch (pipeline/train/layout.py).
        workers = 1 if cfg.num_workers == AUTO else cfg.num_workers
    except ValueError as err:
        problems.append(str(err))
    if cfg.global_batch_size < 1 or cfg.accum_freq < 1:
        problems.append("global batch size and accum_freq must be at least 1")
    elif not workers:
        pass
    elif cfg.global_batch_size % workers:
        problems.append(
            f"global batch {cfg.global_batch_size} does not split over {cfg.num_workers} workers"
        )
    elif (cfg.global_batch_size // workers) % cfg.accum_freq:
        problems.append(
            f"a worker's batch of {cfg.global_batch_size // workers} does not split into "
            f"accum_freq={cfg.accum_freq} micro-batches"
        )
    if cfg.init_temperature <= 0 or 1 / cfg.init_temperature > cfg.max_logit_scale:
        problems.append(
            f"initial temperature {cfg.init_temperature} must be > 0 and at least "
            f"1/max_logit_scale = {1 / cfg.max_logit_scale:g}"
        )
    if problems:
        raise ValueError("training config: " + "; ".join(problems))


def build_trainer(
    cfg: TrainConfig,
    shards: str,
    num_samples: int,
    storage_path: str,
    *,
    name: str = "train",
    zeroshot_dataset: str | Path | None = None,
    callbacks: list | None = None,
    layout: Layout | None = None,
):
    """A TorchTrainer over the shards; rerun with the same storage it resumes its checkpoint.

    `layout`: the workers (pipeline/train/layout.py), decided by the caller once the cluster is
    known; None: resolved here, from the running cluster when num_workers is "auto".

    Ray Train storage is STORAGE/NAME, TensorBoard scalars go to STORAGE/NAME/tensorboard.
    With ``zeroshot_dataset`` (an image folder) every report carries ``zeroshot_top1``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    check_config(cfg)  # fail on the driver, with a clear message, before workers start
    if layout is None:
        layout = resolve_layout(cfg, cluster_now() if cfg.num_workers == AUTO else None)
    if num_samples < cfg.global_batch_size:
        raise ValueError(
            f"only {num_samples} training samples, fewer than one global batch "
            f"({cfg.global_batch_size}); lower the batch size or prepare more data"
        )
    # Ray rebuilds the config on each worker; absolute paths survive a --working-dir change,
    # and URIs (a run dir in a bucket) reach every node.
    storage_path = storage.normalize(storage_path)
    config = {
        "train": dataclasses.asdict(cfg),
        "shards": storage.normalize(shards),
        "tensorboard_dir": storage.join(storage_path, name, "tensorboard"),
        "zeroshot_dataset": storage.normalize(zeroshot_dataset) if zeroshot_dataset else None,
        # The job's --log-level (jobs/common.set_log_level), for Ray's loggers on the workers.
        "log_level": console.level(),
        "threads": layout.threads,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=layout.num_workers,
            use_gpu=layout.use_gpu,
            resources_per_worker={
                "CPU": layout.cpus_per_worker,
                **({"GPU": 1} if layout.use_gpu else {}),
            },
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            # Checkpoints go to the run dir wherever it is: a local folder or a bucket.
            storage_path=storage.arrow_filesystem(storage_path)[1],
            storage_filesystem=storage.arrow_filesystem(storage_path)[0],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Its per-report "TrainingReport(...)" and worker-group notices are INFO lines.
            logging_config=ray.train.LoggingConfig(log_level=console.level().upper()),
            worker_runtime_env=worker_env(),  # a crash-point test's request reaches workers
        ),
    )


def load_checkpoint_model(checkpoint_dir: str | Path, cfg: TrainConfig) -> torch.nn.Module:
    # Onto the CPU: checkpoints of GPU workers hold CUDA tensors, and the driver that exports or
    # evaluates them may have no GPU.
    # (A sweep's winner is read straight from its folder, which may be on a bucket.)
    blob = io.BytesIO(storage.read_bytes(storage.join(checkpoint_dir, CHECKPOINT_FILE)))
    state = torch.load(blob, map_location="cpu", weights_only=True)
    bias = cfg.init_logit_bias if cfg.loss == "siglip" else None
    model = create_model(cfg.model, cfg.init_temperature, bias)
    model.load_state_dict(state["model"])
    return model


def run_training(
    cfg: TrainConfig,
    shards: str,
    num_samples: int,
    storage_path: str,
    zeroshot_dataset: str | Path | None = None,
    layout: Layout | None = None,
):
    """Train, then export the final checkpoint to STORAGE/model; returns (result, metrics)."""
    trainer = build_trainer(
        cfg, shards, num_samples, storage_path, zeroshot_dataset=zeroshot_dataset, layout=layout
    )
    result = trainer.fit()
    if result.checkpoint is None:
        where = storage.join(storage_path, "train")
        raise RuntimeError(f"training finished without a checkpoint in {where}")
    with result.checkpoint.as_directory() as d:
        model = load_checkpoint_model(d, cfg)
    export_local_dir(model, model_config(cfg.model), storage.join(storage_path, "model"))
    return result, dict(result.metrics or {})
