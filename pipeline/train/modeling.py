"""open_clip models: the project's configs, model creation and the local-dir export.

A custom architecture is an open_clip JSON config (pipeline/models/*.json or a
user's file), never a new nn.Module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import open_clip
import torch

from pipeline import storage
from pipeline.config import MODEL_CONFIG_DIR, read_model_config

_registered: set[str] = set()


def resolve_model_name(model: str) -> str:
    """Register the project's configs (and `model` if it is a JSON path); return its name.

    Called in every process that builds a model: open_clip's registry is per process.
    """
    if str(MODEL_CONFIG_DIR) not in _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered.add(str(MODEL_CONFIG_DIR))
    if model.endswith(".json"):
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model config {model!r} does not exist")
        if str(path) not in _registered:
            read_model_config(path)  # a broken file is named, not a bare JSONDecodeError
            open_clip.add_model_config(path)
            _registered.add(str(path))
        return path.stem
    if model not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model!r}: not an open_clip model name nor a .json config "
            f"(e.g. {', '.join(['clip-demo-tiny', 'ViT-B-32', 'RN50'])})"
        )
    return model


def model_config(model: str) -> dict[str, Any]:
    return open_clip.get_model_config(resolve_model_name(model))


def context_length(model: str) -> int:
    return int(model_config(model).get("text_cfg", {}).get("context_length", 77))


@contextlib.contextmanager
def _quiet_root_logger():
    # open_clip logs each creation step, and warns "no pretrained weights" on the root
    # logger; training from scratch (or loading our own checkpoint next) is the point here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def create_model(
    model: str, init_temperature: float = 0.07, init_logit_bias: float | None = None
) -> torch.nn.Module:
    """A freshly initialised open_clip model with logit scale log(1/temperature).

    ``init_logit_bias`` adds the learned bias SigLIP's loss needs.
    """
    extra = {} if init_logit_bias is None else {"init_logit_bias": init_logit_bias}
    with _quiet_root_logger():
        return open_clip.create_model(
            resolve_model_name(model), init_logit_scale=math.log(1.0 / init_temperature), **extra
        )


def preprocess_config(model: torch.nn.Module) -> dict[str, Any]:
    """What open_clip's transforms need, so local-dir loading rebuilds the same preprocessing."""
    cfg = dict(model.visual.preprocess_cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def export_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: str) -> str:
    """Write open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors.

    `out_dir` is a local folder or a URI (RUN/model in a bucket); each file is written whole,
    the weights before the config, so a folder with a config always has its weights.
    Loadable with ``open_clip.create_model_and_transforms('local-dir:' + out_dir)`` (after
    `jobs/export.py --to DIR` when it is a URI).
    """
    from safetensors.torch import save

    out_dir = storage.normalize(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(out_dir, "open_clip_model.safetensors"), save(state))
    if getattr(model, "logit_bias", None) is not None:
        # Without it open_clip would rebuild the model with no bias and refuse the weights.
        model_cfg = {**model_cfg, "init_logit_bias": float(model.logit_bias.detach())}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(model)}
    storage.write_text(
        storage.join(out_dir, "open_clip_config.json"), json.dumps(config, indent=2) + "\n"
    )
    return out_dir


def load_local_dir(path: str | Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, preprocess, tokenizer) from an exported local-dir (or a URI of
    one, copied to a temporary folder while it loads)."""
    if storage.is_uri(path):
        with storage.local_copy(path) as local:
            return load_local_dir(local)
    path = Path(path)
    if not (path / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{path} is not an exported model: no open_clip_config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"{path} has open_clip_config.json but no weights (.safetensors)")
    name = f"local-dir:{path}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)
