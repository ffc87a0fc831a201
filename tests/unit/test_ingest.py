"""The training data plan on real Parquet shards: every epoch reads each row at most once,
ranks stay balanced, epochs differ, and a restored run reads exactly the rest."""

from __future__ import annotations

import collections
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.train.ingest import decode_group, list_chunks, plan_epoch, rank_items, read_group


def _shards(directory, sizes, row_group_size=None):
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for f, size in enumerate(sizes):
        keys = [f"k{n + i}" for i in range(size)]
        n += size
        table = pa.table({"key": keys, "tokens": [[i] for i in range(size)]})
        pq.write_table(table, directory / f"part-{f:05d}.parquet", row_group_size=row_group_size)
    return n


def _keys(items):
    return [k for item in items for k in read_group(item, ["key"]).column("key").to_pylist()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_reads_each_row_at_most_once_and_ranks_get_equal_steps(tmp_path, world):
    total = _shards(tmp_path, [700, 333, 1000, 5], row_group_size=128)
    batch, epochs = 16, 3
    chunks = list_chunks(tmp_path, world)
    assert sum(c.rows for c in chunks) == total

    per_rank = [_keys(rank_items(chunks, 7, world, r, batch, epochs)) for r in range(world)]
    steps = [plan_epoch(chunks, e, 7, world, batch).steps for e in range(epochs)]
    assert steps[0] == (total // world) // batch  # at most a batch's rows idle per rank
    orders = []
    for e in range(epochs):
        start, stop = sum(steps[:e]) * batch, sum(steps[: e + 1]) * batch
        epoch_keys = [k for keys in per_rank for k in keys[start:stop]]
        assert len(epoch_keys) == len(set(epoch_keys)) == steps[e] * batch * world
        orders.append(per_rank[0][start:stop])
    for keys in per_rank:
        assert len(keys) == sum(steps) * batch  # every rank runs the same number of steps
    assert orders[0] != orders[1]  # shuffled differently each epoch
    # Rows of one batch come from several shards, not one file's neighbourhood.
    assert len({k.split("k")[1][0] for k in per_rank[0][:batch]}) > 1


def test_a_restored_run_reads_exactly_the_rows_an_uninterrupted_run_reads_next(tmp_path):
    _shards(tmp_path, [500, 300, 257])
    world, batch, epochs = 2, 8, 3
    chunks = list_chunks(tmp_path, world)
    full = [_keys(rank_items(chunks, 0, world, r, batch, epochs)) for r in range(world)]
    steps = [plan_epoch(chunks, e, 0, world, batch).steps for e in range(epochs)]
    # Mid-epoch, on an epoch boundary, and in the last epoch.
    for start_step in (5, steps[0], steps[0] + steps[1] + 3):
        for r in range(world):
            rest = _keys(rank_items(chunks, 0, world, r, batch, epochs, start_step=start_step))
            assert rest == full[r][start_step * batch :]


def test_the_plan_is_a_function_of_its_inputs(tmp_path):
    _shards(tmp_path, [300, 300])
    chunks = list_chunks(tmp_path, 2)
    again = list_chunks(tmp_path, 2)
    assert _keys(rank_items(chunks, 3, 2, 1, 8, 2)) == _keys(rank_items(again, 3, 2, 1, 8, 2))
    assert _keys(rank_items(chunks, 3, 2, 1, 8, 2)) != _keys(rank_items(chunks, 4, 2, 1, 8, 2))


def test_hidden_partial_files_are_not_shards(tmp_path):
    _shards(tmp_path, [40])
    (tmp_path / ".part-00001.parquet.tmp.parquet").write_bytes(b"PAR1 partial")
    rows = collections.Counter()
    for c in list_chunks(tmp_path, 1):
        rows[c.path.rsplit("/", 1)[1]] += c.rows
    assert rows == {"part-00000.parquet": 40}


def _as_batch(item):
    """A plan item as Ray Data hands it to decode_group: one row, list fields as arrays."""
    batch = {}
    for key, value in item.items():
        column = np.empty(1, dtype=object)
        column[0] = np.asarray(value) if isinstance(value, list) else value
        batch[key] = column
    return batch


def _jpeg_shard(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG")
        rows.append({"jpg": buf.getvalue(), "tokens": [i] * 4})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-00000.parquet")


def test_crops_are_a_function_of_the_plan_item(tmp_path):
    _jpeg_shard(tmp_path)
    chunks = list_chunks(tmp_path, 1)
    items = rank_items(chunks, 0, 1, 0, 8, 2, group_chunks=len(chunks))  # one 24-row group

    first = decode_group(_as_batch(items[0]), image_size=32)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = decode_group(_as_batch(items[0]), image_size=32)
    # The same item gives the same random crops whatever the process's generator holds, and
    # that generator is left as it was.
    assert np.array_equal(first["image"], again["image"])
    assert np.array_equal(first["tokens"], again["tokens"])
    assert torch.equal(torch.get_rng_state(), state)
    # The same rows under another item's seed (as in a later epoch) get other crops.
    reseeded = decode_group(_as_batch({**items[0], "seed": [0, 1, 0, 0]}), image_size=32)
    crops = {int(t[0]): image for t, image in zip(first["tokens"], first["image"], strict=True)}
    recrops = {int(t[0]): im for t, im in zip(reseeded["tokens"], reseeded["image"], strict=True)}
    assert crops.keys() == recrops.keys() and len(crops) == len(first["image"]) > 1
    # RandomResizedCrop falls back to a centre crop when its ten draws all miss the image, so
    # some rows get the same crop under any seed; most must not.
    assert sum(not np.array_equal(crops[k], recrops[k]) for k in crops) > len(crops) // 2


def test_a_run_resumed_mid_group_crops_its_rows_as_an_uninterrupted_run(tmp_path):
    _jpeg_shard(tmp_path)
    chunks = list_chunks(tmp_path, 1)
    whole = rank_items(chunks, 0, 1, 0, 8, 2, group_chunks=len(chunks))  # one 24-row group
    resumed = rank_items(chunks, 0, 1, 0, 8, 2, start_step=1, group_chunks=len(chunks))
    assert resumed[0]["group"] == whole[0]["group"] and resumed[0]["skip"] == 8
    full = decode_group(_as_batch(whole[0]), image_size=32)
    rest = decode_group(_as_batch(resumed[0]), image_size=32)
    assert np.array_equal(rest["tokens"], full["tokens"][8:])
    assert np.array_equal(rest["image"], full["image"][8:])  # the same crops, row for row
