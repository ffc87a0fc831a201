"""Download stage: safe fetching (pipeline.data.fetch), image validation, img2dataset's resizer.

Failures carry a short machine-readable ``reason`` (counted in stats.json): those of
pipeline.data.fetch, and not_an_image, too_many_pixels, truncated_image, decode_error,
internal_error, worker_crash (a batch that killed its download actor twice).
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import DownloadConfig, from_dict
from pipeline.data import img2dataset_modules
from pipeline.data.fetch import DEADLINE_FACTOR, _networks, address_allowed, fetch, user_agent

__all__ = ["DEADLINE_FACTOR", "DownloadStage", "address_allowed", "fetch", "user_agent"]

# What PIL may parse: the formats OpenCV (the Resizer's decoder) turns into pixels. The rest
# of PIL's parsers (EPS hands files to Ghostscript; ICO, PSD, ...) are never run on fetched bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG opens MPO too
# Full-size decodes an actor runs at once, whatever its thread count: each may take up to
# max_pixels x 4 bytes, so 64 fetching threads must not all decode large images together.
FULL_DECODES = 4
_FULL_DECODE = threading.BoundedSemaphore(FULL_DECODES)

# Resizer silences stdout/stderr by swapping the process's file descriptors 1 and 2; two
# threads doing that at once can leave them pointing at /dev/null for good.
_RESIZER_LOCK = threading.Lock()


# ------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageResult:
    jpg: bytes | None = None  # encoded in cfg.encode_format, whatever the column name says
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None  # of the downloaded bytes, for exact-duplicate filtering
    phash: str | None = None  # perceptual hash, for near-duplicates and decontamination
    reason: str | None = None
    error: str | None = None


def make_resizer(cfg: DownloadConfig) -> Any:
    # min_image_size=0: size and aspect filters live in pipeline.data.filters, counted there.
    return img2dataset_modules.resizer().Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        min_image_size=0,
    )


def _resized_shape(resizer: Any, width: int, height: int) -> tuple[int, int] | None:
    """(height, width) img2dataset's Resizer scales a ``width`` x ``height`` image to before
    cropping or padding, when that is a downscale; None when it keeps the size or upscales.

    albumentations' SmallestMaxSize / LongestMaxSize arithmetic (scale = size / side, each side
    rounded), computed here: building the transforms per image costs more than resizing.
    """
    mode = resizer.resize_mode.name
    if mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    elif mode in ("border", "keep_ratio_largest"):
        side = max(width, height)
    else:
        return None
    if side <= resizer.image_size:
        return None
    scale = resizer.image_size / side
    return max(1, round(height * scale)), max(1, round(width * scale))


@functools.cache
def _pad_to_square(size: int) -> Any:
    """The Resizer's border padding (white, centred), built once per size."""
    import albumentations as A
    import cv2

    return A.PadIfNeeded(
        min_height=size,
        min_width=size,
        border_mode=cv2.BORDER_CONSTANT,
        fill=[255, 255, 255],  # the Resizer's white border (it passes the older `value`)
        p=1.0,
    )


def _fast_resize(im: Image.Image, resizer: Any) -> tuple[bytes, int, int, Image.Image] | None:
    """img2dataset's resize of a JPEG, decoded at reduced scale: (encoded, w, h, decoded).

    libjpeg scales by 1/2, 1/4 or 1/8 while decoding (an averaging of DCT blocks), to the
    smallest size still at least the target; the Resizer's own interpolation then takes it to
    exactly the size it would give from the full-size decode, and the crop or padding and the
    encoding are the Resizer's. None when it would not save work: not a JPEG, not RGB or grey
    (CMYK conversions differ from OpenCV's), or not a downscale by at least 2. It runs outside
    the Resizer's stdout-swapping lock, so an actor's threads resize in parallel.
    """
    import cv2

    width, height = im.size
    shape = _resized_shape(resizer, width, height)
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or shape is None:
        return None
    if min(width / shape[1], height / shape[0]) < 2:
        return None
    im.draft(im.mode, (shape[1], shape[0]))
    im.load()
    pixels = np.asarray(im)
    if pixels.ndim == 3:
        pixels = pixels[:, :, ::-1]  # OpenCV's channel order
    img = cv2.resize(pixels, (shape[1], shape[0]), interpolation=resizer.downscale_interpolation)
    size = resizer.image_size
    if resizer.resize_mode.name == "center_crop":  # albumentations' CenterCrop coordinates
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[top : top + size, left : left + size]
    elif resizer.resize_mode.name == "border":
        img = _pad_to_square(size)(image=img)["image"]
    ok, encoded = cv2.imencode(f".{resizer.encode_format}", img, params=resizer.encode_params)
    if not ok:
        raise ValueError("encoding failed")
    return encoded.tobytes(), img.shape[1], img.shape[0], im


def _phash_of(body: bytes) -> str:
    from pipeline.data.filters import perceptual_hash

    with Image.open(io.BytesIO(body), formats=FORMATS) as im:
        im.draft("RGB", (64, 64))  # the hash looks at 32x32: JPEGs decode at 1/8 scale
        if im.format in ("JPEG", "MPO"):
            return perceptual_hash(im)
        with _FULL_DECODE:  # other formats decode at full size (within max_pixels)
            return perceptual_hash(im)


def process_image(
    body: bytes, cfg: DownloadConfig, resizer: Any, perceptual_hash: bool = False
) -> ImageResult:
    """Validate downloaded bytes from their header, then resize them with img2dataset's
    semantics (reduced-scale JPEG decoding when ``cfg.fast_resize``); optionally the pHash."""
    try:
        im = Image.open(io.BytesIO(body), formats=FORMATS)  # the header only, decodes nothing
        fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as err:
        return ImageResult(reason="too_many_pixels", error=str(err))
    except Exception as err:  # PIL raises many types on garbage: it is all "not an image"
        return ImageResult(reason="not_an_image", error=f"{type(err).__name__}: {err}")
    with im:
        if width * height > cfg.max_pixels:  # refused before decoding: decompression bombs
            return ImageResult(
                reason="too_many_pixels", error=f"{width}x{height} > {cfg.max_pixels} pixels"
            )
        # OpenCV decodes a cut-off JPEG without complaint, grey below the cut.
        if fmt in ("JPEG", "MPO") and not body.rstrip(b"\x00 \t\r\n").endswith(b"\xff\xd9"):
            return ImageResult(reason="truncated_image", error="JPEG has no end-of-image marker")
        fast = None
        if cfg.fast_resize:
            try:
                fast = _fast_resize(im, resizer)
            except Exception as err:  # what PIL cannot decode, OpenCV will not either
                return ImageResult(reason="decode_error", error=f"{type(err).__name__}: {err}")
        if fast is not None:
            encoded, w, h, decoded = fast
            ow, oh = width, height
            phash = _perceptual_hash(decoded) if perceptual_hash else None
        else:
            with _FULL_DECODE, _RESIZER_LOCK:
                encoded, w, h, ow, oh, err = resizer(io.BytesIO(body))
            if err is not None or encoded is None:
                return ImageResult(reason="decode_error", error=str(err))
            phash = _phash_of(body) if perceptual_hash else None
    return ImageResult(
        jpg=encoded,
        width=w,
        height=h,
        original_width=ow,
        original_height=oh,
        sha256=hashlib.sha256(body).hexdigest(),
        phash=phash,
    )


def _perceptual_hash(im: Image.Image) -> str:
    from pipeline.data.filters import perceptual_hash

    return perceptual_hash(im)


# --------------------------------------------------------------------------- the stage

_IMAGE_COLUMNS = (
    "jpg",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "phash",
)
_INT_COLUMNS = ("width", "height", "original_width", "original_height")


class DownloadStage:
    """Ray Data callable: fetch, validate and resize each live row of a pandas batch.

    Rows whose ``reason`` is already set pass through untouched. A row that fails here gets
    stage="download", its reason and error, and jpg=None.
    """

    def __init__(self, config: dict, perceptual_hashes: bool = False, ledger: Any = None):
        self.cfg = from_dict(DownloadConfig, config)
        self.ledger = ledger  # a CrashLedger actor: batches that killed their actor before
        self.perceptual_hashes = perceptual_hashes
        _networks(self.cfg.allowed_networks)  # a malformed CIDR fails here, not once per row
        self.resizer = make_resizer(self.cfg)
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the threads and actors, not OpenCV
        self.pool = ThreadPoolExecutor(self.cfg.thread_count)  # fetching is I/O bound

    def download(self, url: str) -> ImageResult:
        if not isinstance(url, str) or not url:
            return ImageResult(reason="bad_url", error=f"not a URL: {url!r}")
        try:
            fetched = fetch(url, self.cfg)
            if fetched.body is None:
                return ImageResult(reason=fetched.reason, error=fetched.error)
            return process_image(fetched.body, self.cfg, self.resizer, self.perceptual_hashes)
        except Exception as err:  # one odd URL must not fail a whole batch
            return ImageResult(reason="internal_error", error=f"{type(err).__name__}: {err}")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        out = batch.copy()
        for col in ("stage", "reason", "error"):
            if col not in out.columns:
                out[col] = None
        live_rows = np.flatnonzero(out["reason"].isna().to_numpy())
        attempt, batch_id = 1, None
        if self.ledger is not None and len(live_rows):
            batch_id = hashlib.sha256("|".join(map(str, out["key"])).encode()).hexdigest()
            # Not ray.get: a task blocked in ray.get hands its CPU back, and Ray starts
            # another shard task (a new worker process) in it for every batch.
            attempt = self.ledger.begin.remote(batch_id).future().result()
        if attempt > CRASHES_ALLOWED:
            # Ray Data retries a batch on a new actor as often as the actor dies: one that
            # killed two already is rejected, each of its rows, instead of killing the next.
            error = f"its batch of {len(out)} rows killed a download actor {attempt - 1} times"
            crashed = ImageResult(reason="worker_crash", error=error)
            results = [crashed] * len(live_rows)
        else:
            results = self.pool.map(self.download, out["url"].to_numpy()[live_rows])  # in order

        n = len(out)
        cols = {c: [None] * n for c in _IMAGE_COLUMNS}
        cols.update({c: out[c].astype(object).tolist() for c in ("stage", "reason", "error")})
        for i, res in zip(live_rows, results, strict=True):
            if res.reason is not None:
                updates = {"stage": "download", "reason": res.reason, "error": res.error}
            else:
                updates = {c: getattr(res, c) for c in _IMAGE_COLUMNS}
            for c, value in updates.items():
                cols[c][i] = value
        for c, values in cols.items():
            out[c] = pd.Series(
                values, index=out.index, dtype="Int64" if c in _INT_COLUMNS else object
            )
        # Per-row share of the batch's wall time, so the caller can sum the stage's time.
        out["download_seconds"] = (time.perf_counter() - start) / max(n, 1)
        if batch_id is not None:
            self.ledger.end.remote(batch_id)
        return out


CRASHES_ALLOWED = 2  # actor deaths one batch may cause before its rows are rejected


class CrashLedger:
    """Batches begun and not ended, counted across worker restarts (a Ray actor of the run):
    a batch begun a third time killed its worker twice. It also keeps each shard's last sign
    of progress, for the driver's stall watchdog."""

    def __init__(self):
        self.attempts: dict[str, int] = {}
        self.beats: dict[int, float] = {}

    def beat(self, shard: int) -> None:
        self.beats[shard] = time.monotonic()

    def forget(self, shard: int) -> None:
        self.beats.pop(shard, None)

    def quiet(self, shards: list[int], seconds: float) -> list[int]:
        """The shards among `shards` that started and showed no progress for `seconds` (one
        still queued for a CPU has not started)."""
        now = time.monotonic()
        return [s for s in shards if s in self.beats and now - self.beats[s] > seconds]

    def begin(self, batch_id: str) -> int:
        self.attempts[batch_id] = self.attempts.get(batch_id, 0) + 1
        return self.attempts[batch_id]

    def end(self, batch_id: str) -> None:
        self.attempts.pop(batch_id, None)
