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

RETRIEVAL = pa.schema([("image", pa.binary()), ("caption", pa.string())])


def url_key(url: str) -> str:
    """Stable sample id derived from the URL: reruns and retries never duplicate a sample."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]
