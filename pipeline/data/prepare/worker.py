"""What one Ray task does with one input shard: read its rows, check, download, filter,
tokenize and write them (pipeline.data.prepare.chunks), reporting only a small marker.

Every step runs in the worker: the driver never sees a row, an image or a token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import schema, storage
from pipeline.config import PrepareConfig
from pipeline.data.prepare.chunks import Layout, counts, forget_listings, name, write_rows
from pipeline.data.prepare.inputs import INPUT_REASON, UrlList, read_rows

_STATE = ("stage", "reason", "error")
_STAGE_SECONDS = ("download", "filter", "tokenize")
# The hash files beside the shards, read by pipeline.data.dedup (its contract).
HASH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("position", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
    ]
)


def needs_dedup(cfg: PrepareConfig) -> bool:
    f = cfg.filters
    return bool(f.dedup_images or f.near_duplicate_distance is not None or f.decontaminate)


def need_phash(cfg: PrepareConfig) -> bool:
    f = cfg.filters
    return f.near_duplicate_distance is not None or bool(f.decontaminate)


@dataclass(frozen=True)
class Source:
    """Where shard tasks read their rows: a planned URL list (each task reads its own slice
    from storage) or, for in-memory lists, one DataFrame in Ray's object store."""

    urls: UrlList | None = None
    frame_ref: Any = None  # ray.ObjectRef of a DataFrame indexed 0..n-1
    rows: int = 0
    extra_types: dict[str, pa.DataType] = dataclasses.field(default_factory=dict)

    def read(self, start: int, stop: int) -> pd.DataFrame:
        if self.urls is not None:
            return read_rows(self.urls, start, stop)
        import ray

        frame = ray.get(self.frame_ref).iloc[start:stop]
        frame.attrs["additional_types"] = dict(self.extra_types)
        return frame


@dataclass(frozen=True)
class ShardJob:
    """What every shard task of one run shares (small: pickled with each task)."""

    layout: Layout
    cfg: PrepareConfig
    sample_schema: pa.Schema
    reject_schema: pa.Schema
    ledger: Any = None  # a CrashLedger actor

    @property
    def staged(self) -> bool:
        """Shards wait in data/staged for the dedup step, or are final at once."""
        return needs_dedup(self.cfg)


def writer_info(started: float) -> dict[str, Any]:
    """Who wrote a shard, for its marker: the Ray node, host and process, and when."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started": round(started, 3),
        "finished": round(time.time(), 3),
    }


def input_state(frame: pd.DataFrame, duplicates: np.ndarray) -> pd.DataFrame:
    """Keys and the checks that need no download: missing, unreadable and duplicate URLs
    (`duplicates`: the positions whose URL an earlier row of the whole list has)."""
    frame = frame.copy()
    frame["key"] = [schema.url_key(u) if u else "" for u in frame["url"]]
    dup = set(duplicates.tolist())
    given = frame[INPUT_REASON] if INPUT_REASON in frame else [None] * len(frame)
    state: dict[str, list] = {c: [None] * len(frame) for c in _STATE}
    rows = zip(frame.index, frame["url"], given, strict=True)
    for i, (position, url, flagged) in enumerate(rows):
        if flagged:
            reason, detail = flagged
        elif not url:
            reason, detail = "missing_url", "empty URL"
        elif position in dup:
            reason, detail = "duplicate_url", f"same as an earlier row ({str(url)[:80]})"
        else:
            continue
        state["stage"][i], state["reason"][i], state["error"][i] = "input", reason, detail
    for c, values in state.items():
        frame[c] = pd.Series(values, dtype=object, index=frame.index)
    return frame.drop(columns=[INPUT_REASON], errors="ignore")


@functools.lru_cache(maxsize=4)
def _download_stage(config: str, phash: bool):
    from pipeline.data.download import DownloadStage

    return DownloadStage(json.loads(config), phash)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from pipeline.data.tokenize import load_tokenizer

    return load_tokenizer(model)


def process(frame: pd.DataFrame, cfg: PrepareConfig, ledger: Any = None, beat=None):
    """Download, filter and tokenize `frame`'s live rows, a download batch at a time:
    (samples, rejects, seconds per stage), rows as dicts in input order."""
    from pipeline.data.filters import filter_batch
    from pipeline.data.tokenize import tokens_of_alive

    download = _download_stage(
        json.dumps(dataclasses.asdict(cfg.download), sort_keys=True), need_phash(cfg)
    )
    download.ledger = ledger
    filters = dataclasses.asdict(cfg.filters)
    samples, rejects = [], []
    seconds = dict.fromkeys(_STAGE_SECONDS, 0.0)
    size = cfg.download.batch_size
    for at in range(0, len(frame), size):
        batch = filter_batch(download(frame.iloc[at : at + size]), filters)
        if beat is not None:
            beat()  # progress, for the stall watchdog
        start = time.perf_counter()
        batch["tokens"] = tokens_of_alive(batch, _tokenizer(cfg.tokenize.model))
        seconds["tokenize"] += time.perf_counter() - start
        for stage in ("download", "filter"):
            seconds[stage] += float(batch[f"{stage}_seconds"].sum())
        batch = batch.drop(columns=["download_seconds", "filter_seconds"])
        for position, row in zip(batch.index, batch.to_dict("records"), strict=True):
            row["_position"] = int(position)
            if pd.isna(row["reason"]):
                samples.append(row)
            else:
                row["error"] = None if pd.isna(row["error"]) else row["error"]
                rejects.append(row)
    return samples, rejects, seconds


def hash_rows(samples: list[dict], offset: int = 0) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "key": s["key"],
                "position": s["_position"] + offset,
                "sha256": s["sha256"],
                "phash": s.get("phash"),
            }
            for s in samples
        ],
        schema=HASH_SCHEMA,
    )


def prepare_shard(
    job: ShardJob, source: Source, index: int, start: int, stop: int, duplicates: np.ndarray
) -> dict[str, Any]:
    """Ray task body: input shard `index` (rows [start, stop)) read, processed and written.

    Returns its marker. With a dedup step to come, the shard is staged with its hash file
    and the staged marker; otherwise it is final at once.
    """
    began = time.time()
    forget_listings(job.layout.root)  # a reused worker process: no stale listing
    frame = input_state(source.read(start, stop), duplicates)
    beat = (lambda: job.ledger.beat.remote(index)) if job.ledger is not None else None
    if beat is not None:
        beat()  # started: from now on the stall watchdog expects progress
    samples, rejects, seconds = process(frame, job.cfg, job.ledger, beat)
    rows = stop - start
    lay = job.layout
    if not job.staged:
        return lay.commit(
            index, samples, rejects, rows, seconds, job.sample_schema, job.reject_schema,
            **writer_info(began),
        )  # fmt: skip
    marker = {**counts(samples, rejects, rows, seconds), **writer_info(began)}
    if samples:
        write_rows(lay.file(lay.staged, index), samples, job.sample_schema)
    if rejects:
        write_rows(lay.file(lay.staged_rejects, index), rejects, job.reject_schema)
    storage.write_parquet(hash_rows(samples), lay.file(lay.hashes, index))
    storage.write_json(lay.staged_marker(index), marker)
    return marker


def finalize_shard(job: ShardJob, index: int) -> dict[str, Any]:
    """Ray task body after the dedup step: staged shard `index` minus its dropped rows
    becomes final (pipeline.data.dedup.finalize_shard), then its marker is written."""
    from pipeline.data import dedup
    from pipeline.faults import commit_point

    began = time.time()
    lay = job.layout
    forget_listings(lay.root)  # the staged files were written by other processes
    marker = storage.read_json(lay.staged_marker(index))
    staged = lay.file(lay.staged, index)
    shard_out, rejects_out = lay.file(lay.shards, index), lay.file(lay.rejects, index)
    drops_file = storage.join(lay.drops, f"{name(index)}.parquet")
    drops = (
        storage.read_parquet(drops_file, columns=["reason"])["reason"].to_pylist()
        if storage.exists(drops_file)
        else []
    )
    # The final rejects are the staged ones, then the dedup drops (appended by
    # dedup.finalize_shard, which reads the staged rejects as the existing ones).
    staged_rejects = lay.file(lay.staged_rejects, index)
    if drops:
        dedup.finalize_shard(staged, drops_file, shard_out, rejects_out, staged_rejects)
        if len(drops) == marker["samples"]:  # no rows left: no shard file, as for any shard
            storage.remove(shard_out)
    else:
        if storage.exists(staged_rejects):
            storage.write_bytes(rejects_out, storage.read_bytes(staged_rejects))
        else:
            storage.remove(rejects_out)
        if marker["samples"]:
            storage.write_bytes(shard_out, storage.read_bytes(staged))
    commit_point("prepare.shard")
    filtered = marker["drops"].setdefault("filter", {})
    for reason in drops:
        filtered[reason] = filtered.get(reason, 0) + 1
    if not filtered:
        del marker["drops"]["filter"]
    marker["samples"] -= len(drops)
    marker["rejects"] += len(drops)
    marker["finalized"] = writer_info(began)
    storage.write_json(lay.marker(index), marker)
    commit_point("prepare.marker")
    return marker
