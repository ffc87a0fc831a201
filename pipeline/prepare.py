"""Prepare: URL list → download → filter → tokenize → Parquet shards, rejects and stats.

Download, filter and tokenize run as a streaming Ray Data pipeline. The driver
consumes its output in input order and is the one place every row passes, so
it owns the stateful checks (duplicate URLs before download, duplicate images
after) and writes the shards: first occurrence wins, deterministically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import PrepareConfig
from pipeline.filters import Deduplicator
from pipeline.rundir import RunDir, write_json_atomic

READERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".json": "json",
}
STAGES = ("input", "download", "filter", "tokenize")


def _list_inputs(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _, (root,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"URL list {path!r} does not exist")
    if fs.isdir(root):
        files = sorted(f for f in fs.find(root) if os.path.splitext(f)[1].lower() in READERS)
        if not files:
            raise ValueError(f"URL list folder {path!r} holds no {'/'.join(sorted(READERS))} files")
        return fs, files
    if os.path.splitext(root)[1].lower() not in READERS:
        raise ValueError(
            f"URL list {path!r}: unknown format; use one of {', '.join(sorted(READERS))}"
        )
    return fs, [root]


def _read_one(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> pa.Table:
    """One URL list file; `columns` are read as text, never guessed as numbers or dates."""
    kind = READERS[os.path.splitext(path)[1].lower()]
    try:
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                table = pq.read_table(f)
            elif kind == "json":
                table = pa_json.read_json(f)
            else:
                table = pa_csv.read_csv(
                    f,
                    parse_options=pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                    convert_options=pa_csv.ConvertOptions(
                        column_types={c: pa.string() for c in columns},
                        strings_can_be_null=True,  # an empty cell is a missing caption
                    ),
                )
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read URL list {path!r} as {kind}: {err}") from err
    for c in columns:
        if c in table.column_names and table[c].type != pa.string():
            table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
    return table


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> pd.DataFrame:
    """The URL list as a DataFrame with `url` and `caption`, in file then row order."""
    fs, files = _list_inputs(path)
    frames = []
    for file in files:
        table = _read_one(fs, file, [url_col, caption_col])
        missing = [c for c in (url_col, caption_col) if c not in table.column_names]
        if missing:
            raise ValueError(
                f"URL list {file!r} has no column {' or '.join(map(repr, missing))}; "
                f"columns found: {', '.join(table.column_names) or 'none'} "
                "(choose them with --url-col / --caption-col)"
            )
        frame = table.select([url_col, caption_col]).to_pandas()
        frame.columns = ["url", "caption"]
        frames.append(frame)
    urls = pd.concat(frames, ignore_index=True)
    if urls.empty:
        raise ValueError(f"URL list {path!r} is empty: no rows to download")
    for col in ("url", "caption"):  # strings or None, whatever the format's null marker
        urls[col] = [None if pd.isna(v) else v for v in urls[col]]
    return urls


class _ShardWriter:
    """Buffers rows and writes part-NNNNN.parquet files atomically (temp name, then rename)."""

    def __init__(self, directory: Path, table_schema: pa.Schema, rows_per_shard: int):
        self.directory = directory
        self.schema = table_schema
        self.rows_per_shard = rows_per_shard
        self.buffer: list[dict[str, Any]] = []
        self.files = 0
        self.rows = 0
        if directory.exists():
            # Outputs of an unfinished earlier attempt: this run rewrites them all.
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append({name: row.get(name) for name in self.schema.names})
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        final = self.directory / f"part-{self.files:05d}.parquet"
        tmp = self.directory / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.files += 1
        self.rows += len(self.buffer)
        self.buffer = []


class _Funnel:
    """Per stage: rows in, rows out, drops by reason and worker seconds."""

    def __init__(self):
        self.rows_in: Counter[str] = Counter()
        self.drops: dict[str, Counter[str]] = {s: Counter() for s in STAGES}
        self.seconds: Counter[str] = Counter()

    def reject(self, stage: str, reason: str) -> None:
        self.drops[stage][reason] += 1

    def report(self, total_rows: int, written: int, wall_seconds: float) -> dict[str, Any]:
        stages, alive = {}, total_rows
        for stage in STAGES:
            dropped = sum(self.drops[stage].values())
            stages[stage] = {
                "rows_in": alive,
                "rows_out": alive - dropped,
                "drops": dict(self.drops[stage].most_common()),
                "seconds": round(self.seconds[stage], 3),
            }
            alive -= dropped
        assert alive == written, f"funnel lost rows: {alive} alive, {written} written"
        return {
            "rows_in": total_rows,
            "samples": written,
            "rejects": total_rows - written,
            "stages": stages,
            "wall_seconds": round(wall_seconds, 3),
            "images_per_second": round(total_rows / max(wall_seconds, 1e-9), 1),
        }


def _split_input(urls: pd.DataFrame, funnel: _Funnel, rejects: _ShardWriter) -> pd.DataFrame:
    """Keys, then the checks that need no download: missing and duplicate URLs."""
    urls = urls.assign(key=[schema.url_key(u) if u else None for u in urls["url"]])
    seen_urls = Deduplicator("duplicate_url")
    alive = []
    for row in urls.to_dict("records"):
        if not row["url"]:
            keep, reason, detail = False, "missing_url", "empty URL"
        else:
            keep, reason, detail = seen_urls(row["url"])
        if keep:
            alive.append(row)
        else:
            funnel.reject("input", reason)
            rejects.add(
                {
                    **row,
                    "key": row["key"] or "",
                    "stage": "input",
                    "reason": reason,
                    "error": detail,
                }
            )
    frame = pd.DataFrame(alive, columns=["key", "url", "caption"])
    for col in ("stage", "reason", "error"):
        frame[col] = pd.Series([None] * len(frame), dtype=object)
    return frame


def run_prepare(urls: pd.DataFrame, run: RunDir, cfg: PrepareConfig) -> dict[str, Any]:
    """Download, filter and tokenize `urls` into RUN/data; returns the stats written."""
    import ray

    from pipeline.download import DownloadStage
    from pipeline.filters import filter_batch
    from pipeline.tokenize import TokenizeStage

    start = time.perf_counter()
    funnel = _Funnel()
    shards = _ShardWriter(run.shards, schema.SAMPLE, cfg.rows_per_shard)
    rejects = _ShardWriter(run.rejects, schema.REJECT, cfg.rows_per_shard)
    live = _split_input(urls, funnel, rejects)

    # Input order in, input order out: "first occurrence wins" must not depend on timing.
    ctx = ray.data.DataContext.get_current()
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    dl = cfg.download
    # One block per download batch, made here: a repartition would be an all-to-all step.
    chunks = [live.iloc[i : i + dl.batch_size] for i in range(0, len(live), dl.batch_size)]
    ds = (
        ray.data.from_pandas(chunks)
        .map_batches(
            DownloadStage,
            fn_constructor_args=(dataclasses.asdict(dl),),
            batch_format="pandas",
            batch_size=dl.batch_size,
            compute=ray.data.ActorPoolStrategy(size=dl.concurrency),
            # Downloading waits on the network most of the time: half a CPU per actor.
            num_cpus=0.5,
        )
        .map_batches(
            filter_batch,
            fn_kwargs={"config": dataclasses.asdict(cfg.filters)},
            batch_format="pandas",
            num_cpus=0.25,
        )
        .map_batches(
            TokenizeStage,
            fn_constructor_args=(dataclasses.asdict(cfg.tokenize),),
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.25,
        )
    )
    seen_images = Deduplicator("duplicate_image") if cfg.filters.dedup_images else None
    try:
        _write_outputs(ds, seen_images, funnel, shards, rejects)
    finally:
        ctx.execution_options.preserve_order = preserve_order
    stats = funnel.report(len(urls), shards.rows, time.perf_counter() - start)
    stats["shards"] = shards.files
    write_json_atomic(run.stats_path, stats)
    return stats


def _write_outputs(ds, seen_images, funnel: _Funnel, shards: _ShardWriter, rejects: _ShardWriter):
    """Consume the stream in input order: image dedup, then each row to shards or rejects."""
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        for stage in ("download", "filter", "tokenize"):
            funnel.seconds[stage] += float(batch[f"{stage}_seconds"].sum())
        for row in batch.to_dict("records"):
            if pd.isna(row["reason"]) and seen_images is not None:
                keep, reason, detail = seen_images(row["sha256"])
                if not keep:
                    row.update(stage="filter", reason=reason, error=detail)
            if pd.isna(row["reason"]):
                row["tokens"] = [int(t) for t in row["tokens"]]
                shards.add(row)
            else:
                funnel.reject(row["stage"], row["reason"])
                rejects.add({**row, "error": None if pd.isna(row["error"]) else row["error"]})
    shards.flush()
    rejects.flush()


def format_funnel(stats: dict[str, Any]) -> str:
    """The funnel as a small text table for the terminal."""
    lines = [f"{'stage':<10} {'in':>7} {'out':>7}  drops"]
    for stage, s in stats["stages"].items():
        drops = ", ".join(f"{r} {n}" for r, n in s["drops"].items()) or "-"
        lines.append(f"{stage:<10} {s['rows_in']:>7} {s['rows_out']:>7}  {drops}")
    lines.append(
        f"{stats['samples']} samples in {stats['shards']} shards, {stats['rejects']} rejects, "
        f"{stats['images_per_second']} rows/s"
    )
    return "\n".join(lines)
