"""Prepare: URL list → download → filter → tokenize → Parquet shards, rejects and stats.

Download, filter and tokenize run as a streaming Ray Data pipeline. The driver consumes
its output in input order and is the one place every row passes, so it owns the stateful
checks (duplicate URLs before download; decontamination, duplicate and near-duplicate
images after) and writes the shards: first occurrence wins, deterministically, and a
resumed run rebuilds the checks' state from the finished shards' markers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import PrepareConfig, config_hash
from pipeline.data.filters import Deduplicator, NearDuplicateIndex, hash_image_folder
from pipeline.data.prepare.chunks import Progress
from pipeline.data.prepare.funnel import build_stats, plot_funnel
from pipeline.data.prepare.inputs import INPUT_REASON
from pipeline.data.untrusted import printable
from pipeline.faults import commit_point
from pipeline.rundir import RunDir, write_json_atomic

_STATE = ("stage", "reason", "error")


def is_transient(reason: str | None) -> bool:
    """Failures that may pass on a later try: --retry-failed fetches these rows again."""
    if not reason:
        return False
    return reason in ("timeout", "connection_error", "http_429") or (
        reason.startswith("http_5") and reason[5:].isdigit()
    )


def fingerprint_of(urls: pd.DataFrame, cfg: PrepareConfig) -> str:
    """The configuration and the list's content: an unfinished run resumes only on both."""
    digest = hashlib.sha256(config_hash(cfg).encode())
    text = urls[["url", "caption"]].astype(str)
    digest.update(pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


class _ImageChecks:
    """Decontamination, exact and near duplicates: first kept occurrence wins."""

    def __init__(self, cfg: PrepareConfig, eval_hashes: list[str]):
        f = cfg.filters
        self.exact = Deduplicator("duplicate_image") if f.dedup_images else None
        self.near = (
            NearDuplicateIndex(f.near_duplicate_distance, "near_duplicate")
            if f.near_duplicate_distance is not None
            else None
        )
        self.contaminated = (
            NearDuplicateIndex(f.decontaminate_distance, "eval_near_duplicate", eval_hashes)
            if eval_hashes
            else None
        )

    @property
    def need_phash(self) -> bool:
        return self.near is not None or self.contaminated is not None

    def seed(self, hashes: list[list[str | None]]) -> None:
        for sha, phash in hashes:
            if self.exact is not None:
                self.exact.seen.add(sha)
            if self.near is not None and phash:
                self.near.add(phash)

    def __call__(self, row: dict[str, Any]) -> tuple[bool, str | None, str | None]:
        checks = []
        if self.contaminated is not None:
            checks.append(lambda: self.contaminated(row.get("phash"), add=False))
        if self.exact is not None:
            checks.append(lambda: self.exact(row["sha256"]))
        if self.near is not None:
            checks.append(lambda: self.near(row.get("phash")))
        for check in checks:
            keep, reason, detail = check()
            if not keep:
                return keep, reason, detail
        return True, None, None


def _schemas(urls: pd.DataFrame) -> tuple[pa.Schema, pa.Schema]:
    extra = [pa.field(c, t) for c, t in urls.attrs.get("additional_types", {}).items()]
    return pa.schema([*schema.SAMPLE, *extra]), pa.schema([*schema.REJECT, *extra])


def _input_checks(urls: pd.DataFrame, rows_per_shard: int) -> pd.DataFrame:
    """Keys, shard numbers, and the checks that need no download: missing, unreadable and
    duplicate URLs, over the whole list (an earlier duplicate may sit in a finished shard)."""
    frame = urls.reset_index(drop=True).copy()
    frame["key"] = [schema.url_key(u) if u else "" for u in frame["url"]]
    frame["_chunk"] = frame.index // rows_per_shard
    seen = Deduplicator("duplicate_url")
    state: dict[str, list] = {c: [None] * len(frame) for c in _STATE}
    given = frame[INPUT_REASON] if INPUT_REASON in frame else [None] * len(frame)
    for i, (url, flagged) in enumerate(zip(frame["url"], given, strict=True)):
        if flagged:
            keep, reason, detail = False, *flagged
        elif not url:
            keep, reason, detail = False, "missing_url", "empty URL"
        else:
            keep, reason, detail = seen(url)
        if not keep:
            state["stage"][i], state["reason"][i], state["error"][i] = "input", reason, detail
    for c, values in state.items():
        frame[c] = pd.Series(values, dtype=object)
    return frame.drop(columns=[INPUT_REASON], errors="ignore")


def _stream(frame: pd.DataFrame, cfg: PrepareConfig, need_phash: bool):
    """The Ray Data pipeline over `frame`'s rows, yielding pandas batches in input order."""
    import ray

    from pipeline.data.download import CrashLedger, DownloadStage
    from pipeline.data.filters import filter_batch
    from pipeline.data.tokenize import TokenizeStage

    # Input order in, input order out: "first occurrence wins" must not depend on timing.
    # Set before the dataset is built: a dataset keeps the context it was made under.
    ctx = ray.data.DataContext.get_current()
    preserve_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    ledger = ray.remote(num_cpus=0)(CrashLedger).remote()
    try:
        dl = cfg.download
        # One block per download batch, made here: a repartition would be an all-to-all step.
        blocks = [frame.iloc[i : i + dl.batch_size] for i in range(0, len(frame), dl.batch_size)]
        ds = (
            ray.data.from_pandas(blocks)
            .map_batches(
                DownloadStage,
                fn_constructor_args=(dataclasses.asdict(dl), need_phash, ledger),
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
        yield from ds.iter_batches(batch_format="pandas", batch_size=None)
    finally:
        ctx.execution_options.preserve_order = preserve_order
        ray.kill(ledger)


def _rows(frame: pd.DataFrame, cfg: PrepareConfig, checks: _ImageChecks):
    """Each row of `frame` after the pipeline and the image checks, with its worker seconds."""
    for batch in _stream(frame, cfg, checks.need_phash):
        for row in batch.to_dict("records"):
            seconds = {s: row.pop(f"{s}_seconds", 0.0) for s in ("download", "filter", "tokenize")}
            if pd.isna(row["reason"]):
                keep, reason, detail = checks(row)
                if not keep:
                    row.update(stage="filter", reason=reason, error=detail)
            if pd.isna(row["reason"]):
                row["tokens"] = [int(t) for t in row["tokens"]]
            else:
                row["error"] = None if pd.isna(row["error"]) else row["error"]
            yield row, seconds


def _first_pass(frame, todo, cfg, checks, progress, schemas) -> None:
    """Every row of the shards in `todo`, each shard committed as soon as its last row is in."""
    sizes = frame["_chunk"].value_counts().to_dict()
    buffers: dict[int, tuple[list, list, dict]] = {}
    for row, seconds in _rows(frame[frame["_chunk"].isin(todo)], cfg, checks):
        c = row["_chunk"]
        samples, rejects, secs = buffers.setdefault(c, ([], [], {}))
        (samples if pd.isna(row["reason"]) else rejects).append(row)
        for s, v in seconds.items():
            secs[s] = secs.get(s, 0.0) + v
        if len(samples) + len(rejects) == sizes[c]:
            progress.commit(c, samples, rejects, sizes[c], secs, *schemas)
            del buffers[c]
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} did not receive all their rows")


def _retry(frame, done, cfg, checks, progress, schemas) -> int:
    """Fetch again the rows rejected for transient reasons; the recovered move to shards."""
    position = {k: i for i, k in reversed(list(enumerate(frame["key"])))}  # first occurrence
    old: dict[int, tuple[list, list]] = {}
    again = []
    for c in sorted(done):
        files = [
            progress.shards / f"part-{c:05d}.parquet",
            progress.rejects / f"part-{c:05d}.parquet",
        ]
        samples, rejects = (pq.read_table(f).to_pylist() if f.exists() else [] for f in files)
        retry = [r for r in rejects if r["stage"] == "download" and is_transient(r["reason"])]
        if retry:
            old[c] = (
                samples,
                [
                    r
                    for r in rejects
                    if not (r["stage"] == "download" and is_transient(r["reason"]))
                ],
            )
            again.extend(
                {**r, "_chunk": c, "stage": None, "reason": None, "error": None} for r in retry
            )
    if not again:
        return 0
    retry_frame = pd.DataFrame(again)
    for c in _STATE:
        retry_frame[c] = pd.Series([None] * len(retry_frame), dtype=object)
    new: dict[int, tuple[list, list, dict]] = {c: ([], [], {}) for c in old}
    for row, seconds in _rows(retry_frame, cfg, checks):
        samples, rejects, secs = new[row["_chunk"]]
        (samples if pd.isna(row["reason"]) else rejects).append(row)
        for s, v in seconds.items():
            secs[s] = secs.get(s, 0.0) + v
    for c in sorted(old):
        samples = sorted(old[c][0] + new[c][0], key=lambda r: position[r["key"]])
        rejects = old[c][1] + new[c][1]
        seconds = {s: done[c]["seconds"].get(s, 0.0) + v for s, v in new[c][2].items()}
        progress.rewrite(c, samples, rejects, done[c]["rows"], seconds, *schemas)
    return len(again)


def run_prepare(
    urls: pd.DataFrame,
    run: RunDir,
    cfg: PrepareConfig,
    *,
    fingerprint: str | None = None,
    retry_failed: bool = False,
    fresh: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Download, filter and tokenize `urls` into RUN/data; returns the stats written.

    Resumes what an interrupted run with the same fingerprint (default: config and list
    content) left: finished shards are kept and skipped. `retry_failed` then fetches again
    the rows rejected for transient reasons. `fresh` discards earlier outputs first.
    """
    start = time.perf_counter()
    frame = _input_checks(urls, cfg.rows_per_shard)
    progress = Progress(run, fingerprint or fingerprint_of(urls, cfg), fresh=fresh)
    eval_hashes = hash_image_folder(cfg.filters.decontaminate) if cfg.filters.decontaminate else []
    checks = _ImageChecks(cfg, eval_hashes)
    schemas = _schemas(urls)
    done = progress.done()
    chunks = sorted(frame["_chunk"].unique())
    if set(done) - set(chunks):
        raise RuntimeError(f"{progress.dir} has markers of shards beyond this list's end")
    for c in sorted(done):
        checks.seed(done[c]["hashes"])
    todo = [c for c in chunks if c not in done]
    if log and done:
        log(f"[prepare] resuming: {len(done)} of {len(chunks)} shards already finished")
    rows_run = int(frame["_chunk"].isin(todo).sum())
    if todo:
        _first_pass(frame, todo, cfg, checks, progress, schemas)
    retried = 0
    if retry_failed:
        retried = _retry(frame, progress.done(), cfg, checks, progress, schemas)
        rows_run += retried
    markers = [m for _, m in sorted(progress.done().items())]
    stats = build_stats(markers, time.perf_counter() - start, rows_run)
    stats["retried"] = retried
    funnel_png = Path(run.stats_path).parent / "funnel.png"
    stats["paths"] = {
        "shards": str(run.shards),
        "rejects": str(run.rejects),
        "stats": str(run.stats_path),
        "funnel_png": str(funnel_png),
    }
    write_json_atomic(run.stats_path, stats)
    commit_point("prepare.stats")
    try:
        plot_funnel(stats, funnel_png)
    except Exception as err:  # a chart is a view of stats.json: it never fails the stage
        if log:
            log(f"warning: funnel.png not drawn ({type(err).__name__}: {printable(err)})")
    commit_point("prepare.funnel")
    return stats
