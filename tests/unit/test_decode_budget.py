"""Decoding within budget (issue 15, items 5 and 8): PIL parses only formats that can be
stored, and an actor runs at most FULL_DECODES full-size decodes at once."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from pipeline.config import DownloadConfig
from pipeline.data import filters
from pipeline.data.download import FULL_DECODES, make_resizer, process_image

CFG = DownloadConfig(image_size=32, fast_resize=False)


def _encoded(fmt: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "body",
    [
        _encoded("ICO", (32, 32)),
        _encoded("TGA"),
        _encoded("PCX"),
        # EPS: PIL would hand the file to Ghostscript to decode it.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\nshowpage\n",
    ],
    ids=["ico", "tga", "pcx", "eps"],
)
def test_formats_outside_the_stored_ones_are_not_parsed(body):
    result = process_image(body, CFG, make_resizer(CFG))
    assert result.reason == "not_an_image", result


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
def test_stored_formats_still_pass(fmt):
    result = process_image(_encoded(fmt), CFG, make_resizer(CFG), perceptual_hash=True)
    assert result.reason is None and result.phash, result


def test_full_size_decodes_are_bounded_per_actor(monkeypatch):
    """16 threads hash 16 PNGs (no reduced-scale decoding for PNG): at most FULL_DECODES
    decode at once."""
    running, peak, lock = [0], [0], threading.Lock()
    real = filters.perceptual_hash

    def slow_hash(image):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real(image)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(filters, "perceptual_hash", slow_hash)
    resizer, body = make_resizer(CFG), _encoded("PNG")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: process_image(body, CFG, resizer, True), range(16)))
    assert all(r.reason is None for r in results)
    assert 0 < peak[0] <= FULL_DECODES
