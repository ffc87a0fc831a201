"""img2dataset's downloader and resizer modules, loaded without its heavy package __init__.

The only place that imports img2dataset: fetch.py uses its X-Robots-Tag parser, download.py
its Resizer.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import types

_LOAD = threading.Lock()


@functools.cache
def _module(name: str) -> types.ModuleType:
    """img2dataset's `name` module, without its package __init__.

    ``import img2dataset`` loads its whole CLI (writers, webdataset, torch): 5-15 s in every
    worker process, for two functions. Each module is loaded under a bare package instead,
    which is then removed, so a later ``import img2dataset`` still gets the real one.
    albumentations checks PyPI for updates on import unless told not to.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with _LOAD:
        if "img2dataset" in sys.modules:  # already imported in full
            return importlib.import_module(f"img2dataset.{name}")
        package = types.ModuleType("img2dataset")
        package.__path__ = list(importlib.util.find_spec("img2dataset").submodule_search_locations)
        sys.modules["img2dataset"] = package
        try:
            return importlib.import_module(f"img2dataset.{name}")
        finally:
            del sys.modules["img2dataset"]


def downloader() -> types.ModuleType:
    """Its X-Robots-Tag parser's module (it imports wandb: loaded only for such a header)."""
    return _module("downloader")


def resizer() -> types.ModuleType:
    """Its Resizer's module (albumentations, OpenCV)."""
    return _module("resizer")
