"""Filters: predicates returning (keep, reason), applied as a Ray Data stage.

Each predicate looks at one row; the stateful duplicate checks keep a set of
what was seen and run where every row passes once (the driver), so "first
occurrence wins" is deterministic.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from pipeline.config import FilterConfig, from_dict

Verdict = tuple[bool, str | None, str | None]  # keep, reason, detail
Predicate = Callable[[dict[str, Any]], Verdict]

KEEP: Verdict = (True, None, None)


def min_image_side(cfg: FilterConfig) -> Predicate:
    def check(row: dict[str, Any]) -> Verdict:
        side = min(row["original_width"], row["original_height"])
        if side < cfg.min_image_side:
            return False, "too_small", f"smallest side {side} px < {cfg.min_image_side}"
        return KEEP

    return check


def max_aspect_ratio(cfg: FilterConfig) -> Predicate:
    def check(row: dict[str, Any]) -> Verdict:
        w, h = row["original_width"], row["original_height"]
        ratio = max(w, h) / max(1, min(w, h))
        if ratio > cfg.max_aspect_ratio:
            return False, "bad_aspect_ratio", f"aspect ratio {ratio:.2f} > {cfg.max_aspect_ratio}"
        return KEEP

    return check


def caption_length(cfg: FilterConfig) -> Predicate:
    def check(row: dict[str, Any]) -> Verdict:
        caption = (row["caption"] or "").strip()
        if len(caption) < cfg.min_caption_chars:
            return False, "caption_too_short", f"{len(caption)} characters"
        if len(caption) > cfg.max_caption_chars:
            return False, "caption_too_long", f"{len(caption)} characters"
        words = len(caption.split())
        if words < cfg.min_caption_words:
            return False, "caption_too_short", f"{words} word(s)"
        return KEEP

    return check


def caption_blocklist(cfg: FilterConfig) -> Predicate:
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.caption_blocklist]

    def check(row: dict[str, Any]) -> Verdict:
        for pattern in patterns:
            if pattern.search(row["caption"] or ""):
                return False, "caption_blocklisted", f"matches {pattern.pattern!r}"
        return KEEP

    return check


def build_predicates(cfg: FilterConfig) -> list[Predicate]:
    predicates = [min_image_side(cfg), max_aspect_ratio(cfg), caption_length(cfg)]
    if cfg.caption_blocklist:
        predicates.append(caption_blocklist(cfg))
    return predicates


class Deduplicator:
    """Exact-duplicate check: the first occurrence of a value is kept, later ones dropped."""

    def __init__(self, reason: str):
        self.reason = reason
        self.seen: set[Hashable] = set()

    def __call__(self, value: Hashable) -> Verdict:
        if value in self.seen:
            return False, self.reason, f"same as an earlier row ({str(value)[:80]})"
        self.seen.add(value)
        return KEEP


def perceptual_hash(image: Image.Image) -> str:
    """imagehash's 64-bit DCT hash as 16 hex digits; near-identical images are a few bits apart.

    Computed on the decoded original (a JPEG may be decoded at reduced scale: the hash only
    looks at a 32x32 thumbnail), so a resized or re-encoded copy hashes alike.
    """
    import imagehash

    return str(imagehash.phash(image.convert("L")))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def hash_image_folder(folder: str | Path) -> list[str]:
    """Perceptual hashes of every image under ``folder`` (any depth), e.g. an eval set."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--decontaminate: {str(folder)!r} is not a folder of images")
    hashes = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))  # JPEGs: decode at reduced scale, the hash needs 32 px
                hashes.append(perceptual_hash(im))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # an unreadable eval file cannot leak into training
    if not hashes:
        raise ValueError(f"--decontaminate: no readable images under {str(folder)!r}")
    return hashes


class NearDuplicateIndex:
    """64-bit hashes searchable within a Hamming distance, in time independent of their count.

    Multi-index hashing: split each hash into distance+1 bands; two hashes at most `distance`
    bits apart agree exactly on at least one band (pigeonhole), so only the hashes sharing a
    band value are compared bit by bit.
    """

    def __init__(self, max_distance: int, reason: str, hashes: Iterable[str] = ()):
        if not 0 <= max_distance <= 15:
            raise ValueError(f"near-duplicate distance {max_distance} is not within 0..15")
        self.max_distance, self.reason = max_distance, reason
        bands = max_distance + 1
        width = 64 // bands
        self.bands = [(i * width, 64 if i == bands - 1 else (i + 1) * width) for i in range(bands)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        for h in hashes:
            self.add(h)

    def _band_values(self, value: int) -> list[int]:
        return [(value >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def nearest(self, hex_hash: str) -> tuple[int, int] | None:
        """(distance, hash) of an indexed hash within the distance, or None."""
        value = int(hex_hash, 16)
        best = None
        for table, band in zip(self.tables, self._band_values(value), strict=True):
            for other in table.get(band, ()):
                d = (value ^ other).bit_count()
                if d <= self.max_distance and (best is None or d < best[0]):
                    best = (d, other)
        return best

    def add(self, hex_hash: str) -> None:
        value = int(hex_hash, 16)
        for table, band in zip(self.tables, self._band_values(value), strict=True):
            table.setdefault(band, []).append(value)

    def __call__(self, hex_hash: str | None, add: bool = True) -> Verdict:
        """Drop a hash near an indexed one; otherwise keep it (and index it when `add`)."""
        if hex_hash is None:
            return KEEP
        hit = self.nearest(hex_hash)
        if hit is not None:
            return False, self.reason, f"phash {hex_hash} is {hit[0]} bits from {hit[1]:016x}"
        if add:
            self.add(hex_hash)
        return KEEP


def filter_batch(batch: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    """Ray Data stage: applies the row predicates to the rows that are still alive.

    Building the predicates per batch costs microseconds, so this runs as plain tasks.
    """
    start = time.perf_counter()
    predicates = build_predicates(from_dict(FilterConfig, config))
    batch = batch.copy()
    for index, row in zip(batch.index, batch.to_dict("records"), strict=True):
        if not pd.isna(row["reason"]):
            continue
        for predicate in predicates:
            keep, reason, detail = predicate(row)
            if not keep:
                batch.loc[index, ["stage", "reason", "error", "jpg"]] = [
                    "filter",
                    reason,
                    detail,
                    None,
                ]
                break
    batch["filter_seconds"] = (time.perf_counter() - start) / max(1, len(batch))
    return batch
