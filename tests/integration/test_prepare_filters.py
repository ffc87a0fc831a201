"""The filter stage on real images through prepare on a local Ray: size, aspect, captions,
blocklist, exact and near duplicates, decontamination against an eval folder; extra columns
kept; the funnel in stats.json and funnel.png.

(The download stage's hostile cases are in test_hostile_prepare.py.)
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import DownloadConfig, FilterConfig, PrepareConfig
from pipeline.data.filters import perceptual_hash
from pipeline.data.prepare import read_url_list, run_prepare
from pipeline.rundir import RunDir

pytestmark = pytest.mark.integration


def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A distinct photo-like image: random low-frequency colour field plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.BICUBIC), np.int16)
    noisy = smooth + rng.normal(0, 4, smooth.shape).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def encode(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


GOOD = {f"/photo/{i}.jpg": encode(photo(i)) for i in range(6)}
ORIGINAL = encode(photo(100))  # a photo that appears again, re-encoded smaller
NEAR_COPY = encode(photo(100).resize((136, 102), Image.LANCZOS), quality=70)
EVAL_IMAGE = photo(200)  # in the eval folder; a JPEG copy of it is served for training
BODIES = {
    **GOOD,
    "/original.jpg": ORIGINAL,
    "/near-copy.jpg": NEAR_COPY,
    "/same-bytes.jpg": GOOD["/photo/0.jpg"],  # another URL, identical bytes
    "/eval-leak.jpg": encode(EVAL_IMAGE, quality=80),
    "/tiny.jpg": encode(photo(300, (16, 16))),
    "/banner.jpg": encode(photo(301, (600, 100))),
}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = BODIES.get(urlsplit(self.path).path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_fixtures_are_what_they_claim():
    """Near copies are near, distinct photos far, in the hash the filters use."""

    def phash(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as im:
            return int(perceptual_hash(im), 16)

    def distance(a: int, b: int) -> int:
        return (a ^ b).bit_count()

    distinct = [phash(b) for b in GOOD.values()] + [phash(ORIGINAL)]
    assert distance(phash(ORIGINAL), phash(NEAR_COPY)) <= 2
    assert int(perceptual_hash(EVAL_IMAGE), 16) == phash(BODIES["/eval-leak.jpg"])
    assert min(distance(a, b) for i, a in enumerate(distinct) for b in distinct[:i]) > 12


def rows_and_reasons(base: str) -> list[tuple[str, bytes, tuple | None]]:
    """(url, caption, expected (stage, reason) or None for a kept sample), in input order."""
    rows: list[tuple[str, bytes, tuple | None]] = [
        (f"{base}{path}", f"a photo of item {i}".encode(), None) for i, path in enumerate(GOOD)
    ]
    return rows + [
        (f"{base}/original.jpg", b"the original photo", None),
        (f"{base}/photo/0.jpg", b"the same url again", ("input", "duplicate_url")),
        (f"{base}/tiny.jpg", b"a tiny thumbnail", ("filter", "too_small")),
        (f"{base}/banner.jpg", b"a wide banner", ("filter", "bad_aspect_ratio")),
        (f"{base}/photo/4.jpg?empty", b"", ("filter", "caption_too_short")),
        (f"{base}/photo/5.jpg?word", b"word", ("filter", "caption_too_short")),
        (f"{base}/photo/1.jpg?stock", b"Stock Photo of a cat", ("filter", "caption_blocklisted")),
        (f"{base}/same-bytes.jpg", b"identical bytes elsewhere", ("filter", "duplicate_image")),
        (f"{base}/near-copy.jpg", b"smaller re-encoded copy", ("filter", "near_duplicate")),
        (f"{base}/eval-leak.jpg", b"an eval image leaked", ("filter", "eval_near_duplicate")),
        (f"{base}/404", b"not found here", ("download", "http_404")),
    ]


@pytest.fixture(scope="module")
def prepared(ray_local, base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filters")
    rows = rows_and_reasons(base)
    # uid: an extra column (Parquet int64) carried into shards and rejects.
    pq.write_table(
        pa.table(
            {
                "url": [u for u, _, _ in rows],
                "text": [c.decode() for _, c, _ in rows],
                "uid": list(range(1000, 1000 + len(rows))),
            }
        ),
        tmp / "urls.parquet",
    )
    eval_dir = tmp / "eval"
    (eval_dir / "some_class").mkdir(parents=True)
    EVAL_IMAGE.save(eval_dir / "some_class" / "leaked.png")
    photo(201).save(eval_dir / "some_class" / "other.png")
    cfg = PrepareConfig(
        caption_col="text",
        rows_per_shard=8,
        save_additional_columns=("uid",),
        download=DownloadConfig(
            allowed_networks=("127.0.0.1/32",), retries=0, batch_size=8, thread_count=8
        ),
        filters=FilterConfig(
            caption_blocklist=(r"\bstock photo\b",),
            near_duplicate_distance=4,
            decontaminate=str(eval_dir),
        ),
    )
    run = RunDir.at(tmp / "run")
    urls = read_url_list(str(tmp / "urls.parquet"), "url", "text", ("uid",))
    stats = run_prepare(urls, run, cfg)

    def read(folder: str) -> list[dict]:
        return [
            r for f in sorted(Path(folder).glob("*.parquet")) for r in pq.read_table(f).to_pylist()
        ]

    return {
        "rows": rows,
        "stats": stats,
        "run": run,
        "samples": read(run.shards),
        "rejects": read(run.rejects),
    }


def test_each_row_is_kept_or_dropped_for_its_reason(prepared):
    rows, samples, rejects = prepared["rows"], prepared["samples"], prepared["rejects"]
    assert len(samples) + len(rejects) == len(rows)  # every row in exactly one place
    got = {s["uid"] - 1000: None for s in samples}
    got.update({r["uid"] - 1000: (r["stage"], r["reason"]) for r in rejects})
    assert got == {i: want for i, (_, _, want) in enumerate(rows)}
    for r in rejects:
        assert r["error"], r  # every drop says why
    # The near copy and the leak name the hash they were matched to.
    details = {r["reason"]: r["error"] for r in rejects}
    assert "bits from" in details["near_duplicate"]
    assert "bits from" in details["eval_near_duplicate"]


def test_keys_and_extra_columns(prepared):
    rows, samples, rejects = prepared["rows"], prepared["samples"], prepared["rejects"]
    assert len({s["key"] for s in samples}) == len(samples)
    for r in samples + rejects:
        url = rows[r["uid"] - 1000][0]
        assert r["url"] == url and r["key"] == schema.url_key(url)
    for folder, design in (
        (prepared["run"].shards, schema.SAMPLE),
        (prepared["run"].rejects, schema.REJECT),
    ):
        for f in sorted(Path(folder).glob("*.parquet")):
            got = pq.read_schema(f)
            # The DESIGN.md columns first, unchanged; the extra column after, with its type.
            assert got.names == [*design.names, "uid"], f
            assert got.field("uid").type == pa.int64()


def test_stats_funnel_and_chart(prepared):
    stats, run, rejects = prepared["stats"], prepared["run"], prepared["rejects"]
    assert json.loads(Path(run.stats_path).read_text()) == stats
    assert stats["rows_in"] == len(prepared["rows"])
    for stage in ("input", "download", "filter"):
        drops = Counter(r["reason"] for r in rejects if r["stage"] == stage)
        assert stats["stages"][stage]["drops"] == dict(drops), stage
    assert stats["failing_domains"] == [
        {"domain": "127.0.0.1", "failures": 1, "reasons": {"http_404": 1}}
    ]
    png = Path(stats["paths"]["funnel_png"])
    assert png == Path(run.root) / "data" / "funnel.png"
    with Image.open(png) as chart:
        assert chart.format == "PNG" and chart.size[0] > 600
