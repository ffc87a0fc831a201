"""pipeline.data.filters (predicates, filter_batch, Deduplicator) and .tokenize, without Ray."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest

from pipeline.config import MODEL_CONFIG_DIR, FilterConfig
from pipeline.data import filters
from pipeline.data.filters import Deduplicator, build_predicates, filter_batch
from pipeline.data.tokenize import Tokenizer, load_tokenizer, tokens_of_alive
from pipeline.train.modeling import context_length, resolve_model_name

CFG = FilterConfig(
    min_image_side=32,
    max_aspect_ratio=3.0,
    min_caption_chars=5,
    max_caption_chars=40,
    min_caption_words=2,
    caption_blocklist=(r"\bstock photo\b", "watermark"),
)
GOOD = "a red circle on grey"


def row(w=64, h=64, caption=GOOD):
    return {"original_width": w, "original_height": h, "caption": caption}


def first_failure(r, cfg=CFG):
    """(reason, detail) of the first predicate that drops `r`, or None."""
    for predicate in build_predicates(cfg):
        keep, reason, detail = predicate(r)
        if not keep:
            assert reason and detail
            return reason, detail
        assert (reason, detail) == (None, None)
    return None


def test_min_image_side_on_the_smaller_side():
    check = filters.min_image_side(CFG)
    assert check(row(32, 32))[0] is True  # the threshold itself passes
    assert check(row(500, 32))[0] is True
    keep, reason, detail = check(row(500, 31))
    assert (keep, reason) == (False, "too_small")
    assert "31" in detail and "32" in detail
    assert check(row(31, 500))[1] == "too_small"


def test_max_aspect_ratio_both_orientations():
    check = filters.max_aspect_ratio(CFG)
    assert check(row(300, 100))[0] is True  # exactly 3.0 is allowed
    assert check(row(100, 300))[0] is True
    for w, h in ((301, 100), (100, 301), (1000, 10)):
        keep, reason, detail = check(row(w, h))
        assert (keep, reason) == (False, "bad_aspect_ratio"), (w, h)
        assert f"{max(w, h) / min(w, h):.2f}" in detail
    # A zero side does not divide by zero.
    assert check(row(10, 0))[1] == "bad_aspect_ratio"


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("a bc", "caption_too_short"),  # 4 characters
        ("   a bc   ", "caption_too_short"),  # surrounding whitespace does not count
        ("abcdefgh", "caption_too_short"),  # long enough, but one word
        ("x" * 20 + " " + "y" * 20, "caption_too_long"),  # 41 characters
        (None, "caption_too_short"),
        ("", "caption_too_short"),
        ("a bcd", None),  # 5 characters, 2 words: both thresholds exactly
        ("x" * 19 + " " + "y" * 20, None),  # 40 characters
    ],
)
def test_caption_length(caption, reason):
    keep, got, detail = filters.caption_length(CFG)(row(caption=caption))
    assert got == reason
    assert keep is (reason is None)
    if reason == "caption_too_short" and caption and len(caption.strip()) >= 5:
        assert "1 word" in detail  # the word count, not the character count, dropped it


def test_caption_blocklist_is_case_insensitive_regex():
    check = filters.caption_blocklist(CFG)
    for caption in ("Red circle, STOCK PHOTO", "a WaterMarked square", "stock photo"):
        keep, reason, detail = check(row(caption=caption))
        assert (keep, reason) == (False, "caption_blocklisted"), caption
    assert "stock photo" in check(row(caption="Stock Photo of a star"))[2]
    # \b in the pattern is honoured: it is a regular expression, not a substring.
    assert check(row(caption="stock photography of a star"))[0] is True
    assert check(row(caption=None))[0] is True
    assert check(row(caption=GOOD))[0] is True


def test_blocklist_only_applies_when_configured():
    assert len(build_predicates(dataclasses.replace(CFG, caption_blocklist=()))) == 3
    no_list = dataclasses.replace(CFG, caption_blocklist=())
    assert first_failure(row(caption="a watermark here"), no_list) is None
    assert first_failure(row(caption="a watermark here"))[0] == "caption_blocklisted"


def test_predicates_in_order_first_failure_wins():
    assert first_failure(row()) is None
    # Both too small and a bad caption: the image check comes first.
    assert first_failure(row(10, 10, caption="x"))[0] == "too_small"
    assert first_failure(row(100, 10, caption="x"))[0] == "too_small"
    assert first_failure(row(200, 40, caption="x"))[0] == "bad_aspect_ratio"
    assert first_failure(row(64, 64, caption="x"))[0] == "caption_too_short"


def _batch() -> pd.DataFrame:
    """A batch as the download stage hands it on: some rows already rejected there."""
    rows = [
        # key, caption, size, already rejected (stage, reason, error)
        ("k0", GOOD, (64, 64), None),
        ("k1", GOOD, (16, 16), None),  # too small
        ("k2", "one", (64, 64), None),  # caption too short
        ("k3", GOOD, None, ("download", "http_404", "404 Not Found")),
        ("k4", "a watermark on a star", (80, 64), None),  # blocklisted
        ("k5", GOOD, (200, 50), None),  # aspect 4
        ("k6", None, None, ("download", "timeout", "timed out")),  # would fail filters too
        ("k7", "two words", (40, 100), None),
    ]
    data = {
        c: []
        for c in (
            "key",
            "url",
            "caption",
            "stage",
            "reason",
            "error",
            "jpg",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
        )
    }
    for key, caption, size, rejected in rows:
        data["key"].append(key)
        data["url"].append(f"http://example.com/{key}.jpg")
        data["caption"].append(caption)
        stage, reason, error = rejected or (None, None, None)
        data["stage"].append(stage)
        data["reason"].append(reason)
        data["error"].append(error)
        data["jpg"].append(None if rejected else f"jpeg-{key}".encode())
        data["width"].append(None if rejected else 64)
        data["height"].append(None if rejected else 64)
        data["original_width"].append(size[0] if size else None)
        data["original_height"].append(size[1] if size else None)
        data["sha256"].append(None if rejected else f"sha-{key}")
    frame = pd.DataFrame(data)
    for c in ("stage", "reason", "error", "jpg", "sha256", "caption"):
        frame[c] = frame[c].astype(object)
    for c in ("width", "height", "original_width", "original_height"):
        frame[c] = frame[c].astype("Int64")
    # A non-default index, as a slice of a larger frame has: positions must not be labels.
    frame.index = pd.RangeIndex(100, 100 + len(frame))
    return frame


def test_filter_batch_marks_only_newly_rejected_rows():
    before = _batch()
    after = filter_batch(before.copy(), dataclasses.asdict(CFG))
    assert len(after) == len(before)
    assert list(after.index) == list(before.index)
    assert list(after["key"]) == list(before["key"])
    by_key = after.set_index("key")
    expected = {
        "k0": None,
        "k1": "too_small",
        "k2": "caption_too_short",
        "k3": "http_404",
        "k4": "caption_blocklisted",
        "k5": "bad_aspect_ratio",
        "k6": "timeout",
        "k7": None,
    }
    got = {k: (None if pd.isna(v) else v) for k, v in by_key["reason"].items()}
    assert got == expected

    old = before.set_index("key")
    for key, reason in expected.items():
        r, o = by_key.loc[key], old.loc[key]
        if reason is None:  # kept: untouched
            assert pd.isna(r["stage"]) and pd.isna(r["error"])
            assert r["jpg"] == o["jpg"] == f"jpeg-{key}".encode()
        elif not pd.isna(o["reason"]):  # rejected upstream: untouched
            assert (r["stage"], r["reason"], r["error"]) == (o["stage"], o["reason"], o["error"])
        else:  # newly rejected: stage, reason and detail set; image dropped
            assert r["stage"] == "filter"
            assert isinstance(r["error"], str) and r["error"]
            assert r["jpg"] is None or pd.isna(r["jpg"])
            # Everything else about the row is kept for the rejects file.
            assert r["url"] == o["url"] and r["sha256"] == o["sha256"]
    assert "filter_seconds" in after.columns
    assert (after["filter_seconds"] >= 0).all()
    # The caller's frame is not modified.
    pd.testing.assert_frame_equal(before, _batch())


def test_filter_batch_with_default_config_keeps_the_good_rows():
    after = filter_batch(_batch(), dataclasses.asdict(FilterConfig()))
    reasons = dict(zip(after["key"], after["reason"], strict=True))
    assert pd.isna(reasons["k0"]) and pd.isna(reasons["k7"])
    assert pd.isna(reasons["k4"])  # no blocklist by default
    assert reasons["k1"] == "too_small"


def test_deduplicator_keeps_first_occurrence_only():
    dedup = Deduplicator("duplicate_image")
    values = ["a", "b", "a", "c", "b", "a", "d"]
    verdicts = [dedup(v) for v in values]
    assert [keep for keep, _, _ in verdicts] == [True, True, False, True, False, False, True]
    for (keep, reason, detail), value in zip(verdicts, values, strict=True):
        if keep:
            assert (reason, detail) == (None, None)
        else:
            assert reason == "duplicate_image"
            assert value in detail
    # A separate instance has its own memory.
    assert Deduplicator("duplicate_url")("a") == (True, None, None)


CAPTIONS = [
    "a red circle on a grey background",
    "A Photo of TWO blue stars, at dusk!",
    "an extremely long caption " + "that keeps going " * 20,  # truncated to the context
    "émoji 🙂 and ünïcode, Ελληνικά, 日本語のキャプション",
    "rejected upstream",
    "&amp; html &lt;b&gt;entities&lt;/b&gt; and   odd\tspacing\n",
    "",
    "it's we'll they've 1234 5.6 -- ???",
]


@pytest.mark.parametrize("model", ["clip-demo-tiny", "ViT-B-32", "config-file"])
def test_tokens_equal_open_clip(model, tmp_path):
    if model == "config-file":  # a user's JSON config with a short context: truncation
        config = json.loads((MODEL_CONFIG_DIR / "clip-demo-tiny.json").read_text())
        config["text_cfg"]["context_length"] = 8
        model = str(tmp_path / "short-context.json")
        Path(model).write_text(json.dumps(config))
    ours = load_tokenizer(model)
    assert isinstance(ours, Tokenizer)  # open_clip's BPE loaded without its package
    expected = open_clip.get_tokenizer(resolve_model_name(model))(CAPTIONS).numpy()
    assert expected.shape == (len(CAPTIONS), context_length(model))
    got = ours(CAPTIONS)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert ours([]).shape == (0, context_length(model))


def test_tokenizers_that_need_torch_are_open_clips_own(tmp_path):
    """A config whose tokenizer reduces long captions (torch's random masks) is not given the
    BPE path: open_clip builds it, and its tokens come back as int32 like the others."""
    config = json.loads((MODEL_CONFIG_DIR / "clip-demo-tiny.json").read_text())
    config["text_cfg"]["tokenizer_kwargs"] = {"reduction_mask": "shuffle"}
    model = tmp_path / "reduced.json"
    model.write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(model))
    assert not isinstance(tokenizer, Tokenizer)
    tokens = tokenizer(CAPTIONS[:3])
    assert tokens.dtype == np.int32 and tokens.shape == (3, context_length(str(model)))
    assert tokenizer([]).shape == (0, context_length(str(model)))


@pytest.mark.parametrize("load", [load_tokenizer, resolve_model_name])
def test_a_broken_model_config_is_named(load, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"embed_dim": 96,')
    with pytest.raises(ValueError, match=r"model config '.*broken\.json' is not valid JSON"):
        load(str(broken))


def test_tokens_of_alive_rows_only():
    tokenizer = load_tokenizer("clip-demo-tiny")
    reasons = [None, None, None, None, "http_404", None, None, None]
    batch = pd.DataFrame(
        {"key": [f"k{i}" for i in range(len(CAPTIONS))], "caption": CAPTIONS, "reason": reasons},
        index=pd.RangeIndex(50, 50 + len(CAPTIONS)),
        dtype=object,
    )
    tokens = tokens_of_alive(batch, tokenizer)
    expected = tokenizer(CAPTIONS).tolist()
    for i, reason in enumerate(reasons):
        assert tokens[i] == (None if reason else expected[i])
        assert reason or all(type(t) is int for t in tokens[i])
    # Different captions give different tokens (the comparison is not vacuous).
    assert tokens[0] != tokens[1]
    rejected = batch.assign(reason="too_small")
    assert tokens_of_alive(rejected, tokenizer) == [None] * len(CAPTIONS)


def test_tokenizing_imports_no_torch():
    """The point of the BPE path: a fresh process tokenizes without importing torch, and a
    later `import torch` there still gets the real torch."""
    code = (
        "import sys; from pipeline.data.tokenize import load_tokenizer\n"
        "t = load_tokenizer('clip-demo-tiny')(['a red circle'])\n"
        "print('torch' in sys.modules, t[0, :3].tolist())\n"
        "import torch; print(torch.zeros(2).sum().item())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split("\n")  # fmt: skip
    expected = open_clip.get_tokenizer(resolve_model_name("clip-demo-tiny"))(["a red circle"])
    assert out[0] == f"False {expected[0, :3].tolist()}"
    assert out[1] == "0.0"


def _random_hashes(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.integers(0, 2**63, n, dtype=np.int64) * 2 + rng.integers(0, 2, n)]


@pytest.mark.parametrize("distance", [0, 2, 4, 7])
def test_near_duplicate_index_finds_exactly_what_brute_force_finds(distance):
    from pipeline.data.filters import NearDuplicateIndex

    rng = np.random.default_rng(distance)
    indexed = _random_hashes(300, 1)
    index = NearDuplicateIndex(distance, "near_duplicate", [f"{h:016x}" for h in indexed])
    # Queries: random (far from everything) and indexed hashes with 0..distance+2 bits flipped.
    queries = _random_hashes(200, 2)
    for h in indexed[:100]:
        flips = rng.choice(64, size=int(rng.integers(0, distance + 3)), replace=False)
        queries.append(h ^ sum(1 << int(b) for b in flips))
    for q in queries:
        nearest = min((q ^ h).bit_count() for h in indexed)
        hit = index.nearest(f"{q:016x}")
        if nearest <= distance:
            assert hit is not None and hit[0] == nearest
        else:
            assert hit is None


def test_near_duplicate_index_keeps_the_first_and_drops_the_copy():
    from pipeline.data.filters import NearDuplicateIndex

    index = NearDuplicateIndex(2, "near_duplicate")
    assert index("00000000000000ff") == (True, None, None)
    keep, reason, detail = index("00000000000000fc")  # 2 bits away
    assert (keep, reason) == (False, "near_duplicate") and "2 bits" in detail
    assert index("0000000000000f00")[0] is True  # 8 bits away: a different image
    assert index(None)[0] is True  # no hash (not computed): nothing to compare
    with pytest.raises(ValueError, match="0..15"):
        NearDuplicateIndex(16, "near_duplicate")


def test_perceptual_hash_matches_resized_copies_not_other_images():
    from PIL import Image

    from pipeline.data.filters import perceptual_hash

    rng = np.random.default_rng(0)

    def photo(seed):
        coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize((320, 240), Image.BICUBIC)

    def distance(a, b):
        return (int(perceptual_hash(a), 16) ^ int(perceptual_hash(b), 16)).bit_count()

    original = photo(1)
    noisy = np.asarray(original, np.int16) + rng.normal(0, 3, (240, 320, 3)).astype(np.int16)
    assert distance(original, original.resize((120, 90))) <= 2
    assert distance(original, Image.fromarray(noisy.clip(0, 255).astype(np.uint8))) <= 2
    assert min(distance(original, photo(s)) for s in range(2, 12)) > 10
