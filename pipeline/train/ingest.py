"""Streaming ingest for training: a deterministic plan of which rows each worker reads, when.

The plan is a pure function of (shards, seed, world size, batch size): every epoch permutes the
shards' chunks (row groups, or slices of them) and deals them out to the workers, and each
worker reads its chunks in groups whose rows are permuted again. Ray Data reads, decodes and
augments the groups as CPU tasks outside the training workers, in plan order. Because the plan
is fixed, a step number is a data position: a run restored at step s reads exactly the rows an
uninterrupted run would have read from step s on, with no epoch's rows repeated or skipped.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

CHUNK_ROWS = 256  # the unit dealt to workers: small enough to balance them within a few rows
GROUP_CHUNKS = 4  # chunks read and permuted together: a batch mixes rows of several shards
DECODE_ACTOR_MEMORY = 2**30


@dataclass(frozen=True)
class Chunk:
    path: str
    row_group: int
    start: int  # rows [start, stop) of the row group
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_files(shards: str) -> list[str]:
    # Hidden files are partial writes of the prepare stage, never finished shards (list_files
    # skips them); a local folder or a bucket's prefix alike.
    return storage.list_files(shards, ".parquet")


def list_chunks(shards: str, world: int, chunk_rows: int = CHUNK_ROWS) -> list[Chunk]:
    """Every row of the shards exactly once, in chunks of at most ``chunk_rows`` rows.

    Small datasets get smaller chunks (at least 16 a worker), so dealing whole chunks still
    gives every worker nearly the same number of rows.
    """
    files = [(p, storage.parquet_file(p).metadata) for p in shard_files(shards)]
    total = sum(meta.num_rows for _, meta in files)
    chunk_rows = max(1, min(chunk_rows, total // (16 * world)))
    chunks = []
    for path, meta in files:
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            for start in range(0, rows, chunk_rows):
                chunks.append(Chunk(path, g, start, min(start + chunk_rows, rows)))
    return chunks


@dataclass(frozen=True)
class EpochPlan:
    chunks_by_rank: list[list[Chunk]]  # what each rank reads this epoch, in order
    steps: int  # steps in this epoch: every rank has at least steps x batch rows


def plan_epoch(chunks: list[Chunk], epoch: int, seed: int, world: int, batch: int) -> EpochPlan:
    """Permute the chunks, lay their rows end to end, and cut the line into ``world`` equal
    parts (a chunk on a cut is split): ranks differ by at most one row."""
    order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    total = sum(c.rows for c in chunks)
    cuts = [total * r // world for r in range(world + 1)]
    by_rank: list[list[Chunk]] = [[] for _ in range(world)]
    row = 0  # position on the line of the current chunk's first row
    for i in order:
        c = chunks[i]
        for r in range(world):
            lo, hi = max(row, cuts[r]), min(row + c.rows, cuts[r + 1])
            if lo < hi:
                start = c.start + lo - row
                by_rank[r].append(Chunk(c.path, c.row_group, start, start + hi - lo))
        row += c.rows
    return EpochPlan(by_rank, (total // world) // batch)


def steps_per_epoch(chunks: list[Chunk], epochs: int, seed: int, world: int, batch: int):
    return [plan_epoch(chunks, e, seed, world, batch).steps for e in range(epochs)]


def rank_items(
    chunks: list[Chunk],
    seed: int,
    world: int,
    rank: int,
    batch: int,
    epochs: int,
    start_step: int = 0,
    group_chunks: int = GROUP_CHUNKS,
) -> list[dict[str, Any]]:
    """The groups rank ``rank`` reads from global step ``start_step`` to the end of training.

    Each item names its chunks and the slice [skip, take) of its permuted rows to keep: an
    epoch's last group is cut at steps x batch rows, so a batch never straddles two epochs, and
    a restored run's first group starts at the exact row where the interrupted run stopped.
    """
    items = []
    first_step = 0
    for epoch in range(epochs):
        plan = plan_epoch(chunks, epoch, seed, world, batch)
        epoch_rows = plan.steps * batch
        resume_row = max(0, (start_step - first_step) * batch)  # rows of this epoch already done
        first_step += plan.steps
        if resume_row >= epoch_rows:
            continue
        mine = plan.chunks_by_rank[rank]
        row = 0  # rows of this epoch before the current group
        for g in range(0, len(mine), group_chunks):
            group = mine[g : g + group_chunks]
            rows = sum(c.rows for c in group)
            take = min(rows, epoch_rows - row)
            skip = min(max(0, resume_row - row), take)
            if take > skip:
                items.append(
                    {
                        "epoch": epoch,
                        "group": g // group_chunks,
                        # Parallel lists rather than tuples: Ray Data stores items as Arrow.
                        "paths": [c.path for c in group],
                        "row_groups": [c.row_group for c in group],
                        "starts": [c.start for c in group],
                        "stops": [c.stop for c in group],
                        "skip": skip,
                        "take": take,
                        "seed": [seed, epoch, rank, g // group_chunks],
                    }
                )
            row += rows
            if row >= epoch_rows:
                break
    return items


def read_group(item: dict[str, Any], columns: list[str]) -> pa.Table:
    """The rows an item names, permuted and sliced exactly as the plan says."""
    parts = []
    files: dict[str, pq.ParquetFile] = {}
    chunks = zip(item["paths"], item["row_groups"], item["starts"], item["stops"], strict=True)
    for path, row_group, start, stop in chunks:
        f = files.setdefault(path, storage.parquet_file(path))
        parts.append(f.read_row_group(row_group, columns=columns).slice(start, stop - start))
    table = pa.concat_tables(parts)
    order = np.random.default_rng([int(s) for s in item["seed"]]).permutation(table.num_rows)
    return table.take(order[int(item["skip"]) : int(item["take"])])


@functools.lru_cache(maxsize=4)
def train_transform(image_size: int):
    """open_clip's train transform without ToTensor/Normalize: crops stay uint8 until the
    worker normalises them, so 4x fewer bytes travel through the object store."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Normalize, ToTensor

    full = image_transform_v2(PreprocessCfg(size=image_size), is_train=True)
    return [t for t in full.transforms if not isinstance(t, ToTensor | Normalize)]


def decode_group(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data stage: one plan item → uint8 CHW crops and int64 tokens, in plan order."""
    import torch
    from PIL import Image

    item = {k: list(v[0]) if isinstance(v[0], np.ndarray) else v[0] for k, v in batch.items()}
    table = read_group(item, ["jpg", "tokens"])
    steps = train_transform(image_size)
    images = []
    # torchvision draws its crops from torch's global generator: seeded from the plan item and
    # the row's place in the group's permutation, a rerun (the same trial in another sweep) sees
    # the same crops, and so does a run resumed mid-group, whose item starts at row `skip`.
    # Only the CPU generator is seeded: torch.manual_seed also walks every accelerator backend,
    # ~80 us a row (a quarter of the row's decode), against ~1 us here.
    item_seed, skip = [int(x) for x in item["seed"]], int(item["skip"])
    generator = torch.default_generator
    with torch.random.fork_rng(devices=[]):
        for i, jpg in enumerate(table.column("jpg").to_pylist()):
            row_seed = np.random.SeedSequence([*item_seed, skip + i]).generate_state(1)[0]
            generator.manual_seed(int(row_seed))
            image = Image.open(io.BytesIO(jpg))
            for step in steps:
                image = step(image)
            images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    tokens = np.asarray(table.column("tokens").to_pylist(), dtype=np.int64)
    return {"image": np.stack(images), "tokens": tokens}


class DecodeGroups:
    """decode_group in a long-lived Ray Data actor: torch, torchvision and open_clip are
    imported once. As tasks, each group often landed in a fresh worker process (Ray ends idle
    workers beyond one per CPU within a second, and the stream waits on training between
    groups), and those imports were ~80% of the decode CPU in a profile of the demo: CPU the
    training worker beside it could not use."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        train_transform(image_size)  # the imports, now

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_group(batch, self.image_size)


def rank_dataset(items: list[dict[str, Any]], image_size: int, cpus_per_task: float = 0.25):
    """A Ray Data stream of a rank's remaining plan: one block per group, in plan order.

    One decode actor per rank, of a fractional CPU: the training workers hold whole CPUs on
    small machines and an actor asking for a whole one would wait forever.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the plan's order is the data position
    ctx.enable_progress_bars = False  # one bar per worker would garble the training log
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        DecodeGroups,
        batch_size=1,
        fn_constructor_kwargs={"image_size": image_size},
        num_cpus=cpus_per_task,
        # What the actor holds resident (torch, torchvision and open_clip: 0.65-0.8 GB measured on
        # the demo), asked for so the scheduler counts it; unasked, Ray Data warns in the log.
        memory=DECODE_ACTOR_MEMORY,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
