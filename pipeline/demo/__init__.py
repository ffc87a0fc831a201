"""The built-in demo corpus: 64 classes of drawn shapes (8 shapes x 8 colours), served over a
loopback HTTP server with a realistic share of bad URLs, plus a zero-shot eval image folder (with
held-out shape-colour pairs) and a retrieval set.

Typical use::

    corpus = ensure_demo_corpus(demo_dir, cfg.demo)
    with serve_demo(demo_dir / "www") as base_url:
        urls = write_url_list(demo_dir, base_url)
        ...  # download from urls while the server runs
"""

from pipeline.demo.captions import EVAL_TEMPLATES, RETRIEVAL_TEMPLATES, TRAIN_TEMPLATES
from pipeline.demo.corpus import (
    BAD_KINDS,
    CLASSES,
    CORPUS_JSON,
    URL_PATHS,
    URLS,
    build_demo_corpus,
    classname,
    ensure_demo_corpus,
    heldout_classes,
    load_demo_corpus,
    write_url_list,
)
from pipeline.demo.draw import COLOURS, SHAPES
from pipeline.demo.server import serve_demo

__all__ = [
    "BAD_KINDS",
    "CLASSES",
    "COLOURS",
    "CORPUS_JSON",
    "EVAL_TEMPLATES",
    "RETRIEVAL_TEMPLATES",
    "SHAPES",
    "TRAIN_TEMPLATES",
    "URLS",
    "URL_PATHS",
    "build_demo_corpus",
    "classname",
    "ensure_demo_corpus",
    "heldout_classes",
    "load_demo_corpus",
    "serve_demo",
    "write_url_list",
]
