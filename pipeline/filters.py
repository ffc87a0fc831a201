"""Filters: predicates returning (keep, reason), applied as a Ray Data stage.

Each predicate looks at one row; the stateful duplicate checks keep a set of
what was seen and run where every row passes once (the driver), so "first
occurrence wins" is deterministic.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable
from typing import Any

import pandas as pd

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
