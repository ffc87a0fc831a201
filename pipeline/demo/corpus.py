"""Build the demo corpus: served training files with their URL list, an eval image folder and a
retrieval set, all a pure function of ``DemoConfig``.

Every random draw comes from ``random.Random(f"{seed}/{stream}/{index}")`` (string seeds hash
with SHA-512, independent of PYTHONHASHSEED), so one image never depends on how many were drawn
before it, eval and retrieval images never repeat training ones, and the same seed rebuilds
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import DemoConfig, config_hash
from pipeline.demo.captions import EVAL_TEMPLATES, retrieval_caption, train_caption
from pipeline.demo.draw import COLOURS, SHAPES, Scene, render, sample_scene
from pipeline.schema import RETRIEVAL, URL_LIST

CLASSES = tuple(sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES))  # eval folder names

# Deliberately bad rows, one kind per way a web URL list goes wrong. "good" marks the rest.
BAD_KINDS = (
    "missing",  # 404: nothing at the path
    "server_error",  # 500: under /status/500/
    "not_image",  # an HTML page, served as text/html
    "truncated",  # a real JPEG cut to 60% of its bytes: no FFD9 end marker
    "too_small",  # a valid 16x16 JPEG
    "duplicate_url",  # an exact repeat of an earlier good row's path
    "duplicate_image",  # another path serving a byte-identical copy of an earlier good image
)

JPEG_QUALITY = 90  # typical of web images; keeps colours intact
EVAL_SIDE = 64  # eval images are stored at training resolution; open_clip resizes anyway
TRUNCATE_AT = 0.6
TINY_SIDE = 16

URL_PATHS = "url_paths.parquet"  # path, caption, kind, label: the port-free URL list
URLS = "urls.parquet"  # written by write_url_list once the server's port is known
CORPUS_JSON = "corpus.json"  # written last: its presence means the corpus is complete
_OUTPUTS = ("www", "eval", "val", URL_PATHS, URLS, "retrieval.parquet")

_HTML = """<!doctype html>
<html><head><title>Photo gallery</title></head>
<body><h1>Gallery</h1><p>This page moved. Browse our shapes collection instead.</p></body></html>
"""


def classname(folder: str) -> str:
    """'red_circle' -> 'red circle'."""
    return folder.replace("_", " ")


def heldout_classes(seed: int, num_heldout: int) -> list[str]:
    """Shape-colour pairs kept out of training: seed-shifted diagonals of the 8x8 grid.

    Each diagonal takes one colour per shape and one shape per colour, so up to 48 held-out
    pairs (six diagonals) still leave every shape and every colour at least twice in training.
    """
    if not 0 <= num_heldout <= 48:
        raise ValueError(f"num_heldout must be in [0, 48], got {num_heldout}")
    colours = list(COLOURS)
    shape_order = list(range(len(SHAPES)))
    random.Random(f"{seed}/heldout").shuffle(shape_order)
    out = []
    for k in range(num_heldout):
        s = shape_order[k % len(SHAPES)]
        c = (s + seed + k // len(SHAPES)) % len(colours)
        out.append(f"{colours[c]}_{SHAPES[s]}")
    return sorted(out)


def _split(folder: str) -> tuple[str, str]:
    colour, shape = folder.split("_")
    return colour, shape


def _image_size(rng: random.Random, cfg: DemoConfig) -> tuple[int, int]:
    """Each side in [min, max], aspect ratio at most 2."""
    lo, hi = cfg.min_image_side, cfg.max_image_side
    w = rng.randint(lo, hi)
    h = rng.randint(max(lo, (w + 1) // 2), min(hi, 2 * w))
    return (w, h) if rng.random() < 0.5 else (h, w)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _bad_counts(cfg: DemoConfig) -> dict[str, int]:
    """About bad_fraction of the rows, split evenly, at least one of each kind."""
    if cfg.bad_fraction <= 0:
        return dict.fromkeys(BAD_KINDS, 0)
    total = max(len(BAD_KINDS), round(cfg.num_train * cfg.bad_fraction))
    base, extra = divmod(total, len(BAD_KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(BAD_KINDS)}


def _write_train(demo_dir: Path, cfg: DemoConfig, seen: list[str]) -> dict[str, int]:
    """Write www/ and url_paths.parquet; return the per-kind row counts."""
    counts = _bad_counts(cfg)
    num_bad = sum(counts.values())
    if cfg.num_train < 2 * num_bad + 1:
        raise ValueError(f"num_train={cfg.num_train} is too small for {num_bad} bad rows")
    kinds = [k for k, n in counts.items() for _ in range(n)]
    kinds += ["good"] * (cfg.num_train - len(kinds))
    rng = random.Random(f"{cfg.seed}/rows")
    rng.shuffle(kinds)
    # Duplicates need an earlier good row to copy: make the first row good.
    first_good = kinds.index("good")
    kinds[0], kinds[first_good] = kinds[first_good], kinds[0]

    (demo_dir / "www" / "img").mkdir(parents=True)
    (demo_dir / "www" / "page").mkdir()
    rows: dict[str, list[str]] = {"path": [], "caption": [], "kind": [], "label": []}
    good: list[tuple[int, Scene]] = []  # (row, scene) of good rows so far
    for i, kind in enumerate(kinds):
        r = random.Random(f"{cfg.seed}/train/{i}")
        label = r.choice(seen)
        colour, shape = _split(label)
        scene = sample_scene(r, shape, colour, *_image_size(r, cfg))
        caption = train_caption(r, scene)
        path = f"/img/{i:06d}.jpg"
        data: bytes | None = None
        if kind in ("good", "truncated"):
            data = _jpeg(render(scene))
            if kind == "truncated":
                # Entropy-coded data never holds FF D9, so the cut leaves no end marker.
                data = data[: int(len(data) * TRUNCATE_AT)]
        elif kind == "too_small":
            data = _jpeg(render(sample_scene(r, scene.shape, scene.colour, TINY_SIDE, TINY_SIDE)))
        elif kind == "not_image":
            path = f"/page/{i:06d}.html"
            data = _HTML.encode()
        elif kind == "server_error":
            path = f"/status/500{path}"
        elif kind in ("duplicate_url", "duplicate_image"):
            src, scene = r.choice(good)
            label = f"{scene.colour}_{scene.shape}"
            if kind == "duplicate_url":
                path = rows["path"][src]
                if r.random() < 0.5:  # same URL, sometimes scraped with another alt text
                    caption = rows["caption"][src]
                else:
                    caption = train_caption(r, scene)
            else:
                data = (demo_dir / "www" / rows["path"][src].lstrip("/")).read_bytes()
                caption = train_caption(r, scene)
        if data is not None:
            (demo_dir / "www" / path.lstrip("/")).write_bytes(data)
        if kind == "good":
            good.append((i, scene))
        for key, value in (("path", path), ("caption", caption), ("kind", kind), ("label", label)):
            rows[key].append(value)
    pq.write_table(pa.table(rows), demo_dir / URL_PATHS)
    return {"good": len(good), **counts}


def _write_labelled(
    demo_dir: Path, cfg: DemoConfig, heldout: list[str], name: str, per_class: int
) -> None:
    """NAME/<class>/<n>.png for all 64 classes, plus classnames, templates and splits.

    The random stream is named after the folder, so eval and val images never coincide.
    """
    eval_dir = demo_dir / name
    for folder in CLASSES:
        (eval_dir / folder).mkdir(parents=True)
        colour, shape = _split(folder)
        for n in range(per_class):
            r = random.Random(f"{cfg.seed}/{name}/{folder}/{n}")
            side = r.randint(cfg.min_image_side, cfg.max_image_side)
            # Drawn at served size, then reduced as the pipeline would: same look as training.
            image = render(sample_scene(r, shape, colour, side, side))
            image = image.resize((EVAL_SIDE, EVAL_SIDE), Image.Resampling.BICUBIC)
            image.save(eval_dir / folder / f"{n}.png")
    (eval_dir / "classnames.txt").write_text("".join(classname(c) + "\n" for c in CLASSES))
    (eval_dir / "templates.txt").write_text("".join(t + "\n" for t in EVAL_TEMPLATES))
    seen = [c for c in CLASSES if c not in heldout]
    splits = {"seen": seen, "heldout": sorted(heldout)}
    (eval_dir / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")


def _write_retrieval(demo_dir: Path, cfg: DemoConfig, seen: list[str]) -> None:
    images, captions = [], []
    for j in range(cfg.num_retrieval):
        r = random.Random(f"{cfg.seed}/retrieval/{j}")
        colour, shape = _split(r.choice(seen))
        scene = sample_scene(r, shape, colour, *_image_size(r, cfg))
        images.append(_jpeg(render(scene)))
        captions.append(retrieval_caption(r, scene))
    table = pa.table({"image": images, "caption": captions}, schema=RETRIEVAL)
    pq.write_table(table, demo_dir / "retrieval.parquet")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_demo_corpus(demo_dir: str | Path, cfg: DemoConfig) -> dict:
    """Build the whole corpus under ``demo_dir`` (replacing an earlier one); returns corpus.json."""
    demo_dir = Path(demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    # Remove the completion marker first: a crash from here on leaves no "complete" corpus.
    (demo_dir / CORPUS_JSON).unlink(missing_ok=True)
    for name in _OUTPUTS:
        target = demo_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    heldout = heldout_classes(cfg.seed, cfg.num_heldout)
    seen = [c for c in CLASSES if c not in heldout]
    counts = _write_train(demo_dir, cfg, seen)
    _write_labelled(demo_dir, cfg, heldout, "eval", cfg.eval_images_per_class)
    # A small validation folder for zero-shot probes during training and sweeps: model
    # selection never looks at the final eval images.
    _write_labelled(demo_dir, cfg, heldout, "val", cfg.val_images_per_class)
    _write_retrieval(demo_dir, cfg, seen)

    corpus = {
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "classes": list(CLASSES),
        "seen": seen,
        "heldout": heldout,
        "num_rows": cfg.num_train,
        "num_good": counts["good"],
        "num_bad": cfg.num_train - counts["good"],
        "bad_counts": {k: counts[k] for k in BAD_KINDS},
        "num_eval_images": len(CLASSES) * cfg.eval_images_per_class,
        "num_val_images": len(CLASSES) * cfg.val_images_per_class,
        "num_retrieval": cfg.num_retrieval,
        "paths": {
            "www": "www",
            "url_paths": URL_PATHS,
            "urls": URLS,
            "eval": "eval",
            "val": "val",
            "retrieval": "retrieval.parquet",
        },
    }
    _write_atomic(demo_dir / CORPUS_JSON, json.dumps(corpus, indent=2) + "\n")
    return corpus


def load_demo_corpus(demo_dir: str | Path, cfg: DemoConfig) -> dict | None:
    """corpus.json if a complete corpus built from this exact config is there, else None."""
    path = Path(demo_dir) / CORPUS_JSON
    if not path.is_file():
        return None
    corpus = json.loads(path.read_text())
    return corpus if corpus.get("config_hash") == config_hash(cfg) else None


def ensure_demo_corpus(demo_dir: str | Path, cfg: DemoConfig) -> dict:
    """Reuse a complete corpus built from the same config, or build one."""
    return load_demo_corpus(demo_dir, cfg) or build_demo_corpus(demo_dir, cfg)


def write_url_list(demo_dir: str | Path, base_url: str) -> Path:
    """Write ``demo_dir/urls.parquet`` (url, caption) pointing at a server at ``base_url``."""
    demo_dir = Path(demo_dir)
    rows = pq.read_table(demo_dir / URL_PATHS, columns=["path", "caption"]).to_pydict()
    base = base_url.rstrip("/")
    table = pa.table(
        {"url": [base + p for p in rows["path"]], "caption": rows["caption"]}, schema=URL_LIST
    )
    out = demo_dir / URLS
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out
