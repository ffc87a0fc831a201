"""Training throughput: our TorchTrainer with Ray Data ingest against a plain torch loop.

Both train the same model on the same Parquet shards, with the same global batch, the same
loss and optimizer and the same number of steps, on this machine's CPUs:

- ours: `pipeline.train.run_training` (Ray Train workers, each streaming its part of the data
  plan through Ray Data tasks that decode and augment the JPEGs beside the workers);
- plain: one process, a torch DataLoader whose worker processes decode the same shards with
  open_clip's train transform, and the same training step.

Prints samples/s of both (the training loop only: process and actor start-up excluded from
both), their ratio, and the fraction of our step time spent waiting for data.

    python benchmarks/bench_train.py                # 4,096 demo-like pairs, 40 steps of 256
    python benchmarks/bench_train.py --steps 20     # quicker
"""

from __future__ import annotations

import argparse
import io
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
from pipeline.contrastive import build_loss, contrastive_step  # noqa: E402
from pipeline.demo.captions import train_caption  # noqa: E402
from pipeline.demo.draw import COLOURS, SHAPES, render, sample_scene  # noqa: E402
from pipeline.ingest import shard_files  # noqa: E402
from pipeline.modeling import create_model, model_config  # noqa: E402
from pipeline.tokenize import load_tokenizer  # noqa: E402
from pipeline.train import build_optimizer, run_training  # noqa: E402


def write_shards(directory: Path, rows: int, model: str, rows_per_shard: int = 1024) -> None:
    """Demo-like pairs (drawn shapes, 64 px JPEGs, real tokens) in Parquet shards."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    batch = []
    for i in range(rows):
        r = random.Random(f"bench/{i}")
        scene = sample_scene(r, r.choice(SHAPES), r.choice(list(COLOURS)), 64, 64)
        buf = io.BytesIO()
        render(scene).save(buf, "JPEG", quality=90)
        caption = train_caption(r, scene)
        batch.append(
            {
                "key": f"{i:08d}", "url": f"http://bench/{i}.jpg", "caption": caption,
                "jpg": buf.getvalue(), "width": 64, "height": 64, "original_width": 64,
                "original_height": 64, "sha256": str(i), "tokens": tokenizer([caption])[0].tolist(),
            }
        )  # fmt: skip
        if len(batch) == rows_per_shard or i == rows - 1:
            path = directory / f"part-{i // rows_per_shard:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(batch, schema=schema.SAMPLE), path)
            batch = []


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


def plain_loop(cfg: TrainConfig, shards: Path, loader_workers: int) -> float:
    torch.manual_seed(cfg.seed)
    # As many compute threads as our workers use together (each sets max(1, its CPUs)).
    torch.set_num_threads(cfg.num_workers * max(1, int(cfg.cpus_per_worker)))
    image_size = model_config(cfg.model)["vision_cfg"]["image_size"]
    loader = torch.utils.data.DataLoader(
        ShardDataset(shard_files(shards), image_size),
        batch_size=cfg.global_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        prefetch_factor=4 if loader_workers else None,
    )
    model = create_model(cfg.model, cfg.init_temperature)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss(cfg.loss, 0, 1)
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
        optimizer.zero_grad(set_to_none=True)
        contrastive_step(model, loss_fn, images, texts)
        optimizer.step()
        step += 1
    seconds = time.perf_counter() - tick
    return step * cfg.global_batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--model", default="clip-demo-tiny")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.rows, args.model)
        cfg = TrainConfig(
            model=args.model,
            num_workers=args.workers,
            cpus_per_worker=cpus / (2 * args.workers),  # half the CPUs train, half decode
            global_batch_size=args.batch,
            max_steps=args.steps,
            warmup_steps=5,
            checkpoint_every_steps=args.steps,
            zeroshot_every_steps=0,
        )
        # The same split of the machine for the plain loop: half the CPUs compute, the
        # DataLoader's worker processes decode on the other half.
        plain = plain_loop(cfg, shards, loader_workers=max(1, cpus // 2))

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        _, metrics = run_training(cfg, shards, args.rows, Path(tmp) / "run")
        ray.shutdown()

    ours = metrics["samples_per_second"]
    print(f"model {args.model}, global batch {args.batch}, {args.steps} steps, {cpus} CPUs")
    print(f"plain torch DataLoader loop : {plain:8.1f} samples/s")
    print(f"Ray Train + Ray Data ingest : {ours:8.1f} samples/s ({args.workers} workers)")
    print(f"ratio ours/plain            : {ours / plain:8.2f}  (target >= 1.0)")
    print(f"data-wait fraction (ours)   : {metrics['data_wait_fraction']:8.1%}  (target <= 5%)")


if __name__ == "__main__":
    main()
