"""The dedup step on a local Ray: `find_drops` against a brute-force O(n^2) reference of the
documented semantics (pipeline/data/dedup.py), on random hashes with planted exact and near
duplicates, chains and eval-set neighbours; the chain case against today's sequential rule;
determinism, resume, and a run on an S3 bucket (moto on 127.0.0.1)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.data import dedup
from pipeline.data.dedup import DROPS, HASHES, MARKER, REASONS, finalize_shard, find_drops
from pipeline.data.filters import NearDuplicateIndex

pytestmark = pytest.mark.integration


def ham(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def reference(rows, *, dedup_images, near, eval_hashes, eval_distance):
    """key -> (reason, error) by the documented rule, pair by pair in position order."""
    rows = sorted(rows, key=lambda r: r["position"])
    out = {}
    passed = []
    for r in rows:
        if eval_hashes and r["phash"] is not None:
            d = min(ham(r["phash"], e) for e in eval_hashes)
            if d <= eval_distance:
                out[r["key"]] = ("eval_near_duplicate", d)
                continue
        passed.append(r)
    candidates = []
    first_of_sha = {}
    for r in passed:
        first = first_of_sha.setdefault(r["sha256"], r)
        if dedup_images and first is not r:
            out[r["key"]] = ("duplicate_image", f"same image as {first['key']}")
        else:
            candidates.append(r)
    if near is not None:
        for j, r in enumerate(candidates):
            if r["phash"] is None:
                continue
            for earlier in candidates[:j]:
                if earlier["phash"] is not None and ham(earlier["phash"], r["phash"]) <= near:
                    d = ham(earlier["phash"], r["phash"])
                    out[r["key"]] = (
                        "near_duplicate",
                        f"phash {r['phash']} is {d} bits from {earlier['key']}",
                    )
                    break
    return out


def random_rows(seed: int, n: int = 300) -> list[dict]:
    """Hash rows with planted exact copies, near copies (0-10 bits off), chains and rows
    without a pHash; positions a random permutation (with gaps), so copies come before and
    after their originals."""
    rng = random.Random(seed)
    made: list[tuple[str, int | None]] = []  # (sha256, phash)
    while len(made) < n:
        kind = rng.random()
        if made and kind < 0.15:
            made.append(rng.choice(made))  # the same image again
        elif made and kind < 0.45:
            base = rng.choice([p for _, p in made if p is not None] or [rng.getrandbits(64)])
            made.append(
                (
                    f"{rng.getrandbits(128):032x}",
                    flip(base, rng.sample(range(64), rng.randrange(11))),
                )
            )
        elif made and kind < 0.55:  # a chain: each link 1-4 bits from the last
            h = rng.getrandbits(64)
            for _ in range(rng.randrange(3, 6)):
                made.append((f"{rng.getrandbits(128):032x}", h))
                h = flip(h, rng.sample(range(64), rng.randrange(1, 5)))
        elif kind < 0.6:
            made.append((f"{rng.getrandbits(128):032x}", None))
        else:
            made.append((f"{rng.getrandbits(128):032x}", rng.getrandbits(64)))
    made = made[:n]
    positions = rng.sample(range(3 * n), n)
    return [
        {
            "key": f"key{p:05d}",
            "position": p,
            "sha256": sha,
            "phash": None if ph is None else f"{ph:016x}",
        }
        for (sha, ph), p in zip(made, positions, strict=True)
    ]


def write_hashes(folder: str, rows: list[dict], shards: int, seed: int = 0) -> list[str]:
    """Rows split by position into `shards` contiguous shards of unequal size (one empty)."""
    rng = random.Random(seed)
    rows = sorted(rows, key=lambda r: r["position"])
    cuts = sorted(rng.sample(range(1, len(rows)), shards - 2)) if shards > 2 else []
    bounds = [0, *cuts, len(rows), len(rows)]  # the last shard is empty
    paths = []
    for i in range(len(bounds) - 1):
        part = rows[bounds[i] : bounds[i + 1]]
        rng.shuffle(part)  # a hash file's row order is the writer's business
        path = storage.join(folder, f"part-{i:05d}.parquet")
        storage.write_parquet(pa.Table.from_pylist(part, schema=HASHES), path)
        paths.append(path)
    return paths


def read_drops(drops_dir: str, paths: list[str]) -> dict[str, dict]:
    """Every drops file by shard stem: {key: (reason, error)}; checks schema and order."""
    out = {}
    for path in paths:
        stem = storage.name(path)[: -len(".parquet")]
        table = storage.read_parquet(storage.join(drops_dir, f"{stem}.parquet"))
        assert table.schema.equals(DROPS), table.schema
        positions = table["position"].to_pylist()
        assert positions == sorted(positions)
        out[stem] = {r["key"]: (r["reason"], r["error"]) for r in table.to_pylist()}
    return out


def check_against_reference(got: dict, expected: dict, rows, eval_hashes):
    by_key = {r["key"]: r for r in rows}
    assert set(got) == set(expected)
    for key, (reason, error) in got.items():
        want = expected[key]
        assert reason == want[0], (key, reason, error, want)
        if reason == "eval_near_duplicate":
            # The nearest eval hash: among several at that distance any one is right.
            prefix = f"phash {by_key[key]['phash']} is {want[1]} bits from "
            assert error.startswith(prefix), (error, prefix)
            assert ham(error[len(prefix) :], by_key[key]["phash"]) == want[1]
            assert error[len(prefix) :] in eval_hashes
        else:
            assert error == want[1], (key, error, want)


@pytest.mark.parametrize(
    "seed,near,dedup_images,decontaminate,group_rows",
    [
        (0, 0, True, False, 50_000),
        (1, 2, True, True, 37),  # many buckets a groupby: keys split across groups
        (2, 4, False, True, 50_000),
        (3, 6, True, False, 11),
        (4, 8, True, True, 50_000),
    ],
)
def test_find_drops_matches_the_brute_force_reference(
    ray_local, tmp_path, monkeypatch, seed, near, dedup_images, decontaminate, group_rows
):
    monkeypatch.setattr(dedup, "GROUP_ROWS", group_rows)
    rows = random_rows(seed)
    rng = random.Random(seed)
    eval_hashes = []
    if decontaminate:
        with_phash = [r["phash"] for r in rows if r["phash"]]
        eval_hashes = [
            f"{flip(int(h, 16), rng.sample(range(64), rng.randrange(8))):016x}"
            for h in rng.sample(with_phash, 8)
        ]
        eval_hashes += [f"{rng.getrandbits(64):016x}" for _ in range(20)]
    paths = write_hashes(str(tmp_path / "hashes"), rows, shards=6, seed=seed)
    counts = find_drops(
        paths,
        str(tmp_path / "drops"),
        dedup_images=dedup_images,
        near_duplicate_distance=near,
        eval_hashes=eval_hashes,
        decontaminate_distance=4,
    )
    files = read_drops(str(tmp_path / "drops"), paths)
    got = {k: v for per_shard in files.values() for k, v in per_shard.items()}
    expected = reference(
        rows, dedup_images=dedup_images, near=near, eval_hashes=eval_hashes, eval_distance=4
    )
    check_against_reference(got, expected, rows, eval_hashes)
    # Each drop is in its own shard's file; the empty shard has an (empty) file too.
    for stem, per_shard in files.items():
        shard_keys = {
            r["key"]
            for r in storage.read_parquet(
                storage.join(str(tmp_path / "hashes"), f"{stem}.parquet")
            ).to_pylist()
        }
        assert set(per_shard) <= shard_keys
    assert files["part-00005"] == {}
    # The planted cases all happen: the test would not pass by finding nothing.
    reasons = [v[0] for v in expected.values()]
    assert counts == {r: reasons.count(r) for r in REASONS}
    assert counts["near_duplicate"] > 5
    assert counts["duplicate_image"] > 5 if dedup_images else counts["duplicate_image"] == 0
    assert (
        counts["eval_near_duplicate"] > 0 if decontaminate else counts["eval_near_duplicate"] == 0
    )
    assert storage.read_json(str(tmp_path / "drops" / MARKER))["counts"] == counts


def test_a_chain_drops_its_tail_where_the_sequential_rule_kept_it(ray_local, tmp_path):
    a = 0x0123456789ABCDEF
    b = flip(a, [0, 1, 2])  # 3 bits from a
    c = flip(b, [10, 11, 12])  # 3 bits from b, 6 from a
    d = flip(a, [20])  # 1 bit from a, 4 from b: near both, names the earliest (a)
    rows = [
        {"key": k, "position": p, "sha256": k * 8, "phash": f"{h:016x}"}
        for k, p, h in [("a", 10, a), ("b", 20, b), ("c", 30, c), ("d", 40, d)]
    ]
    paths = write_hashes(str(tmp_path / "hashes"), rows, shards=3)
    find_drops(
        paths,
        str(tmp_path / "drops"),
        dedup_images=True,
        near_duplicate_distance=4,
        eval_hashes=[],
        decontaminate_distance=4,
    )
    got = {k: v for f in read_drops(str(tmp_path / "drops"), paths).values() for k, v in f.items()}
    assert got == {
        "b": ("near_duplicate", f"phash {b:016x} is 3 bits from a"),
        "c": ("near_duplicate", f"phash {c:016x} is 3 bits from b"),
        "d": ("near_duplicate", f"phash {d:016x} is 1 bits from a"),
    }
    # Today's sequential rule (near an earlier KEPT row) keeps c: b was dropped, a is 6 away.
    index = NearDuplicateIndex(4, "near_duplicate")
    sequential = {r["key"]: index(r["phash"])[0] for r in rows}
    assert sequential == {"a": True, "b": False, "c": True, "d": False}


def test_decontamination_runs_first_and_its_drops_win_nothing(ray_local, tmp_path):
    eval_hash = 0xFFFF0000FFFF0000
    leak = flip(eval_hash, [1, 2])  # 2 bits from the eval image
    near_leak = flip(leak, [40, 41, 42])  # 3 bits from the leak, 5 from the eval image
    rows = [
        {"key": "leak", "position": 0, "sha256": "s1", "phash": f"{leak:016x}"},
        {"key": "leak-copy", "position": 1, "sha256": "s1", "phash": f"{leak:016x}"},
        {"key": "near-leak", "position": 2, "sha256": "s2", "phash": f"{near_leak:016x}"},
        {"key": "no-phash", "position": 3, "sha256": "s3", "phash": None},
        {"key": "no-phash-copy", "position": 4, "sha256": "s3", "phash": None},
    ]
    paths = write_hashes(str(tmp_path / "hashes"), rows, shards=2)
    counts = find_drops(
        paths,
        str(tmp_path / "drops"),
        dedup_images=True,
        near_duplicate_distance=4,
        eval_hashes=[f"{eval_hash:016x}", "0000000000000000"],
        decontaminate_distance=4,
    )
    got = {k: v for f in read_drops(str(tmp_path / "drops"), paths).values() for k, v in f.items()}
    assert got == {
        # Both copies of the leak go as leaks, neither as the other's duplicate.
        "leak": ("eval_near_duplicate", f"phash {leak:016x} is 2 bits from {eval_hash:016x}"),
        "leak-copy": ("eval_near_duplicate", f"phash {leak:016x} is 2 bits from {eval_hash:016x}"),
        # near-leak is 3 bits from a dropped leak only: nothing earlier survived to win.
        "no-phash-copy": ("duplicate_image", "same image as no-phash"),
    }
    assert counts == {"eval_near_duplicate": 2, "duplicate_image": 1, "near_duplicate": 0}


def test_same_output_whatever_order_the_shards_are_listed_in(ray_local, tmp_path):
    rows = random_rows(7, n=200)
    paths = write_hashes(str(tmp_path / "hashes"), rows, shards=5, seed=7)
    kwargs = dict(
        dedup_images=True, near_duplicate_distance=5, eval_hashes=[], decontaminate_distance=4
    )
    first = find_drops(paths, str(tmp_path / "one"), **kwargs)
    second = find_drops(list(reversed(paths)), str(tmp_path / "two"), **kwargs)
    assert first == second
    for path in paths:
        name = storage.name(path)
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_resume_skips_with_its_marker_and_recomputes_without(ray_local, tmp_path):
    rows = random_rows(11, n=120)
    paths = write_hashes(str(tmp_path / "hashes"), rows, shards=3, seed=11)
    drops = tmp_path / "drops"
    kwargs = dict(
        dedup_images=True, near_duplicate_distance=3, eval_hashes=[], decontaminate_distance=4
    )
    counts = find_drops(paths, str(drops), **kwargs)
    before = {p.name: p.read_bytes() for p in drops.glob("*.parquet")}
    assert len(before) == 3 and sum(counts.values()) > 0

    # Marker present, same parameters: nothing is read or written (a removed file stays gone).
    (drops / "part-00001.parquet").unlink()
    (tmp_path / "hashes" / "part-00000.parquet").write_bytes(b"not parquet")
    assert find_drops(paths, str(drops), **kwargs) == counts
    assert not (drops / "part-00001.parquet").exists()

    # An interrupted run (files, no marker) is redone whole, to the same bytes.
    write_hashes(str(tmp_path / "hashes"), rows, shards=3, seed=11)
    (drops / MARKER).unlink()
    (drops / "part-00002.parquet").write_bytes(b"half")
    assert find_drops(paths, str(drops), **kwargs) == counts
    assert {p.name: p.read_bytes() for p in drops.glob("*.parquet")} == before
    assert (drops / MARKER).exists()

    # A marker of other parameters is not taken for this run's.
    wider = find_drops(paths, str(drops), **{**kwargs, "near_duplicate_distance": 8})
    assert wider["near_duplicate"] > counts["near_duplicate"]
    assert storage.read_json(str(drops / MARKER))["params"]["near_duplicate_distance"] == 8


def test_find_drops_and_finalize_on_a_bucket(ray_local, bucket):
    rows = random_rows(5, n=120)
    paths = write_hashes(f"{bucket}/run/data/hashes", rows, shards=3, seed=5)
    drops_dir = f"{bucket}/run/data/drops"
    counts = find_drops(
        paths,
        drops_dir,
        dedup_images=True,
        near_duplicate_distance=4,
        eval_hashes=[],
        decontaminate_distance=4,
    )
    assert storage.exists(f"{drops_dir}/{MARKER}")
    assert sorted(storage.list_files(drops_dir, ".parquet")) == [
        f"{drops_dir}/part-{i:05d}.parquet" for i in range(3)
    ]
    expected = reference(rows, dedup_images=True, near=4, eval_hashes=[], eval_distance=4)
    got = {k: v for f in read_drops(drops_dir, paths).values() for k, v in f.items()}
    check_against_reference(got, expected, rows, [])

    # Finalize shard 0 from a staged shard on the bucket.
    shard0 = storage.read_parquet(paths[0]).to_pylist()
    staged = pa.Table.from_pylist(
        [
            {
                "key": r["key"],
                "url": f"http://x/{r['key']}",
                "caption": "a photo",
                "sha256": r["sha256"],
            }
            for r in shard0
        ]
    )
    storage.write_parquet(staged, f"{bucket}/run/data/staged/part-00000.parquet")
    result = finalize_shard(
        f"{bucket}/run/data/staged/part-00000.parquet",
        f"{drops_dir}/part-00000.parquet",
        f"{bucket}/run/data/shards/part-00000.parquet",
        f"{bucket}/run/data/rejects/part-00000.parquet",
    )
    dropped = {k for k in got if k in {r["key"] for r in shard0}}
    kept = storage.read_parquet(f"{bucket}/run/data/shards/part-00000.parquet")
    rejects = storage.read_parquet(f"{bucket}/run/data/rejects/part-00000.parquet")
    assert set(kept["key"].to_pylist()) == {r["key"] for r in shard0} - dropped
    assert set(rejects["key"].to_pylist()) == dropped
    assert result["samples"] == kept.num_rows and result["rejects"] == len(dropped)
    assert sum(counts.values()) == len(got)
