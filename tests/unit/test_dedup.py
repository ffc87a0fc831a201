"""The dedup step's parts that need no Ray: the bands' pigeonhole property, one band group's
pair check against brute force, and finalize_shard on real Parquet files (rows moved, schema,
counts, idempotent reruns). find_drops itself: tests/integration/test_dedup_ray.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schema
from pipeline.data import dedup


@settings(max_examples=300, deadline=None)
@given(
    distance=st.integers(0, dedup.MAX_DISTANCE),
    value=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_two_hashes_within_the_distance_share_a_band(distance, value, data):
    flips = data.draw(st.sets(st.integers(0, 63), max_size=distance))
    other = value
    for b in flips:
        other ^= 1 << b
    spans = dedup.bands(distance)
    assert spans[0][0] == 0 and spans[-1][1] == 64 and len(spans) == distance + 1
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    band = [((value >> lo) & ((1 << (hi - lo)) - 1)) for lo, hi in spans]
    other_band = [((other >> lo) & ((1 << (hi - lo)) - 1)) for lo, hi in spans]
    assert any(x == y for x, y in zip(band, other_band, strict=True))


@settings(max_examples=100, deadline=None)
@given(
    hashes=st.lists(st.integers(0, 255), min_size=1, max_size=40),
    distance=st.integers(0, 4),
    block=st.integers(1, 8),
    data=st.data(),
)
def test_a_band_group_finds_each_rows_earliest_earlier_neighbour(hashes, distance, block, data):
    # 8-bit hashes (in 64 bits) make close pairs common; positions in any order.
    positions = data.draw(st.permutations(range(len(hashes))))
    group = pa.table(
        {
            "shard": ["s"] * len(hashes),
            "key": [f"k{p}" for p in positions],
            "position": pa.array(positions, pa.int64()),
            "phash": [f"{h:016x}" for h in hashes],
        }
    )
    got = {
        r["key"]: (r["winner_key"], r["distance"])
        for r in dedup._near_group(group, distance, block=block).to_pylist()
    }
    by_position = sorted(zip(positions, hashes, strict=True))
    expected = {}
    for j, (pj, hj) in enumerate(by_position):
        for pi, hi in by_position[:j]:
            if (hi ^ hj).bit_count() <= distance:
                expected[f"k{pj}"] = (f"k{pi}", (hi ^ hj).bit_count())
                break
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(
    hashes=st.lists(st.integers(0, 255), min_size=1, max_size=60),
    distance=st.integers(0, 4),
    small_run=st.integers(2, 6),
    data=st.data(),
)
def test_a_bucket_of_band_values_pairs_rows_only_within_a_value(hashes, distance, small_run, data):
    # The band value: the hash's low 2 bits, so a bucket holds 4 values, some held by more
    # rows than SMALL_RUN (the blocked scan), some by fewer (compared all at once).
    positions = data.draw(st.permutations(range(len(hashes))))
    group = pa.table(
        {
            "shard": ["s"] * len(hashes),
            "key": [f"k{p}" for p in positions],
            "position": pa.array(positions, pa.int64()),
            "phash": [f"{h:016x}" for h in hashes],
            "band": pa.array([0] * len(hashes), pa.int64()),
            "value": pa.array([h & 3 for h in hashes], pa.int64()),
            "bucket": pa.array([0] * len(hashes), pa.int64()),
        }
    )
    saved, dedup.SMALL_RUN = dedup.SMALL_RUN, small_run
    try:
        pairs = dedup._band_group(group, distance)
    finally:
        dedup.SMALL_RUN = saved
    got = {r["key"]: (r["winner_key"], r["distance"]) for r in pairs.to_pylist()}
    by_position = sorted(zip(positions, hashes, strict=True))
    expected = {}
    for j, (pj, hj) in enumerate(by_position):
        for pi, hi in by_position[:j]:
            if hi & 3 == hj & 3 and (hi ^ hj).bit_count() <= distance:
                expected[f"k{pj}"] = (f"k{pi}", (hi ^ hj).bit_count())
                break
    assert got == expected


SAMPLE_EXTRA = pa.schema([*schema.SAMPLE, ("uid", pa.int64())])
REJECT_EXTRA = pa.schema([*schema.REJECT, ("uid", pa.int64())])


def staged_rows(n: int) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "key": f"k{i}",
                "url": f"http://example.com/{i}.jpg",
                "caption": f"caption {i}",
                "jpg": bytes([i]) * 10,
                "width": 64,
                "height": 64,
                "original_width": 640,
                "original_height": 480,
                "sha256": f"{i:064x}",
                "tokens": [1, i, 2],
                "uid": 1000 + i,
            }
            for i in range(n)
        ],
        schema=SAMPLE_EXTRA,
    )


def write(table: pa.Table, path) -> str:
    pq.write_table(table, path)
    return str(path)


DROPPED = [
    {"key": "k4", "position": 104, "reason": "duplicate_image", "error": "same image as k0"},
    {
        "key": "k1",
        "position": 101,
        "reason": "near_duplicate",
        "error": "phash ab is 2 bits from k0",
    },
]


@pytest.fixture
def shard(tmp_path):
    staged = write(staged_rows(6), tmp_path / "staged.parquet")
    drops = write(pa.Table.from_pylist(DROPPED, schema=dedup.DROPS), tmp_path / "drops.parquet")
    old = pa.Table.from_pylist(
        [
            {
                "key": "k9",
                "url": "http://gone/",
                "caption": "x",
                "stage": "download",
                "reason": "http_404",
                "error": "404",
                "uid": 1009,
            }
        ],
        schema=REJECT_EXTRA,
    )
    existing = write(old, tmp_path / "rejects-in.parquet")
    return tmp_path, staged, drops, existing


def test_finalize_moves_the_dropped_rows_to_the_rejects(shard):
    tmp_path, staged, drops, existing = shard
    out, rejects = str(tmp_path / "out.parquet"), str(tmp_path / "rejects.parquet")
    counts = dedup.finalize_shard(staged, drops, out, rejects, existing)
    kept = pq.read_table(out)
    assert kept.schema.equals(SAMPLE_EXTRA)
    assert kept.to_pylist() == [
        r for r in staged_rows(6).to_pylist() if r["key"] not in ("k1", "k4")
    ]
    got = pq.read_table(rejects)
    assert got.schema.equals(REJECT_EXTRA)
    assert got.to_pylist() == [
        {
            "key": "k9",
            "url": "http://gone/",
            "caption": "x",
            "stage": "download",
            "reason": "http_404",
            "error": "404",
            "uid": 1009,
        },
        {
            "key": "k1",
            "url": "http://example.com/1.jpg",
            "caption": "caption 1",
            "stage": "filter",
            "reason": "near_duplicate",
            "error": "phash ab is 2 bits from k0",
            "uid": 1001,
        },
        {
            "key": "k4",
            "url": "http://example.com/4.jpg",
            "caption": "caption 4",
            "stage": "filter",
            "reason": "duplicate_image",
            "error": "same image as k0",
            "uid": 1004,
        },
    ]
    assert counts == {
        "samples": 4,
        "rejects": 3,
        "drops": {"eval_near_duplicate": 0, "duplicate_image": 1, "near_duplicate": 1},
    }


def test_finalize_without_existing_rejects_or_without_a_rejects_file(shard):
    tmp_path, staged, drops, _ = shard
    rejects = str(tmp_path / "rejects.parquet")
    dedup.finalize_shard(staged, drops, str(tmp_path / "a.parquet"), rejects, None)
    got = pq.read_table(rejects)
    assert got.schema.equals(REJECT_EXTRA) and got["key"].to_pylist() == ["k1", "k4"]
    assert got["stage"].to_pylist() == ["filter", "filter"]

    counts = dedup.finalize_shard(staged, drops, str(tmp_path / "b.parquet"), None)
    assert counts["samples"] == 4 and pq.read_table(tmp_path / "b.parquet").num_rows == 4


def test_finalize_with_nothing_dropped_keeps_the_shard_whole(shard):
    tmp_path, staged, _, existing = shard
    empty = write(dedup.DROPS.empty_table(), tmp_path / "none.parquet")
    out, rejects = str(tmp_path / "out.parquet"), str(tmp_path / "rejects.parquet")
    counts = dedup.finalize_shard(staged, empty, out, rejects, existing)
    assert pq.read_table(out).equals(pq.read_table(staged))
    assert pq.read_table(rejects).equals(pq.read_table(existing))
    assert counts["samples"] == 6 and sum(counts["drops"].values()) == 0


def test_finalize_in_place_is_idempotent_even_after_an_interruption(shard):
    tmp_path, staged, drops, existing = shard
    clean_out, clean_rejects = tmp_path / "clean.parquet", tmp_path / "clean-rejects.parquet"
    dedup.finalize_shard(staged, drops, str(clean_out), str(clean_rejects), existing)

    # Interrupted after the rejects were written, before the shard: the staged rows are still
    # there, the moved ones already in the rejects.
    dedup.finalize_shard(staged, drops, str(tmp_path / "lost.parquet"), existing, existing)
    assert pq.read_table(existing).num_rows == 3
    for _ in range(2):  # then the rerun, and one more
        counts = dedup.finalize_shard(staged, drops, staged, existing, existing)
        assert pq.read_table(staged).equals(pq.read_table(clean_out))
        assert pq.read_table(existing).equals(pq.read_table(clean_rejects))
    assert counts["samples"] == 4 and counts["rejects"] == 3


def test_finalize_refuses_drops_of_rows_it_has_never_seen(shard):
    tmp_path, staged, _, existing = shard
    foreign = write(
        pa.Table.from_pylist(
            [{"key": "elsewhere", "position": 7, "reason": "duplicate_image", "error": "x"}],
            schema=dedup.DROPS,
        ),
        tmp_path / "foreign.parquet",
    )
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match="elsewhere"):
        dedup.finalize_shard(staged, foreign, str(out), str(tmp_path / "r.parquet"), existing)
    assert not out.exists()
