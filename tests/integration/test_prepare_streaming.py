"""Streaming inputs: the driver plans a URL list from file metadata and runs the duplicate-URL
check as Ray tasks, so its memory does not grow with the list (issue 14, item 3)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.prepare.run import duplicate_urls, plan
from pipeline.data.prepare.worker import Source

pytestmark = pytest.mark.integration

FILES = 8


def write_list(folder, rows: int) -> set[int]:
    """`rows` rows over FILES Parquet files; every 997th row repeats the URL 5 rows before
    it (the returned positions, which the check must find)."""
    folder.mkdir()
    dups = set(range(1000, rows, 997))
    per_file = rows // FILES
    for f in range(FILES):
        lo = f * per_file
        ids = np.arange(lo, lo + per_file)
        src = np.where(np.isin(ids, list(dups)), ids - 5, ids)
        urls = pa.array([f"http://example.com/img/{i}.jpg" for i in src])
        captions = pa.array(["a photo of a thing"] * per_file)
        pq.write_table(pa.table({"url": urls, "caption": captions}), folder / f"p{f}.parquet")
    return dups


def check_peak(path) -> tuple[int, np.ndarray, int]:
    """(peak bytes allocated by Python in this driver, duplicates found, rows planned)."""
    cfg = PrepareConfig(rows_per_shard=2_000)
    tracemalloc.start()
    try:
        urls = plan(str(path), cfg)
        found = duplicate_urls(Source(urls=urls, rows=len(urls)), cfg.rows_per_shard)
        return tracemalloc.get_traced_memory()[1], found, len(urls)
    finally:
        tracemalloc.stop()


def test_driver_memory_is_flat_from_100k_to_2m_rows(ray_local, tmp_path):
    small_dups = write_list(tmp_path / "small", 100_000)
    big_dups = write_list(tmp_path / "big", 2_000_000)
    small_peak, small_found, small_rows = check_peak(tmp_path / "small")
    big_peak, big_found, big_rows = check_peak(tmp_path / "big")
    assert (small_rows, big_rows) == (100_000, 2_000_000)
    # The check is right: exactly the repeated rows, found across files and map tasks.
    assert small_found.tolist() == sorted(small_dups)
    assert big_found.tolist() == sorted(big_dups)
    # 20x the rows: the driver's peak stays within 2x (what grows is the duplicates' list,
    # 8 bytes per duplicate row).
    print(f"driver peak: {small_peak / 1e6:.2f} MB at 100k rows, {big_peak / 1e6:.2f} MB at 2M")
    assert big_peak < 2 * small_peak, (small_peak, big_peak)
