"""Prepare: URL list → download → filter → tokenize → Parquet shards, rejects and stats.

The unit of work is an input shard (rows [N*k, (N+1)*k) of the list). One Ray task per shard
reads its rows itself, downloads, resizes, filters, tokenizes and writes its samples, rejects
and marker (pipeline.data.prepare.worker); a slow shard delays only itself. The driver plans
(file metadata and row counts), runs the distributed duplicate-URL check, schedules the tasks,
and reads back only their markers. Duplicate and near-duplicate images and decontamination
are a step of their own over hashes (pipeline.data.dedup): shards are staged with a hash file,
the step finds the rows to drop, and a task per shard finalizes it. First occurrence (lowest
input position) wins, deterministically, whatever the timing.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import schema, storage
from pipeline.config import PrepareConfig, config_hash
from pipeline.data.prepare.chunks import Layout, Progress, name
from pipeline.data.prepare.funnel import build_stats, plot_funnel
from pipeline.data.prepare.inputs import INPUT_REASON, UrlList, file_info, plan_url_list
from pipeline.data.prepare.worker import (
    ShardJob,
    Source,
    finalize_shard,
    needs_dedup,
    prepare_shard,
)
from pipeline.data.untrusted import printable
from pipeline.faults import commit_point

# Rows one duplicate-URL map task reads; and rows per hash partition of the check.
CHECK_ROWS = 200_000
PARTITION_ROWS = 500_000


class TooManyFailures(ValueError):
    """--max-failure-rate exceeded: the list is mostly dead, the run stops (an input error:
    one `error:` line, exit status 2)."""


def is_transient(reason: str | None) -> bool:
    """Failures that may pass on a later try: --retry-failed fetches these rows again."""
    if not reason:
        return False
    return reason in ("timeout", "connection_error", "http_429") or (
        reason.startswith("http_5") and reason[5:].isdigit()
    )


def fingerprint_of(urls: pd.DataFrame | UrlList, cfg: PrepareConfig) -> str:
    """The configuration and the list: an unfinished run resumes only on both. A planned
    list is known by its files' names, sizes and etags/mtimes; an in-memory one by content."""
    digest = hashlib.sha256(config_hash(cfg).encode())
    if isinstance(urls, UrlList):
        from pipeline.data.prepare.inputs import check_url_list

        digest.update(
            check_url_list(
                urls.path, urls.url_col, urls.caption_col, urls.additional_columns
            ).encode()
        )
    else:
        text = urls[["url", "caption"]].astype(str)
        digest.update(pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def _schemas(extra_types: dict[str, pa.DataType]) -> tuple[pa.Schema, pa.Schema]:
    extra = [pa.field(c, t) for c, t in extra_types.items()]
    return pa.schema([*schema.SAMPLE, *extra]), pa.schema([*schema.REJECT, *extra])


def _source(urls: pd.DataFrame | UrlList) -> Source:
    import ray

    if isinstance(urls, UrlList):
        return Source(urls=urls, rows=len(urls), extra_types=dict(urls.extra_types))
    frame = urls.reset_index(drop=True)
    return Source(
        frame_ref=ray.put(frame),
        rows=len(frame),
        extra_types=dict(urls.attrs.get("additional_types", {})),
    )


def plan(path: str, cfg: PrepareConfig) -> UrlList:
    """The URL list's files and row counts; text files are counted by Ray tasks, Parquet
    from its footers. The driver never holds the rows."""
    import ray

    count = ray.remote(num_cpus=0.25)(file_info)

    def map_files(fn, args_list):
        return ray.get([count.remote(*args) for args in args_list])

    return plan_url_list(
        path, cfg.url_col, cfg.caption_col, cfg.save_additional_columns, map_files=map_files
    )


def _url_partitions(source: Source, start: int, stop: int, parts: int) -> list[pd.DataFrame]:
    """Map side of the duplicate-URL check: (url, position) of rows [start, stop) that are
    checked (not flagged, not empty), split by a stable hash of the URL."""
    frame = source.read(start, stop)
    live = frame["url"].notna() & (frame["url"] != "")
    if INPUT_REASON in frame:
        live &= frame[INPUT_REASON].isna()
    sub = pd.DataFrame({"url": frame["url"][live].to_numpy(), "position": frame.index[live]})
    bucket = pd.util.hash_array(sub["url"].to_numpy(dtype=object)) % parts
    out = [sub[bucket == b].reset_index(drop=True) for b in range(parts)]
    return out if parts > 1 else out[0]


def _partition_duplicates(*parts: pd.DataFrame) -> np.ndarray:
    """Reduce side: positions whose URL an earlier position has (all of a URL's rows meet
    in one partition)."""
    frame = pd.concat(parts, ignore_index=True)
    if frame.empty:
        return np.empty(0, dtype=np.int64)
    first = frame.groupby("url", sort=False)["position"].transform("min")
    return np.sort(frame["position"][frame["position"] != first].to_numpy(dtype=np.int64))


def duplicate_urls(source: Source, rows_per_shard: int) -> np.ndarray:
    """Sorted positions of the rows whose URL an earlier row has, over the whole list: a
    hash-partitioned check in Ray tasks (the driver receives only the duplicates)."""
    import ray

    n = source.rows
    step = max(rows_per_shard, math.ceil(CHECK_ROWS / rows_per_shard) * rows_per_shard)
    parts = max(1, min(64, math.ceil(n / PARTITION_ROWS)))
    mapper = ray.remote(num_cpus=0.25, num_returns=parts)(_url_partitions)
    reducer = ray.remote(num_cpus=0.25)(_partition_duplicates)
    maps = [mapper.remote(source, a, min(a + step, n), parts) for a in range(0, n, step)]
    by_part = [[m[p] if parts > 1 else m for m in maps] for p in range(parts)]
    found = ray.get([reducer.remote(*refs) for refs in by_part])
    return np.sort(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def _failure_line(index: int, marker: dict, totals: list[int]) -> str:
    failed = sum(marker["drops"].get("download", {}).values())
    totals[0] += failed
    totals[1] += marker["rows"]
    return (
        f"[prepare] {name(index)}: {failed}/{marker['rows']} rows failed to download "
        f"({failed / max(marker['rows'], 1):.0%}); {totals[0]}/{totals[1]} so far "
        f"({totals[0] / max(totals[1], 1):.0%})"
    )


STALL_RETRIES = 2  # a shard stalled this many times more fails the run


def _run_tasks(calls: list, task_cpus: float, on_result, watchdog=None) -> None:
    """Keep at most `_window(task_cpus)` tasks in flight, handing each result over as it
    finishes. The window follows the cluster as the autoscaler adds or removes nodes.

    `watchdog` (ledger, seconds, log): a task whose shard shows no progress for that long is
    cancelled (its worker killed) and submitted again, so it may run elsewhere.
    """
    import ray

    pending: dict = {}
    submitters = dict(calls)
    stalls: dict = {}
    calls = list(reversed(calls))
    try:
        while calls or pending:
            window = _window(task_cpus) if calls else 0
            while calls and len(pending) < window:
                key, submit = calls.pop()
                pending[submit()] = key
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5 if watchdog else None)
            for ref in ready:
                on_result(pending.pop(ref), ray.get(ref))
            if watchdog is None or not pending:
                continue
            ledger, seconds, log = watchdog
            quiet = set(ray.get(ledger.quiet.remote(list(pending.values()), seconds)))
            for ref, key in list(pending.items()):
                if key not in quiet:
                    continue
                stalls[key] = stalls.get(key, 0) + 1
                if stalls[key] > STALL_RETRIES:
                    raise RuntimeError(
                        f"{name(key)} made no progress for {seconds:.0f} s, "
                        f"{stalls[key]} times: giving up"
                    )
                if log:
                    log(f"[prepare] {name(key)}: no progress for {seconds:.0f} s: run again")
                ray.cancel(ref, force=True)
                del pending[ref]
                ledger.forget.remote(key)  # the new attempt's clock starts when it runs
                pending[submitters[key]()] = key
    except BaseException:
        for ref in pending:  # the run stops: so do the tasks still running for it
            ray.cancel(ref, force=True)
        raise


def _window(num_cpus: float) -> int:
    """Twice what the cluster's CPUs run at once: the queued half is the demand that makes
    an autoscaler add nodes, and the next task is ready when one ends."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(2, int(2 * cpus / num_cpus))


def run_prepare(
    urls: pd.DataFrame | UrlList | str,
    run: Any,
    cfg: PrepareConfig,
    *,
    fingerprint: str | None = None,
    retry_failed: bool = False,
    fresh: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Download, filter and tokenize `urls` (a URL list's path, a planned list, or a small
    list in memory) into RUN/data; returns the stats written.

    Resumes what an interrupted run with the same fingerprint (default: config and list)
    left: finished shards are kept and skipped. `retry_failed` then fetches again the rows
    rejected for transient reasons. `fresh` discards earlier outputs first.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data.download import CrashLedger

    start = time.perf_counter()
    if isinstance(urls, str):
        urls = plan(urls, cfg)
    source = _source(urls)
    progress = Progress(run, fingerprint or fingerprint_of(urls, cfg), fresh=fresh)
    layout = Layout(progress.root, progress.shards, progress.rejects)
    sample_schema, reject_schema = _schemas(source.extra_types)
    k = cfg.rows_per_shard
    chunks = range(math.ceil(source.rows / k))
    done = progress.done()
    if set(done) - set(chunks):
        raise RuntimeError(f"{progress.dir} has markers of shards beyond this list's end")
    todo = [c for c in chunks if c not in done]
    dedup = needs_dedup(cfg)
    staged = progress.staged_done() if dedup else {}
    fetch = [c for c in todo if c not in staged]
    if log and len(fetch) < len(chunks):
        log(
            f"[prepare] resuming: {len(done)} of {len(chunks)} shards already finished, "
            f"{len(todo) - len(fetch)} more already fetched (waiting for the dedup step)"
        )
    # On the driver's node: it lives as long as the run, whichever worker node goes away.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(num_cpus=0)(CrashLedger).options(scheduling_strategy=here).remote()
    job = ShardJob(layout, cfg, sample_schema, reject_schema, ledger)
    try:
        if fetch:
            duplicates = duplicate_urls(source, k)
            _fetch(job, source, fetch, duplicates, log)
        if todo and dedup:
            _dedup(job, progress, len(chunks), todo, log)
        retried = _retry(job, source, progress, log) if retry_failed else 0
    finally:
        ray.kill(ledger)
    rows_run = min(len(todo) * k, source.rows) + retried
    markers = [m for _, m in sorted(progress.done().items())]
    stats = build_stats(markers, time.perf_counter() - start, rows_run)
    stats["retried"] = retried
    data = storage.parent(progress.dir)
    funnel_png = storage.join(data, "funnel.png")
    stats["paths"] = {
        "shards": str(run.shards),
        "rejects": str(run.rejects),
        "stats": str(run.stats_path),
        "funnel_png": funnel_png,
    }
    storage.write_json(run.stats_path, stats)
    commit_point("prepare.stats")
    try:
        plot_funnel(stats, funnel_png)
    except Exception as err:  # a chart is a view of stats.json: it never fails the stage
        if log:
            log(f"warning: funnel.png not drawn ({type(err).__name__}: {printable(err)})")
    commit_point("prepare.funnel")
    return stats


# A CPU per shard task, as img2dataset gives each process a core: its `thread_count` threads
# overlap the network waits, and each worker process pays its imports (the image libraries,
# the tokenizer: ~2 CPU-seconds) once for many shards. Half a CPU per task doubled the
# processes and the imports for no more fetching threads (bench_prepare.py, 2,000 images:
# 107 -> 151 images/s).
TASK_CPUS = 1.0


def _warm_imports() -> None:
    """Imports the steps after fetching need (Ray Data for the dedup step, matplotlib for
    funnel.png: ~1.5 s), run in a thread while the driver only waits on shard tasks."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import ray.data  # noqa: F401

    from pipeline.data import dedup  # noqa: F401


def _fetch(job: ShardJob, source: Source, chunks: list[int], duplicates: np.ndarray, log) -> None:
    """One task per shard in `chunks`, each given the duplicate positions in its range."""
    import ray

    task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(prepare_shard)
    threading.Thread(target=_warm_imports, daemon=True).start()
    k, n = job.cfg.rows_per_shard, source.rows
    limit = job.cfg.max_failure_rate
    totals = [0, 0]

    def call(c: int):
        lo, hi = c * k, min((c + 1) * k, n)
        dups = duplicates[np.searchsorted(duplicates, lo) : np.searchsorted(duplicates, hi)]
        return c, lambda: task.remote(job, source, c, lo, hi, dups)

    def finished(c: int, marker: dict) -> None:
        line = _failure_line(c, marker, totals)
        if log:
            log(line)
        if limit is not None and totals[0] > limit * totals[1] and totals[1] >= min(n, 100):
            raise TooManyFailures(
                f"{totals[0]} of the {totals[1]} rows fetched so far failed to download "
                f"({totals[0] / totals[1]:.0%} > --max-failure-rate {limit:.0%}): the URL list "
                "looks mostly dead; stopping (finished shards are kept, a rerun resumes)"
            )

    stall = job.cfg.stall_minutes
    watchdog = (job.ledger, stall * 60, log) if stall is not None else None
    _run_tasks([call(c) for c in chunks], TASK_CPUS, finished, watchdog)


def _eval_hashes(cfg: PrepareConfig) -> list[str]:
    from pipeline.data.filters import hash_image_folder

    return hash_image_folder(cfg.filters.decontaminate) if cfg.filters.decontaminate else []


def _dedup_call(job: ShardJob, hash_files: list[str], log) -> None:
    from pipeline.data import dedup
    from pipeline.data.prepare.chunks import forget_listings

    forget_listings(job.layout.root)  # the hash files were written by the shard tasks
    f = job.cfg.filters
    counts = dedup.find_drops(
        hash_files,
        job.layout.drops,
        dedup_images=f.dedup_images,
        near_duplicate_distance=f.near_duplicate_distance,
        eval_hashes=_eval_hashes(job.cfg),
        decontaminate_distance=f.decontaminate_distance,
        expected_rows=len(hash_files) * job.cfg.rows_per_shard,  # at most; sizes groups only
    )
    if log and counts:
        log(f"[prepare] dedup: {', '.join(f'{r} {n}' for r, n in sorted(counts.items()))}")


def _dedup(job: ShardJob, progress: Progress, n_chunks: int, todo: list[int], log) -> None:
    """The dedup step over every shard's hashes, then a finalizing task per unfinished shard."""
    import ray

    _dedup_call(job, [job.layout.file(job.layout.hashes, c) for c in range(n_chunks)], log)
    task = ray.remote(num_cpus=0.25, max_retries=3)(finalize_shard)
    calls = [(c, lambda c=c: task.remote(job, c)) for c in todo]
    _run_tasks(calls, 0.25, lambda c, marker: None)


def _retry(job: ShardJob, source: Source, progress: Progress, log) -> int:
    from pipeline.data.prepare.retry import retry_failed

    return retry_failed(job, source, progress, log)
