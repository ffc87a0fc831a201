"""Arrow schemas of every boundary: the URL list, samples, rejects and stats.

The column names are a contract (DESIGN.md): readers and other tools rely on them.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

URL_LIST = pa.schema([("url", pa.string()), ("caption", pa.string())])

SAMPLE = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("tokens", pa.list_(pa.int32())),
    ]
)

REJECT = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("stage", pa.string()),  # download, filter or tokenize
        ("reason", pa.string()),  # a short machine-readable cause, counted in stats.json
        ("error", pa.string()),  # the human-readable detail, or null
    ]
)

# Beside each shard, for the dedup step (pipeline/data/dedup.py): one row per sample.
HASHES = pa.schema(
    [
        ("key", pa.string()),
        ("position", pa.int64()),  # the row's index in the input list: unique in a run
        ("sha256", pa.string()),  # of the downloaded bytes, hex
        ("phash", pa.string()),  # imagehash.phash, 16 hex digits; null when not computed
    ]
)

# The dedup step's verdicts, one file per shard: the rows it drops, in position order.
DROPS = pa.schema(
    [
        ("key", pa.string()),
        ("position", pa.int64()),
        ("reason", pa.string()),  # eval_near_duplicate, duplicate_image or near_duplicate
        ("error", pa.string()),  # names the row (or eval hash) that won
    ]
)

RETRIEVAL = pa.schema([("image", pa.binary()), ("caption", pa.string())])


def url_key(url: str) -> str:
    """Stable sample id derived from the URL: reruns and retries never duplicate a sample."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]
