"""Dedup and decontamination as their own distributed step, over hashes only.

Prepare's workers write each shard's samples to a staging place and, beside them, one small
hash file per shard (`RUN/data/hashes/<shard>.parquet`: key, position, sha256, phash). This
module reads only those hash files, never an image byte:

1. `find_drops` decides, with Ray Data, which rows go and why, and writes one drops file per
   shard (key, position, reason, error) and then a marker `_SUCCESS.json`.
2. `finalize_shard`, run by a worker per shard, moves the dropped rows from the staged shard
   into the shard's rejects.

Semantics. Every row has a unique `position` (its index in the input list); "earlier" means
a smaller position, so the result depends on the rows only, never on timing or on the order
in which shards are listed. The three checks run in today's order (the driver's checks in
`pipeline/data/prepare/run.py`), each on the rows the previous ones kept:

- `eval_near_duplicate`: the row's pHash is within `decontaminate_distance` bits of a hash of
  the eval set. The error names the nearest eval hash.
- `duplicate_image`: another row that passed decontamination has the same sha256 and an
  earlier position. The error names the earliest row of that sha256 ("same image as KEY").
  That row may itself be dropped as a near-duplicate below, as it is today.
- `near_duplicate`: the row's pHash is within `near_duplicate_distance` bits of the pHash of
  any earlier *candidate*, a row that passed the two checks above (rows without a pHash are
  never near-duplicates). The error names the earliest such candidate ("phash H is N bits
  from KEY").

How this differs from the sequential rule it replaces ("dropped if within the distance of an
earlier KEPT row"): on a chain a~b~c (a within the distance of b, b of c, but a not of c),
the sequential rule keeps a, drops b and keeps c again, because b was dropped; here c is
dropped too (it is near b, an earlier candidate), with the error naming b. So this rule
drops a superset of what the sequential one drops, the extra rows being the tails of chains
whose links are each within the distance; both keep the first row of every group. The
distributed rule needs no pass in input order: whether a row goes depends only on the rows
before it, not on what became of them.

Near-duplicates are found by multi-index hashing: the 64 bits are split into distance+1
bands, so two hashes at most `distance` bits apart agree exactly on at least one band
(pigeonhole); rows are grouped by (band, band value) with a Ray Data groupby, each group's
pairs are verified by Hamming distance, and a second groupby (on the row) keeps each row's
earliest verified candidate. Exact duplicates are a Ray Data groupby on sha256. Each groupby
is on a bucket of its key (key mod a bucket count sized for ~GROUP_ROWS rows a group), and
the group function splits its bucket by the key itself, vectorized: Ray calls a group
function once per key, ~1 ms each, which made one group per sha256 the slowest part of the
step. Decontamination is a
map over the rows, each task holding the eval set's banded index.

Resume: the drops files are written whole, one per shard (an empty one for a shard without
drops), and the marker last. A rerun that finds a marker written with the same parameters
returns its counts and computes nothing; without one it recomputes everything (the output is
deterministic, so an interrupted run's files are simply overwritten). `finalize_shard` is
idempotent, so an interrupted finalize step reruns any shard.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema, storage

REASONS = ("eval_near_duplicate", "duplicate_image", "near_duplicate")
MARKER = "_SUCCESS.json"
MAX_DISTANCE = 15  # NearDuplicateIndex's bound: a wider one would match unrelated images
GROUP_ROWS = 50_000  # rows per groupby group (keys are bucketed; see _sha_buckets)

HASHES = schema.HASHES  # the input: key, position, sha256, phash
DROPS = schema.DROPS  # the output per shard: key, position, reason, error

# The rows while they move between the steps: a hash row, its shard and its verdict so far.
_ROWS = pa.schema(
    [("shard", pa.string()), *HASHES, ("reason", pa.string()), ("error", pa.string())]
)

# A drop on its way to its shard's file.
_DROP_ROWS = pa.schema([("shard", pa.string()), *DROPS])

# A candidate row once per band: (band, value) is the group key.
_BANDS = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("position", pa.int64()),
        ("phash", pa.string()),
        ("band", pa.int64()),
        ("value", pa.int64()),
        ("bucket", pa.int64()),
    ]
)

# A near-duplicate candidate pair, one row per (band, band value) group that found it.
_PAIRS = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("position", pa.int64()),
        ("phash", pa.string()),
        ("winner_key", pa.string()),
        ("winner_position", pa.int64()),
        ("distance", pa.int64()),
    ]
)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """[lo, hi) bit ranges of the max_distance+1 bands (the last takes the remainder)."""
    count = max_distance + 1
    width = 64 // count
    return [(i * width, 64 if i == count - 1 else (i + 1) * width) for i in range(count)]


def _check_distance(name: str, value: int) -> None:
    if not 0 <= value <= MAX_DISTANCE:
        raise ValueError(f"{name} {value} is not within 0..{MAX_DISTANCE}")


def _phash_ints(phashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in phashes], dtype=np.uint64)


# --- the Ray Data steps: each takes and returns a pyarrow.Table --------------------------------


def _read_hashes(batch: pa.Table) -> pa.Table:
    """One hash file per input row -> its rows, tagged with the shard they belong to."""
    tables = []
    for path, shard in zip(batch["path"].to_pylist(), batch["shard"].to_pylist(), strict=True):
        table = storage.read_parquet(path).select(HASHES.names).cast(HASHES)
        n = table.num_rows
        tables.append(
            pa.table(
                {
                    "shard": pa.array([shard] * n, pa.string()),
                    **{c: table[c] for c in HASHES.names},
                    "reason": pa.nulls(n, pa.string()),
                    "error": pa.nulls(n, pa.string()),
                },
                schema=_ROWS,
            )
        )
    return pa.concat_tables(tables) if tables else _ROWS.empty_table()


_EVAL_INDEX: dict[tuple[int, str], Any] = {}  # per worker process: built once per eval set


def _decontaminate(batch: pa.Table, eval_hashes: list[str], distance: int, digest: str):
    from pipeline.data.filters import NearDuplicateIndex

    index = _EVAL_INDEX.get((distance, digest))
    if index is None:
        _EVAL_INDEX.clear()
        index = NearDuplicateIndex(distance, "eval_near_duplicate", eval_hashes)
        _EVAL_INDEX[(distance, digest)] = index
    reasons, errors = batch["reason"].to_pylist(), batch["error"].to_pylist()
    for i, phash in enumerate(batch["phash"].to_pylist()):
        if reasons[i] is None:
            keep, reason, detail = index(phash, add=False)
            if not keep:
                reasons[i], errors[i] = reason, detail
    return _with_verdicts(batch, reasons, errors)


def _with_verdicts(batch: pa.Table, reasons: list, errors: list) -> pa.Table:
    batch = batch.set_column(
        _ROWS.get_field_index("reason"), "reason", pa.array(reasons, pa.string())
    )
    return batch.set_column(_ROWS.get_field_index("error"), "error", pa.array(errors, pa.string()))


def _alive(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"]))


def _dropped(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"]))


def _run_starts(sorted_column: pa.ChunkedArray) -> np.ndarray:
    """True where a value differs from the one before (the column sorted; nulls each alone)."""
    values = sorted_column.to_numpy(zero_copy_only=False)
    start = np.ones(len(values), bool)
    start[1:] = values[1:] != values[:-1]
    return start | pc.is_null(sorted_column).to_numpy(zero_copy_only=False)


def _with_bucket(batch: pa.Table, ids: np.ndarray, buckets: int) -> pa.Table:
    return batch.append_column("bucket", pa.array((ids % np.uint64(buckets)).astype(np.int64)))


def _sha_buckets(batch: pa.Table, buckets: int) -> pa.Table:
    """The group of a row's sha256: many sha256s share one, so each group call is vectorized
    over thousands of rows (one call per sha256 cost ~1 ms a row in Python)."""
    # crc32: stable across processes (Python's hash() is not); any text, hex or not.
    ids = [zlib.crc32(h.encode()) if h else 0 for h in batch["sha256"].to_pylist()]
    return _with_bucket(batch, np.array(ids, np.uint64), buckets)


def _exact_group(group: pa.Table) -> pa.Table:
    """Rows of some sha256s: the earliest position of each stays, the others name it.

    Rows without a sha256 are never duplicates."""
    group = group.drop_columns(["bucket"]).sort_by(
        [("sha256", "ascending"), ("position", "ascending")]
    )
    start = _run_starts(group["sha256"])
    first = np.maximum.accumulate(np.where(start, np.arange(len(start)), 0))
    keys = group["key"].to_pylist()
    reasons = [None if s else "duplicate_image" for s in start]
    errors = [None if s else f"same image as {keys[f]}" for s, f in zip(start, first, strict=True)]
    return _with_verdicts(group, reasons, errors)


def _explode_bands(batch: pa.Table, max_distance: int, buckets: int) -> pa.Table:
    """Each candidate row once per band, with that band's value; grouped by (band, bucket of
    the value), a group holds many band values, each compared only within itself."""
    batch = batch.filter(pc.is_valid(batch["phash"]))
    values = _phash_ints(batch["phash"].to_pylist())
    parts = []
    for b, (lo, hi) in enumerate(bands(max_distance)):
        band_values = (values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        part = (
            batch.select(_BANDS.names[:4])
            .append_column("band", pa.array(np.full(len(values), b, np.int64)))
            .append_column("value", pa.array(band_values.view(np.int64)))
        )
        parts.append(_with_bucket(part, band_values, buckets))
    return pa.concat_tables(parts)


SMALL_RUN = 16  # rows of one band value compared all pairs at once, across values


def _band_group(group: pa.Table, max_distance: int) -> pa.Table:
    """Rows of one band and some band values: the pairs within each value, verified; for each
    row the earliest earlier row within the distance.

    Most band values hold one row, most of the others a few: those are compared all at once
    (row i against row i+k of the same value, for k < SMALL_RUN); a value held by more rows
    (many alike images) goes through _near_group's blocked scan on its own.
    """
    group = group.sort_by([("value", "ascending"), ("position", "ascending")])
    n = group.num_rows
    start = _run_starts(group["value"])
    run = np.cumsum(start) - 1
    run_size = np.bincount(run)[run]
    small = run_size <= SMALL_RUN
    values = _phash_ints(group["phash"].to_pylist())
    found_j, found_i, found_d = [], [], []
    for k in range(1, min(SMALL_RUN, n)):
        i = np.arange(n - k)
        same = (run[i] == run[i + k]) & small[i]
        if not same.any():
            break  # no small run holds more than k rows
        d = np.bitwise_count(values[i] ^ values[i + k]).astype(np.int64)
        ok = same & (d <= max_distance)
        found_j.append(i[ok] + k)
        found_i.append(i[ok])
        found_d.append(d[ok])
    parts = []
    if found_j:
        j, i, d = (np.concatenate(x) for x in (found_j, found_i, found_d))
        order = np.lexsort((i, j))  # by row, then earliest candidate first
        j, i, d = j[order], i[order], d[order]
        first = np.ones(len(j), bool)
        first[1:] = j[1:] != j[:-1]
        j, i, d = j[first], i[first], d[first]
        parts.append(
            pa.table(
                {
                    "shard": group["shard"].take(j),
                    "key": group["key"].take(j),
                    "position": group["position"].take(j),
                    "phash": group["phash"].take(j),
                    "winner_key": group["key"].take(i),
                    "winner_position": group["position"].take(i),
                    "distance": pa.array(d, pa.int64()),
                },
                schema=_PAIRS,
            )
        )
    big = np.flatnonzero(start & ~small)
    parts += [_near_group(group.slice(a, run_size[a]), max_distance) for a in big]
    return pa.concat_tables(parts) if parts else _PAIRS.empty_table()


def _near_group(group: pa.Table, max_distance: int, block: int = 256) -> pa.Table:
    """Rows agreeing on one band: each row's earliest earlier row within the distance.

    Earlier rows are scanned in blocks from the start of the group, and a row leaves the scan
    at its first hit, so a large group of alike images costs about one block per row.
    """
    group = group.sort_by("position")
    n = group.num_rows
    values = _phash_ints(group["phash"].to_pylist())
    winner = np.full(n, -1, np.int64)
    distance = np.zeros(n, np.int64)
    open_rows = np.arange(1, n)
    for start in range(0, n, block):
        open_rows = open_rows[open_rows > start]  # a row's candidates all come before it
        if open_rows.size == 0:
            break
        stop = min(n, start + block)
        d = np.bitwise_count(values[open_rows, None] ^ values[None, start:stop]).astype(np.int64)
        ok = (d <= max_distance) & (np.arange(start, stop)[None, :] < open_rows[:, None])
        hit = ok.any(axis=1)
        first = ok.argmax(axis=1)
        winner[open_rows[hit]] = start + first[hit]
        distance[open_rows[hit]] = d[hit, first[hit]]
        open_rows = open_rows[~hit]
    found = np.flatnonzero(winner >= 0)
    if found.size == 0:
        return _PAIRS.empty_table()
    w = winner[found]
    return pa.table(
        {
            "shard": group["shard"].take(found),
            "key": group["key"].take(found),
            "position": group["position"].take(found),
            "phash": group["phash"].take(found),
            "winner_key": group["key"].take(w),
            "winner_position": group["position"].take(w),
            "distance": pa.array(distance[found]),
        },
        schema=_PAIRS,
    )


def _pair_buckets(pairs: pa.Table, buckets: int) -> pa.Table:
    return _with_bucket(pairs, pairs["position"].to_numpy().astype(np.uint64), buckets)


def _near_verdict(pairs: pa.Table) -> pa.Table:
    """Candidate pairs of some rows, from all their bands: each row's drop names the earliest
    verified candidate."""
    pairs = pairs.sort_by([("position", "ascending"), ("winner_position", "ascending")])
    best = pairs.filter(pa.array(_run_starts(pairs["position"]))).to_pylist()
    return pa.Table.from_pylist(
        [
            {
                "shard": r["shard"],
                "key": r["key"],
                "position": r["position"],
                "reason": "near_duplicate",
                "error": f"phash {r['phash']} is {r['distance']} bits from {r['winner_key']}",
            }
            for r in best
        ],
        schema=_DROP_ROWS,
    )


def _write_shard_drops(group: pa.Table, drops_dir: str) -> pa.Table:
    """One shard's drops (plus its sentinel row, position -1) -> its drops file, whole."""
    shard = group["shard"][0].as_py()
    drops = group.filter(pc.greater_equal(group["position"], 0)).sort_by("position")
    storage.write_parquet(drops.select(DROPS.names).cast(DROPS), _drops_path(drops_dir, shard))
    counts = Counter(drops["reason"].to_pylist())
    return pa.table({"shard": [shard], **{r: [counts.get(r, 0)] for r in REASONS}})


def _drops_path(drops_dir: str, shard: str) -> str:
    return storage.join(drops_dir, f"{shard}.parquet")


def shard_stem(path: str) -> str:
    base = storage.name(path)
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


# --- the driver's side: plan, run, commit the marker ------------------------------------------


def find_drops(
    hash_files: list[str],
    drops_dir: str,
    *,
    dedup_images: bool,
    near_duplicate_distance: int | None,
    eval_hashes: list[str],
    decontaminate_distance: int,
    fingerprint: str | None = None,
    expected_rows: int | None = None,
) -> dict[str, int]:
    """Decide which rows of the shards behind `hash_files` are dropped, and why.

    Writes `drops_dir/<shard stem>.parquet` for every hash file (DROPS schema, in position
    order, possibly empty) and then `drops_dir/_SUCCESS.json`; returns the number of drops per
    reason (every reason in REASONS, zeros included). `eval_hashes` empty: no
    decontamination. A marker written with the same shards, settings and `fingerprint`
    (anything identifying the hash files' content, e.g. the prepare run's fingerprint and
    retry count: the caller's to change when a hash file is rewritten) means the work is done:
    its counts are returned and nothing is read. `expected_rows`, about how many rows the
    hash files hold, sizes the groups (it never changes the result); counted when not given.
    Needs a running Ray.
    """
    import ray.data

    if near_duplicate_distance is not None:
        _check_distance("near-duplicate distance", near_duplicate_distance)
    if eval_hashes:
        _check_distance("decontaminate distance", decontaminate_distance)
    stems = [shard_stem(p) for p in hash_files]
    repeated = sorted(s for s, c in Counter(stems).items() if c > 1)
    if repeated:
        raise ValueError(f"hash files of the same shard listed twice: {repeated[:5]}")
    eval_digest = hashlib.sha256("\n".join(sorted(eval_hashes)).encode()).hexdigest()[:16]
    params = {
        "shards": sorted(stems),
        "dedup_images": bool(dedup_images),
        "near_duplicate_distance": near_duplicate_distance,
        "eval_hashes": eval_digest if eval_hashes else None,
        "decontaminate_distance": decontaminate_distance if eval_hashes else None,
        "fingerprint": fingerprint,
    }
    marker = storage.join(drops_dir, MARKER)
    if storage.exists(marker):
        done = storage.read_json(marker)
        if done.get("params") == params:
            return done["counts"]
        storage.remove(marker)  # another run's: its files are replaced below
    storage.makedirs(drops_dir)
    listed = set(stems)
    for stale in storage.list_files(drops_dir, ".parquet"):
        if shard_stem(stale) not in listed:
            storage.remove(stale)

    counts = dict.fromkeys(REASONS, 0)
    if stems:
        # Hashes are ~100 bytes a row (1.3 GB at 12.8M rows): the task-based sort shuffle
        # suits them; the default hash shuffle starts a pool of aggregator actors per groupby,
        # which made this step 3-8x slower on small runs (40-70 s against 5-20 s here).
        ctx = ray.data.DataContext.get_current()
        strategy = ctx.shuffle_strategy
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        try:
            counts = _run(
                hash_files,
                stems,
                drops_dir,
                dedup_images,
                near_duplicate_distance,
                list(eval_hashes),
                decontaminate_distance,
                eval_digest,
                expected_rows,
            )
        finally:
            ctx.shuffle_strategy = strategy
    storage.write_json(marker, {"params": params, "counts": counts})
    return counts


def _run(
    hash_files: list[str],
    stems: list[str],
    drops_dir: str,
    dedup_images: bool,
    near_distance: int | None,
    eval_hashes: list[str],
    eval_distance: int,
    eval_digest: str,
    expected_rows: int | None,
) -> dict[str, int]:
    """find_drops' Ray Data part: writes the drops files, returns the drops per reason."""
    import ray.data

    files = ray.data.from_items(
        [{"path": p, "shard": s} for p, s in zip(hash_files, stems, strict=True)],
        override_num_blocks=max(1, min(len(stems), 64)),
    )
    rows = files.map_batches(_read_hashes, batch_format="pyarrow", batch_size=1)
    if eval_hashes:
        rows = rows.map_batches(
            _decontaminate,
            batch_format="pyarrow",
            fn_kwargs={
                "eval_hashes": eval_hashes,
                "distance": eval_distance,
                "digest": eval_digest,
            },
        )
        rows = rows.materialize()  # decontaminated once: the checks below branch from it
    # Groups of ~GROUP_ROWS rows: few enough calls, small enough to hold in a task. Each
    # execution of a Ray Data plan costs about a second of scheduling, so the default
    # (exact duplicates only) is one plan: nothing is materialized, nothing counted.
    buckets = max(1, (rows.count() if expected_rows is None else expected_rows) // GROUP_ROWS)
    drops = [rows.map_batches(_dropped, batch_format="pyarrow")] if eval_hashes else []
    alive = rows.map_batches(_alive, batch_format="pyarrow")
    if dedup_images:
        checked = (
            alive.map_batches(_sha_buckets, batch_format="pyarrow", fn_kwargs={"buckets": buckets})
            .groupby("bucket")
            .map_groups(_exact_group, batch_format="pyarrow")
        )
        if near_distance is not None:
            checked = checked.materialize()  # both its drops and its survivors are used
        drops.append(checked.map_batches(_dropped, batch_format="pyarrow"))
        alive = checked.map_batches(_alive, batch_format="pyarrow")
    drops = [d.select_columns(_DROP_ROWS.names) for d in drops]
    if near_distance is not None:
        near = (
            alive.map_batches(
                _explode_bands,
                batch_format="pyarrow",
                fn_kwargs={"max_distance": near_distance, "buckets": buckets},
            )
            .groupby(["band", "bucket"])
            .map_groups(
                _band_group, batch_format="pyarrow", fn_kwargs={"max_distance": near_distance}
            )
            .map_batches(_pair_buckets, batch_format="pyarrow", fn_kwargs={"buckets": buckets})
            .groupby("bucket")
            .map_groups(_near_verdict, batch_format="pyarrow")
        )
        drops.append(near)
    # One sentinel row per shard, so every shard gets its file even without drops.
    sentinels = files.map_batches(_sentinels, batch_format="pyarrow")
    written = (
        (sentinels.union(*drops) if drops else sentinels)
        .groupby("shard")
        .map_groups(_write_shard_drops, batch_format="pyarrow", fn_kwargs={"drops_dir": drops_dir})
        .take_all()
    )
    if len(written) != len(stems):
        raise RuntimeError(f"dedup wrote {len(written)} drops files for {len(stems)} shards")
    return {r: sum(int(row[r]) for row in written) for r in REASONS}


def _sentinels(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table(
        {
            "shard": batch["shard"].cast(pa.string()),
            "key": pa.nulls(n, pa.string()),
            "position": pa.array([-1] * n, pa.int64()),
            "reason": pa.nulls(n, pa.string()),
            "error": pa.nulls(n, pa.string()),
        },
        schema=_DROP_ROWS,
    )


# --- per shard, in a worker ------------------------------------------------------------------


def finalize_shard(
    staged_shard: str,
    drops_file: str,
    shard_out: str,
    rejects_out: str | None,
    existing_rejects: str | None = None,
) -> dict[str, Any]:
    """Move a shard's dropped rows from its staged samples to its rejects.

    Writes `shard_out`: the staged rows without the dropped ones (same schema, same order),
    and, unless `rejects_out` is None, `rejects_out`: the rows of `existing_rejects` (the
    shard's per-row rejects, if given and present) followed by the dropped rows as rejects
    (stage "filter", the drop's reason and error; url, caption and any additional columns
    from the staged rows). Each file is written whole, rejects first.

    Idempotent: rerunning it, even in place (`shard_out` == `staged_shard`, `rejects_out` ==
    `existing_rejects`) after an interruption at any point, gives the same two files: a
    dropped row already moved by an earlier run is found in the rejects and kept once.
    Returns counts: samples kept, rejects written, and the shard's drops per reason.
    """
    staged = storage.read_parquet(staged_shard)
    drops = storage.read_parquet(drops_file).select(DROPS.names)
    if existing_rejects and storage.exists(existing_rejects):
        old = storage.read_parquet(existing_rejects)  # its schema is the shard's reject schema
        reject_schema = old.schema.remove_metadata()
    else:  # today's: the reject columns, then the extra columns the shard carries
        extra = [f for f in staged.schema if f.name not in schema.SAMPLE.names]
        reject_schema = pa.schema([*schema.REJECT, *extra])
        old = reject_schema.empty_table()

    drop_keys = pa.array(drops["key"].to_pylist(), pa.string())
    is_dropped = pc.is_in(staged["key"], value_set=drop_keys)
    kept, moved = staged.filter(pc.invert(is_dropped)), staged.filter(is_dropped)
    # A dropped row that an earlier run already moved is in `old`; one that is being moved
    # now must not stay there twice.
    old = old.filter(pc.invert(pc.is_in(old["key"], value_set=moved["key"])))
    missing = set(drops["key"].to_pylist()) - set(moved["key"].to_pylist())
    missing -= set(old["key"].to_pylist())
    if missing:
        raise ValueError(
            f"{drops_file}: {len(missing)} dropped key(s) are in neither {staged_shard} nor its "
            f"rejects (e.g. {sorted(missing)[0]}): drops of another run?"
        )

    verdict = dict(
        zip(
            drops["key"].to_pylist(),
            zip(drops["reason"].to_pylist(), drops["error"].to_pylist(), strict=True),
            strict=True,
        )
    )
    moved_keys = moved["key"].to_pylist()
    columns = {}
    for field in reject_schema:
        if field.name == "stage":
            columns[field.name] = pa.array(["filter"] * moved.num_rows, field.type)
        elif field.name in ("reason", "error"):
            i = 0 if field.name == "reason" else 1
            columns[field.name] = pa.array([verdict[k][i] for k in moved_keys], field.type)
        else:
            columns[field.name] = moved[field.name].cast(field.type)
    new = pa.table(columns, schema=reject_schema)
    rejects = pa.concat_tables([old.cast(reject_schema), new])

    if rejects_out is not None:
        storage.write_parquet(rejects, rejects_out)
    storage.write_parquet(kept, shard_out)
    reasons = Counter(drops["reason"].to_pylist())
    return {
        "samples": kept.num_rows,
        "rejects": rejects.num_rows,
        "drops": {r: reasons.get(r, 0) for r in REASONS},
    }
