"""--retry-failed: fetch again the rows of finished shards rejected for transient reasons.

A task per shard refetches its rows. Without a dedup step it rewrites the shard at once
(chunks.Layout.rewrite: a journal makes the pair of files change together). With one, the
recovered rows are staged as `retry-part-NNNNN` with a hash file whose positions come after
every first-pass row: the dedup step then keeps what was already kept (as the first pass kept
it first) and drops a recovered row that repeats it; a task per shard merges and rewrites.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline import storage
from pipeline.data.prepare.chunks import forget_listings, name
from pipeline.data.prepare.worker import (
    ShardJob,
    Source,
    hash_rows,
    needs_dedup,
    process,
    writer_info,
)


def _stem(index: int) -> str:
    return f"retry-{name(index)}"


def _read(path: str) -> list[dict]:
    return storage.read_parquet(path).to_pylist() if storage.exists(path) else []


def _positions(source: Source, index: int, k: int) -> dict[str, int]:
    """Each key's first input position within the shard's range."""
    frame = source.read(index * k, min((index + 1) * k, source.rows))
    from pipeline.schema import url_key

    found: dict[str, int] = {}
    for position, url in zip(frame.index, frame["url"], strict=True):
        if url:
            found.setdefault(url_key(url), int(position))
    return found


def _transient(r: dict) -> bool:
    from pipeline.data.prepare.run import is_transient

    return r["stage"] == "download" and is_transient(r["reason"])


def _merge(job: ShardJob, index: int, new_samples, new_rejects, seconds, positions) -> int:
    lay = job.layout
    old_samples = _read(lay.file(lay.shards, index))
    old_rejects = [r for r in _read(lay.file(lay.rejects, index)) if not _transient(r)]
    for r in old_samples:
        r["_position"] = positions[r["key"]]
    samples = sorted(old_samples + new_samples, key=lambda r: r["_position"])
    marker = storage.read_json(lay.marker(index))
    secs = {s: marker["seconds"].get(s, 0.0) + v for s, v in seconds.items()}
    info = {k: v for k, v in marker.items() if k in ("node_id", "hostname", "pid", "started")}
    lay.rewrite(
        index, samples, old_rejects + new_rejects, marker["rows"], secs,
        job.sample_schema, job.reject_schema, **info, finished=marker.get("finished"),
        retried=writer_info(0.0),
    )  # fmt: skip
    if needs_dedup(job.cfg):
        storage.write_parquet(hash_rows(samples), lay.file(lay.hashes, index))
    return len(new_samples)


def retry_shard(job: ShardJob, source: Source, index: int) -> int:
    """Ray task: refetch shard `index`'s transient failures; returns how many rows retried."""
    lay = job.layout
    forget_listings(lay.root)
    again = [r for r in _read(lay.file(lay.rejects, index)) if _transient(r)]
    if not again:
        return 0
    positions = _positions(source, index, job.cfg.rows_per_shard)
    frame = pd.DataFrame(again, index=[positions[r["key"]] for r in again])
    for c in ("stage", "reason", "error"):
        frame[c] = pd.Series([None] * len(frame), dtype=object, index=frame.index)
    samples, rejects, seconds = process(frame, job.cfg, job.ledger)
    if not needs_dedup(job.cfg):
        _merge(job, index, samples, rejects, seconds, positions)
        return len(again)
    stem = _stem(index)
    if samples:
        sch = job.sample_schema
        from pipeline.data.prepare.chunks import write_rows

        write_rows(storage.join(lay.staged, f"{stem}.parquet"), samples, sch)
    if rejects:
        from pipeline.data.prepare.chunks import write_rows

        write_rows(storage.join(lay.staged_rejects, f"{stem}.parquet"), rejects, job.reject_schema)
    # After every first-pass row: what the first pass kept stays kept.
    storage.write_parquet(
        hash_rows(samples, offset=source.rows), storage.join(lay.hashes, f"{stem}.parquet")
    )
    storage.write_json(storage.join(lay.staged, f"{stem}.json"), {"seconds": seconds})
    return len(again)


def merge_shard(job: ShardJob, source: Source, index: int) -> int:
    """Ray task after the dedup step: recovered rows minus their drops join the shard."""
    lay = job.layout
    forget_listings(lay.root)
    stem = _stem(index)
    staged = storage.join(lay.staged, f"{stem}.json")
    if not storage.exists(staged):
        return 0
    seconds = storage.read_json(staged)["seconds"]
    positions = _positions(source, index, job.cfg.rows_per_shard)
    drops = {r["key"]: r for r in _read(storage.join(lay.drops, f"{stem}.parquet"))}
    samples, rejects = [], _read(storage.join(lay.staged_rejects, f"{stem}.parquet"))
    for r in _read(storage.join(lay.staged, f"{stem}.parquet")):
        r["_position"] = positions[r["key"]]
        if r["key"] in drops:
            d = drops[r["key"]]
            rejects.append({**r, "stage": "filter", "reason": d["reason"], "error": d["error"]})
        else:
            samples.append(r)
    n = _merge(job, index, samples, rejects, seconds, positions)
    for folder in (lay.staged, lay.staged_rejects, lay.hashes, lay.drops):
        storage.remove(storage.join(folder, f"{stem}.parquet"))
    storage.remove(staged)
    return n


def retry_failed(job: ShardJob, source: Source, progress: Any, log: Any) -> int:
    import ray

    from pipeline.data.prepare.run import TASK_CPUS, _dedup_call, _run_tasks

    done = sorted(progress.done())
    task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(retry_shard)
    retried: dict[int, int] = {}
    calls = [(c, lambda c=c: task.remote(job, source, c)) for c in done]
    _run_tasks(calls, TASK_CPUS, lambda c, n: retried.__setitem__(c, n))
    if needs_dedup(job.cfg):
        lay = job.layout
        forget_listings(lay.root)
        again = [c for c in done if storage.exists(storage.join(lay.staged, f"{_stem(c)}.json"))]
        if again:
            _dedup_call(
                job,
                [lay.file(lay.hashes, c) for c in done]
                + [storage.join(lay.hashes, f"{_stem(c)}.parquet") for c in again],
                log,
            )
            merge = ray.remote(num_cpus=0.25, max_retries=3)(merge_shard)
            _run_tasks(
                [(c, lambda c=c: merge.remote(job, source, c)) for c in again],
                0.25,
                lambda c, n: None,
            )
    total = sum(retried.values())
    if log and total:
        log(f"[prepare] --retry-failed: {total} rows fetched again")
    return total
