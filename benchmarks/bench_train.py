"""Training throughput: our TorchTrainer with Ray Data ingest against a plain torch loop.

Both train the same model on the same Parquet shards, with the same global batch, the same
loss and optimizer and the same number of steps, on this machine's CPUs (or, with --use-gpu,
on one GPU: issue 4's check, ViT-B-32 in bf16 at global batch 1024):

- ours: `pipeline.train.loop.run_training` (Ray Train workers, each streaming its part of the data
  plan through Ray Data tasks that decode and augment the JPEGs beside the workers);
- plain: one process, a torch DataLoader whose worker processes decode the same shards with
  open_clip's train transform, and the same training step;
- synthetic (--synthetic, a run of its own): the same model, optimizer, loss and step as ours on
  random tensors made once on the device: no data loading at all, the ceiling of the other two.

Prints samples/s of each (the training loop only: process and actor start-up excluded from
all; the synthetic loop also leaves out its first --synthetic-warmup steps), their ratios, and
the fraction of our step time spent waiting for data.

    python benchmarks/bench_train.py                # 4,096 demo-like pairs, 40 steps of 256
    python benchmarks/bench_train.py --steps 20     # quicker

    # Issue 4 on one GPU (benchmarks/gpu_check.sh runs these two):
    python benchmarks/bench_train.py --synthetic --use-gpu --model ViT-B-32 --batch 1024 \
        --steps 200 --json synthetic.json
    python benchmarks/bench_train.py --use-gpu --model ViT-B-32 --batch 1024 --steps 200 \
        --workers 1 --rows 20480 --image-size 256 --cpus-per-worker 2 --skip-plain \
        --baseline synthetic.json
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import schema  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data.tokenize import load_tokenizer  # noqa: E402
from pipeline.demo.captions import train_caption  # noqa: E402
from pipeline.demo.draw import COLOURS, SHAPES, render, sample_scene  # noqa: E402
from pipeline.train.contrastive import build_loss, contrastive_step  # noqa: E402
from pipeline.train.ingest import shard_files  # noqa: E402
from pipeline.train.loop import _autocast, build_optimizer, run_training, torch_threads  # noqa: E402
from pipeline.train.modeling import context_length, create_model, model_config  # noqa: E402

ROWS_PER_SHARD = 1024


def photo_canvas(rng: np.random.Generator, side: int) -> np.ndarray:
    """A side x side photo-like canvas: smooth colour gradients, soft shapes, sensor noise.

    Not random noise (which JPEG cannot compress and which is slow to decode) nor flat drawings
    (which decode faster than photos): JPEG sizes and decode costs are those of photos.
    """
    from PIL import Image, ImageDraw, ImageFilter

    small = side // 4  # drawn at a quarter of the size and upscaled: smooth like optics
    y, x = np.mgrid[0:small, 0:small].astype(np.float32) / small
    base = np.empty((small, small, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 90 * np.sin((fx * x + fy * y) * 4 + phase * 3)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.integers(0, small, 2)
        x1, y1 = x0 + rng.integers(4, small // 3), y0 + rng.integers(4, small // 3)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1)).resize((side, side), Image.BICUBIC)
    noise = rng.normal(0, 4, (side, side, 1)).astype(np.int16)
    return (np.asarray(img, np.int16) + noise).clip(0, 255).astype(np.uint8)


def _demo_pair(i: int) -> tuple[bytes, str, int]:
    """Row i of the demo-like set: a drawn scene as a 64 px JPEG and its caption."""
    r = random.Random(f"bench/{i}")
    scene = sample_scene(r, r.choice(SHAPES), r.choice(list(COLOURS)), 64, 64)
    buf = io.BytesIO()
    render(scene).save(buf, "JPEG", quality=90)
    return buf.getvalue(), train_caption(r, scene), 64


@functools.cache
def _tokenizer(model: str):
    return load_tokenizer(model)


def _write_shard(job: tuple[Path, int, int, int, str, int | None]) -> None:
    """One Parquet shard: rows [start, stop) of the benchmark set."""
    directory, shard, start, stop, model, image_size = job
    if image_size is None:
        pairs = [_demo_pair(i) for i in range(start, stop)]
    else:
        from PIL import Image

        # Crops of a few canvases, so every image differs without drawing each from scratch.
        rng = np.random.default_rng([7, shard])
        canvases = [photo_canvas(rng, 4 * image_size) for _ in range(4)]
        pairs = []
        for i in range(start, stop):
            canvas = canvases[i % len(canvases)]
            top, left = rng.integers(0, canvas.shape[0] - image_size + 1, 2)
            buf = io.BytesIO()
            crop = canvas[top : top + image_size, left : left + image_size]
            Image.fromarray(crop).save(buf, "JPEG", quality=90)
            r = random.Random(f"bench/{i}")
            caption = (
                f"a photo of {r.choice(['two', 'three', 'a few', 'several'])} "
                f"{r.choice(list(COLOURS))} {r.choice(SHAPES)}s on a smooth background"
            )
            pairs.append((buf.getvalue(), caption, image_size))
    tokens = _tokenizer(model)([caption for _, caption, _ in pairs]).tolist()
    rows = [
        {
            "key": f"{i:08d}", "url": f"http://bench/{i}.jpg", "caption": caption, "jpg": jpg,
            "width": size, "height": size, "original_width": size, "original_height": size,
            "sha256": str(i), "tokens": tokens[i - start],
        }
        for i, (jpg, caption, size) in zip(range(start, stop), pairs, strict=True)
    ]  # fmt: skip
    path = Path(directory) / f"part-{shard:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SAMPLE), path)


def _quiet_worker() -> None:
    torch.set_num_threads(1)  # one process per core already


def write_shards(
    directory: Path,
    rows: int,
    model: str,
    rows_per_shard: int = ROWS_PER_SHARD,
    image_size: int | None = None,
    processes: int = 1,
) -> None:
    """Pairs with real tokens in Parquet shards of ``rows_per_shard`` rows.

    ``image_size`` None: demo-like pairs (drawn shapes, 64 px JPEGs); otherwise photo-like
    JPEGs of that many pixels a side. ``processes`` > 1 writes shards in parallel (fork).
    """
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [
        (directory, s, start, min(start + rows_per_shard, rows), model, image_size)
        for s, start in enumerate(range(0, rows, rows_per_shard))
    ]
    processes = min(processes, len(jobs))
    if processes <= 1:
        for job in jobs:
            _write_shard(job)
        return
    with mp.get_context("fork").Pool(processes, initializer=_quiet_worker) as pool:
        pool.map(_write_shard, jobs, chunksize=1)


class ShardDataset(torch.utils.data.Dataset):
    """What a user writes without Ray: the shards in memory, decoded per item."""

    def __init__(self, shards: Path, image_size: int):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        table = pa.concat_tables(pq.read_table(f, columns=["jpg", "tokens"]) for f in shards)
        self.jpgs = table.column("jpg").to_pylist()
        self.tokens = np.asarray(table.column("tokens").to_pylist(), dtype=np.int64)
        self.transform = image_transform_v2(PreprocessCfg(size=image_size), is_train=True)

    def __len__(self) -> int:
        return len(self.jpgs)

    def __getitem__(self, i: int):
        from PIL import Image

        image = self.transform(Image.open(io.BytesIO(self.jpgs[i])).convert("RGB"))
        return image, torch.from_numpy(self.tokens[i])


def plain_loop(
    cfg: TrainConfig, shards: Path, loader_workers: int, device: torch.device | None = None
) -> dict[str, float]:
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    # As many compute threads as our workers use together (each sets max(1, its CPUs)).
    torch.set_num_threads(cfg.num_workers * torch_threads(cfg.cpus_per_worker))
    image_size = model_config(cfg.model)["vision_cfg"]["image_size"]
    loader = torch.utils.data.DataLoader(
        ShardDataset(shard_files(shards), image_size),
        batch_size=cfg.global_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        prefetch_factor=4 if loader_workers else None,
        pin_memory=device.type == "cuda",
    )
    model = create_model(cfg.model, cfg.init_temperature).to(device)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss, 0, 1)
    autocast = _autocast(cfg.precision, device)  # off on the CPU unless precision is bf16
    step, seconds = 0, 0.0
    batches = iter(loader)
    next(batches)  # DataLoader workers started, as our workers' pipelines are before timing
    tick = time.perf_counter()
    while step < cfg.max_steps:
        try:
            images, texts = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        images = images.to(device, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        contrastive_step(model, loss_fn, images, texts, autocast=autocast)
        optimizer.step()
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tick
    result = {"samples_per_second": step * cfg.global_batch_size / seconds}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, optimizer, loader, batches
        torch.cuda.empty_cache()  # leave the GPU to our training worker, in another process
    return result


def synthetic_loop(cfg: TrainConfig, device: torch.device, warmup: int) -> dict[str, float]:
    """Our training step (pipeline/train/loop.py's loop body) on random tensors on the device.

    The same model, optimizer, lr schedule, loss, autocast, grad-norm and logit-scale clamp,
    and the same uint8 -> normalised float conversion on the device; no data loading, no
    host-to-device copy. ``warmup`` steps run first and are not timed (CUDA context, cuBLAS
    and autocast caches, the allocator growing), then ``cfg.max_steps`` timed steps.
    """
    from open_clip_train.scheduler import cosine_lr

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker))
    mcfg = model_config(cfg.model)
    image_size = mcfg["vision_cfg"]["image_size"]
    vocab = mcfg.get("text_cfg", {}).get("vocab_size", 49408)
    model = create_model(cfg.model, cfg.init_temperature).to(device)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss, 0, 1)
    autocast = _autocast(cfg.precision, device)
    total = warmup + cfg.max_steps
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, total)
    batch = cfg.global_batch_size
    shape = (batch, 3, image_size, image_size)
    images_u8 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    texts = torch.randint(1, vocab, (batch, context_length(cfg.model)), device=device)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    max_norm = cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else float("inf")
    tick = time.perf_counter()
    for step in range(total):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick = time.perf_counter()
        images = images_u8.float().div_(255).sub_(mean).div_(std)
        scheduler(step)
        optimizer.zero_grad(set_to_none=True)
        loss = contrastive_step(model, loss_fn, images, texts, cfg.accum_freq, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
        loss_value = loss.item()  # waits for the step, as our loop's .item() calls do
        timed = step + 1 - warmup
        if timed > 0 and timed % 50 == 0 and timed < cfg.max_steps:
            # A figure so far, in case the run is cut short.
            so_far = timed * batch / (time.perf_counter() - tick)
            print(f"synthetic: {timed} timed steps, {so_far:.1f} samples/s so far", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tick
    result = {
        "samples_per_second": cfg.max_steps * batch / seconds,
        "seconds_per_step": seconds / cfg.max_steps,
        "final_loss": loss_value,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _precision_label(precision: str, device: torch.device) -> str:
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return f"{'bf16 autocast' if bf16 else 'fp32'} (precision={precision})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--model", default="clip-demo-tiny")
    parser.add_argument(
        "--use-gpu",
        action="store_true",
        help="a GPU per Ray Train worker; the plain and synthetic loops on cuda:0",
    )
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp32"),
        help="TrainConfig.precision: auto is bf16 autocast on a GPU, fp32 on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="photo-like JPEGs of this many pixels a side (default: 64 px demo drawings)",
    )  # fmt: skip
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's num_cpus")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=None,
        help="CPUs per Ray Train worker (default: half the CPUs over the workers)",
    )  # fmt: skip
    parser.add_argument(
        "--data-cpus-per-task", type=float, default=TrainConfig.data_cpus_per_task,
        help="CPUs of each Ray Data decode task",
    )  # fmt: skip
    parser.add_argument(
        "--loader-workers", type=int, default=None,
        help="plain loop's DataLoader processes (default: the CPUs our workers leave free)",
    )  # fmt: skip
    parser.add_argument(
        "--synthetic", action="store_true",
        help="only the synthetic loop: our step on random tensors, no data loading",
    )  # fmt: skip
    parser.add_argument(
        "--synthetic-warmup", type=int, default=5, help="untimed synthetic steps before --steps"
    )
    parser.add_argument("--skip-plain", action="store_true", help="no plain DataLoader loop")
    parser.add_argument("--skip-ours", action="store_true", help="no Ray Train run")
    parser.add_argument("--log-to-driver", action="store_true", help="show Ray workers' logs")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--baseline", type=Path, default=None,
        help="a --synthetic run's --json: also print ours/synthetic and plain/synthetic",
    )  # fmt: skip
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = args.cpus
    if args.use_gpu and not torch.cuda.is_available():
        raise SystemExit("--use-gpu: torch sees no CUDA device")
    device = torch.device("cuda" if args.use_gpu else "cpu")
    cpus_per_worker = args.cpus_per_worker or cpus / (2 * args.workers)
    cfg = TrainConfig(
        model=args.model,
        num_workers=args.workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=cpus_per_worker,  # default: half the CPUs train, half decode
        global_batch_size=args.batch,
        max_steps=args.steps,
        warmup_steps=5,
        checkpoint_every_steps=args.steps,
        zeroshot_every_steps=0,
        precision=args.precision,
        data_cpus_per_task=args.data_cpus_per_task,
        # A benchmark should fail, not retry from a checkpoint on a GPU's short lease.
        max_failures=0 if args.use_gpu else TrainConfig.max_failures,
    )
    results: dict[str, object] = {
        "model": args.model, "global_batch": args.batch, "steps": args.steps,
        "precision": _precision_label(args.precision, device), "cpus": cpus,
    }  # fmt: skip

    def print_header() -> None:
        # The GPU's name only now: no CUDA context in this process before the shard writers fork.
        results["device"] = torch.cuda.get_device_name(0) if args.use_gpu else "cpu"
        print(f"model {args.model}, global batch {args.batch}, {args.steps} steps, {cpus} CPUs")
        print(f"precision {results['precision']}, device {results['device']}")

    if args.synthetic:
        synthetic = synthetic_loop(cfg, device, args.synthetic_warmup)
        results["synthetic"] = synthetic
        print_header()
        print(f"synthetic (no data loading) : {synthetic['samples_per_second']:8.1f} samples/s")
        print(
            f"  {synthetic['seconds_per_step']:.3f} s/step over {args.steps} timed steps after "
            f"{args.synthetic_warmup} untimed warm-up steps; "
            f"final loss {synthetic['final_loss']:.3f}"
        )
        if "peak_gpu_memory_gib" in synthetic:
            print(f"peak GPU memory (synthetic) : {synthetic['peak_gpu_memory_gib']:8.1f} GiB")
        _write_json(args.json, results)
        return

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        tick = time.perf_counter()
        # Many photo-like rows take a while on one core: one process a shard, in parallel.
        processes = cpus if args.rows >= 8 * ROWS_PER_SHARD else 1
        write_shards(shards, args.rows, args.model, image_size=args.image_size, processes=processes)
        shard_bytes = sum(f.stat().st_size for f in shard_files(shards))
        print(
            f"wrote {args.rows} rows ({args.image_size or 64} px JPEGs, "
            f"{shard_bytes / 2**20:.0f} MiB) in {time.perf_counter() - tick:.1f} s"
        )
        # The same split of the machine for the plain loop: as many compute threads as our
        # workers, the DataLoader's worker processes decode on the CPUs our workers leave free.
        loader_workers = args.loader_workers or max(1, int(cpus - args.workers * cpus_per_worker))
        plain = None
        if not args.skip_plain:
            plain = plain_loop(cfg, shards, loader_workers, device)
            results["plain"] = {**plain, "loader_workers": loader_workers}

        metrics = None
        if not args.skip_ours:
            import ray  # here: the synthetic and plain loops run without it

            ray.init(
                num_cpus=cpus,
                num_gpus=torch.cuda.device_count() if args.use_gpu else 0,
                include_dashboard=False,
                log_to_driver=args.log_to_driver,
            )
            tick = time.perf_counter()
            _, metrics = run_training(cfg, shards, args.rows, Path(tmp) / "run")
            wall = time.perf_counter() - tick
            ray.shutdown()
            results["ours"] = {
                "samples_per_second": metrics["samples_per_second"],
                "data_wait_fraction": metrics["data_wait_fraction"],
                "final_loss": metrics["loss"],
                "wall_seconds": wall,
                "cpus_per_worker": cpus_per_worker,
                "data_cpus_per_task": args.data_cpus_per_task,
            }

    baseline = None
    if args.baseline:
        baseline = json.loads(args.baseline.read_text())["synthetic"]["samples_per_second"]
    print_header()
    if plain is not None:
        print(f"plain torch DataLoader loop : {plain['samples_per_second']:8.1f} samples/s")
        print(f"  {loader_workers} DataLoader processes")
        if "peak_gpu_memory_gib" in plain:
            print(f"peak GPU memory (plain)     : {plain['peak_gpu_memory_gib']:8.1f} GiB")
    if metrics is not None:
        ours = metrics["samples_per_second"]
        print(f"Ray Train + Ray Data ingest : {ours:8.1f} samples/s ({args.workers} workers)")
        print(
            f"  {cpus_per_worker:g} CPUs a worker, Ray Data decode tasks of "
            f"{args.data_cpus_per_task:g} CPU; {wall:.0f} s wall with start-up and checkpoint"
        )
        if plain is not None:
            ratio = ours / plain["samples_per_second"]
            print(f"ratio ours/plain            : {ratio:8.2f}  (target >= 1.0)")
        print(f"data-wait fraction (ours)   : {metrics['data_wait_fraction']:8.1%}  (target <= 5%)")
        if baseline:
            print(f"synthetic (from --baseline) : {baseline:8.1f} samples/s")
            print(f"ratio ours/synthetic        : {ours / baseline:8.2f}")
    if plain is not None and baseline:
        print(f"ratio plain/synthetic       : {plain['samples_per_second'] / baseline:8.2f}")
    _write_json(args.json, results)


def _write_json(path: Path | None, results: dict[str, object]) -> None:
    if path:
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
