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
import types


@functools.cache
def modules():
    """img2dataset's downloader and resizer modules, without its package __init__.

    ``import img2dataset`` loads its whole CLI (writers, webdataset, torch): 5-15 s in every
    download actor, for two functions. The two modules are loaded under a bare package
    instead, which is then removed, so a later ``import img2dataset`` still gets the real one.
    albumentations checks PyPI for updates on import unless told not to.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "img2dataset" in sys.modules:  # already imported in full
        from img2dataset import downloader, resizer

        return downloader, resizer
    package = types.ModuleType("img2dataset")
    package.__path__ = list(importlib.util.find_spec("img2dataset").submodule_search_locations)
    sys.modules["img2dataset"] = package
    try:
        downloader = importlib.import_module("img2dataset.downloader")
        resizer = importlib.import_module("img2dataset.resizer")
    finally:
        del sys.modules["img2dataset"]
    return downloader, resizer
