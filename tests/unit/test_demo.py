"""The demo corpus: determinism, class and split bookkeeping, captions, bad URLs, and the server."""

from __future__ import annotations

import http.client
import io
import json
import random
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DemoConfig
from pipeline.demo import (
    BAD_KINDS,
    CLASSES,
    COLOURS,
    EVAL_TEMPLATES,
    RETRIEVAL_TEMPLATES,
    SHAPES,
    TRAIN_TEMPLATES,
    build_demo_corpus,
    classname,
    ensure_demo_corpus,
    heldout_classes,
    serve_demo,
    write_url_list,
)
from pipeline.demo import corpus as corpus_mod
from pipeline.demo.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS, plural
from pipeline.demo.draw import render, sample_scene
from pipeline.schema import RETRIEVAL, URL_LIST

SMALL = DemoConfig(num_train=400, eval_images_per_class=2, num_retrieval=40)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    demo_dir = tmp_path_factory.mktemp("demo")
    return demo_dir, build_demo_corpus(demo_dir, SMALL)


@pytest.fixture(scope="module")
def rows(built) -> list[dict]:
    return pq.read_table(built[0] / "url_paths.parquet").to_pylist()


def _tree(root: Path) -> dict[str, bytes]:
    """Every built file's bytes (urls.parquet is not built: it follows the server's port)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "urls.parquet"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{\w*\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts))


def _mentions(caption: str, colour: str, shape: str) -> bool:
    """Whether a caption names this colour-shape pair, by canonical words or synonyms."""
    for c in (colour, *COLOUR_SYNONYMS[colour]):
        for s in (shape, *SHAPE_SYNONYMS[shape]):
            if re.search(rf"\b{re.escape(c)} ({re.escape(s)}|{re.escape(plural(s))})\b", caption):
                return True
    return False


def test_same_seed_is_byte_identical_and_another_seed_differs(built, tmp_path):
    demo_dir, corpus = built
    again = build_demo_corpus(tmp_path / "again", SMALL)
    assert again == corpus
    assert _tree(tmp_path / "again") == _tree(demo_dir)

    other = build_demo_corpus(tmp_path / "other", DemoConfig(**{**vars(SMALL), "seed": 1}))
    assert other["heldout"] != corpus["heldout"]
    for name in ("url_paths.parquet", "retrieval.parquet", "eval/red_star/0.png"):
        assert (tmp_path / "other" / name).read_bytes() != (demo_dir / name).read_bytes()


def test_64_classes_and_eval_folder_is_consistent(built):
    demo_dir, corpus = built
    assert len(SHAPES) == 8 and len(COLOURS) == 8
    assert len(CLASSES) == len(set(CLASSES)) == 64 and list(CLASSES) == sorted(CLASSES)
    eval_dir = demo_dir / "eval"
    folders = sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
    assert folders == list(CLASSES) == corpus["classes"]
    for folder in folders:
        images = sorted((eval_dir / folder).iterdir())
        assert [p.name for p in images] == [f"{n}.png" for n in range(SMALL.eval_images_per_class)]
        with Image.open(images[0]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    assert (eval_dir / "classnames.txt").read_text().splitlines() == [classname(f) for f in folders]
    assert classname("red_circle") == "red circle"
    templates = (eval_dir / "templates.txt").read_text().splitlines()
    assert templates == list(EVAL_TEMPLATES) and 6 <= len(templates) <= 10
    assert all(t.count("{}") == 1 for t in templates)
    splits = json.loads((eval_dir / "splits.json").read_text())
    assert splits["heldout"] == corpus["heldout"] and splits["seen"] == corpus["seen"]
    assert len(splits["heldout"]) == SMALL.num_heldout
    assert sorted(splits["seen"] + splits["heldout"]) == list(CLASSES)


def test_val_folder_has_every_class_and_no_eval_image(built):
    demo_dir, corpus = built
    val_dir = demo_dir / "val"
    assert sorted(p.name for p in val_dir.iterdir() if p.is_dir()) == list(CLASSES)
    val = {p.read_bytes() for p in val_dir.glob("*/*.png")}
    assert len(val) == 64 * SMALL.val_images_per_class == corpus["num_val_images"]
    # Model selection on val never sees an eval image.
    assert not val & {p.read_bytes() for p in (demo_dir / "eval").glob("*/*.png")}
    assert (val_dir / "templates.txt").read_text() == (demo_dir / "eval/templates.txt").read_text()


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("num_heldout", [1, 6, 8, 20])
def test_heldout_choice_keeps_every_shape_and_colour(seed, num_heldout):
    heldout = heldout_classes(seed, num_heldout)
    assert len(set(heldout)) == num_heldout and set(heldout) <= set(CLASSES)
    seen = set(CLASSES) - set(heldout)
    assert {c.split("_")[1] for c in seen} == set(SHAPES)
    assert {c.split("_")[0] for c in seen} == set(COLOURS)
    assert heldout == heldout_classes(seed, num_heldout)


def test_heldout_pairs_never_appear_in_training(built, rows):
    _, corpus = built
    heldout = corpus["heldout"]
    assert heldout
    assert not {r["label"] for r in rows} & set(heldout)
    for r in rows:
        for pair in heldout:
            assert not _mentions(r["caption"], *pair.split("_")), (pair, r["caption"])
    text = " ".join(r["caption"] for r in rows)
    for word in (*SHAPES, *COLOURS):
        assert re.search(rf"\b{word}", text), word
    # Nor in retrieval: it measures seen pairs only.
    retrieval = pq.read_table(built[0] / "retrieval.parquet")
    for caption in retrieval["caption"].to_pylist():
        assert not any(_mentions(caption, *pair.split("_")) for pair in heldout)


def test_captions_are_sentences_mostly_canonical_and_match_their_label(rows):
    bare = {classname(c) for c in CLASSES}
    for r in rows:
        assert len(r["caption"].split()) >= 3
        assert r["caption"].strip(" .").lower() not in bare
        assert _mentions(r["caption"], *r["label"].split("_")), r
    canonical = [
        bool(re.search(rf"\b{c}\b", r["caption"]) and re.search(rf"\b{s}", r["caption"]))
        for r in rows
        for c, s in [r["label"].split("_")]
    ]
    assert 0.6 <= np.mean(canonical) <= 0.85
    assert len(TRAIN_TEMPLATES) >= 10
    assert len({r["caption"] for r in rows}) > 0.8 * len(rows)


def test_eval_and_retrieval_wording_differs_from_training(built, rows):
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    train_patterns = [_template_regex(t) for t in TRAIN_TEMPLATES]
    eval_patterns = [_template_regex(t) for t in EVAL_TEMPLATES]
    for r in rows:
        assert not any(p.fullmatch(r["caption"]) for p in eval_patterns), r["caption"]
        assert any(p.fullmatch(r["caption"]) for p in train_patterns), r["caption"]
    prompts = [t.format(classname(c)).rstrip(".") for t in EVAL_TEMPLATES for c in CLASSES]
    captions = " | ".join(r["caption"] for r in rows)
    assert not any(p in captions for p in prompts)

    table = pq.read_table(built[0] / "retrieval.parquet")
    assert table.schema.equals(RETRIEVAL) and table.num_rows == SMALL.num_retrieval
    retrieval_patterns = [_template_regex(t) for t in RETRIEVAL_TEMPLATES]
    for caption in table["caption"].to_pylist():
        assert not any(p.fullmatch(caption) for p in train_patterns), caption
        assert any(p.fullmatch(caption) for p in retrieval_patterns), caption
    with Image.open(io.BytesIO(table["image"][0].as_py())) as im:
        im.load()


def test_bad_rows_of_every_kind_and_fraction(built, rows):
    demo_dir, corpus = built
    www = demo_dir / "www"
    kinds = [r["kind"] for r in rows]
    assert len(rows) == SMALL.num_train == corpus["num_rows"]
    assert {k: kinds.count(k) for k in BAD_KINDS} == corpus["bad_counts"]
    assert all(corpus["bad_counts"][k] >= 1 for k in BAD_KINDS)
    assert 0.05 <= corpus["num_bad"] / len(rows) <= 0.10
    assert kinds.count("good") == corpus["num_good"] == len(rows) - corpus["num_bad"]

    good_paths: set[str] = set()
    good_bytes: set[bytes] = set()
    for r in rows:
        file = www / r["path"].lstrip("/")
        kind = r["kind"]
        if kind == "good":
            assert r["path"] not in good_paths
            data = file.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                w, h = im.size
            lo, hi = SMALL.min_image_side, SMALL.max_image_side
            assert lo <= w <= hi and lo <= h <= hi and max(w, h) <= 2 * min(w, h)
            good_paths.add(r["path"])
            good_bytes.add(data)
        elif kind == "missing":
            assert not file.exists()
        elif kind == "server_error":
            assert r["path"].startswith("/status/500/")
        elif kind == "not_image":
            assert r["path"].endswith(".html")
            assert file.read_text().lower().startswith("<!doctype html>")
        elif kind == "truncated":
            data = file.read_bytes()
            assert data.startswith(b"\xff\xd8") and not data.endswith(b"\xff\xd9")
            with pytest.raises(OSError), Image.open(io.BytesIO(data)) as im:
                im.load()
        elif kind == "too_small":
            with Image.open(file) as im:
                im.load()
                assert im.format == "JPEG" and im.size == (16, 16)
        elif kind == "duplicate_url":
            assert r["path"] in good_paths  # repeats an earlier good row
        elif kind == "duplicate_image":
            assert r["path"] not in good_paths
            assert file.read_bytes() in good_bytes  # byte-identical to an earlier good image


def test_good_images_keep_their_colour_after_jpeg(built, rows):
    names, centres = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    for r in [r for r in rows if r["kind"] == "good"][:80]:
        with Image.open(built[0] / "www" / r["path"].lstrip("/")) as im:
            px = np.asarray(im.convert("RGB"), dtype=float).reshape(-1, 3)
        coloured = px[px.max(1) - px.min(1) > 60]  # object pixels; the background is grey
        assert len(coloured) > 0.02 * len(px)
        nearest = names[np.argmin(((centres - np.median(coloured, 0)) ** 2).sum(1))]
        assert nearest == r["label"].split("_")[0], r


def test_objects_stay_inside_the_central_square_on_a_neutral_background():
    for i in range(200):
        rng = random.Random(i)
        w, h = rng.randint(80, 160), rng.randint(80, 160)
        scene = sample_scene(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)), w, h)
        side = min(w, h)
        ox, oy = (w - side) / 2, (h - side) / 2
        assert scene.count in (1, 2, 3)
        for cx, cy, r, _ in scene.objects:
            assert 2 * r >= 0.2 * side
            assert ox <= cx - r and cx + r <= ox + side and oy <= cy - r and cy + r <= oy + side
        px = np.asarray(render(scene), dtype=int)
        outside = np.ones((h, w), bool)
        outside[int(oy) : int(oy) + side, int(ox) : int(ox) + side] = False
        assert (px[outside].max(1) == px[outside].min(1)).all()  # grey: no chroma


def test_url_list_points_at_base_url(built, rows):
    demo_dir, _ = built
    out = write_url_list(demo_dir, "http://127.0.0.1:8123/")
    table = pq.read_table(out)
    assert out == demo_dir / "urls.parquet" and table.schema.equals(URL_LIST)
    assert table["url"].to_pylist() == ["http://127.0.0.1:8123" + r["path"] for r in rows]
    assert table["caption"].to_pylist() == [r["caption"] for r in rows]


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _raw_status(base_url: str, path: str) -> int:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("GET", path, skip_accept_encoding=True)  # sent as is, dots and all
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_server_answers_like_the_web(built, rows, capfd):
    demo_dir, _ = built
    first = {}
    for r in rows:
        first.setdefault(r["kind"], r["path"])
    with serve_demo(demo_dir / "www") as base_url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        status, ctype, body = _get(base_url + first["good"])
        assert (status, ctype) == (200, "image/jpeg")
        assert body == (demo_dir / "www" / first["good"].lstrip("/")).read_bytes()
        assert _get(base_url + first["missing"])[0] == 404
        assert _get(base_url + first["server_error"])[0] == 500
        status, ctype, body = _get(base_url + first["not_image"])
        assert status == 200 and ctype.startswith("text/html") and b"<html>" in body
        assert _get(base_url + "/img/")[0] == 404  # no directory listings
        assert _get(base_url + "/")[0] == 404
        for path in ("/../corpus.json", "/img/../../url_paths.parquet", "/%2e%2e/corpus.json"):
            assert _raw_status(base_url, path) == 404, path
    assert capfd.readouterr().err == ""  # no per-request log lines
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base_url + first["good"], timeout=2)


def test_rebuild_and_reuse(tmp_path, monkeypatch):
    cfg = DemoConfig(num_train=150, eval_images_per_class=1, num_retrieval=8)
    corpus = ensure_demo_corpus(tmp_path, cfg)
    marker = tmp_path / "corpus.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_demo_corpus(tmp_path, cfg) == corpus and marker.stat().st_mtime_ns == stamp

    # A different config rebuilds, and leaves no stale files from the old one.
    smaller = DemoConfig(num_train=100, eval_images_per_class=1, num_retrieval=8)
    assert ensure_demo_corpus(tmp_path, smaller)["num_rows"] == 100
    expected = {r["path"] for r in pq.read_table(tmp_path / "url_paths.parquet").to_pylist()}
    served = {"/" + str(p.relative_to(tmp_path / "www")) for p in (tmp_path / "www").rglob("*.*")}
    assert served <= expected

    # A crash mid-build never leaves a corpus that looks complete.
    def boom(*args):
        raise RuntimeError("crash")

    monkeypatch.setattr(corpus_mod, "_write_retrieval", boom)
    with pytest.raises(RuntimeError):
        build_demo_corpus(tmp_path, cfg)
    assert not marker.exists()


def test_with_the_run_dir_on_a_bucket_the_demo_url_list_is_there(bucket, tmp_path, monkeypatch):
    """The shard tasks of every node read the demo's URL list from the run dir, not from the
    driver's disk: RUN/demo/urls.parquet in the bucket, naming the driver's server."""
    from pipeline import pretrain, storage
    from pipeline.rundir import RunDir
    from pipeline.spec import build_spec, validate

    class Planned(Exception):
        pass

    def run_prepare(spec, run, path, fingerprint, decision, log):
        # The list exists in the bucket while the server runs, and names the server.
        urls = storage.read_parquet(path)["url"].to_pylist()
        raise Planned(path, urls)

    scratch, work = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    work.mkdir()
    monkeypatch.setattr(pretrain, "_run_prepare", run_prepare)
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.chdir(work)
    small = {"demo.num_train": (40, "test"), "demo.num_retrieval": (8, "test"),
             "demo.eval_images_per_class": (1, "test")}  # fmt: skip
    spec = validate(
        build_spec(preset="tiny", run_dir=f"{bucket}/run", stages=("prepare",), flags=small)
    )
    with pytest.raises(Planned) as planned:
        pretrain.prepare(spec, RunDir.at(spec.run_dir), log=lambda line: None)
    path, urls = planned.value.args
    assert path == f"{bucket}/run/demo/urls.parquet"
    assert len(urls) == 40 and all(u.startswith("http://127.0.0.1:") for u in urls)
    # The corpus was built and served from temporary copies, all gone now (other libraries
    # keep temporary folders of their own there).
    left = [p for p in scratch.rglob("*") if "clip-pipeline-" in str(p) or p.suffix == ".parquet"]
    assert left == [] and list(work.iterdir()) == []
