"""Captions to tokens with the open_clip tokenizer of the configured model, without torch.

Prepare's shard tasks tokenize in fresh Ray worker processes. `import open_clip` costs 4-5
CPU-seconds there (its package imports torch, torchvision and every model), more than
downloading and resizing a shard of a few hundred images on a quiet machine. open_clip's
BPE tokenizer itself is pure Python: its module imports torch only to build the output
tensor (and for type annotations). So for the models that use it (every open_clip model
whose config names no Hugging Face tokenizer, SigLIP aside), `load_tokenizer` loads
open_clip's own `tokenizer.py` on its own, with a placeholder for torch while it runs, and
pads and truncates with numpy exactly as `SimpleTokenizer.__call__` does. The other models
get `open_clip.get_tokenizer`. Either way the tokens are open_clip's (tests compare them).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import MODEL_CONFIG_DIR, read_model_config


class Tokenizer:
    """captions -> int32 array [len(captions), context_length], open_clip's tokens."""

    def __init__(self, encode, sot: int, eot: int, context_length: int):
        self.encode, self.sot, self.eot = encode, sot, eot
        self.context_length = context_length

    def __call__(self, captions: list[str]) -> np.ndarray:
        out = np.zeros((len(captions), self.context_length), dtype=np.int32)
        for i, caption in enumerate(captions):
            tokens = [self.sot, *self.encode(caption), self.eot]
            if len(tokens) > self.context_length:  # SimpleTokenizer.__call__'s truncation
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
            out[i, : len(tokens)] = tokens
        return out


class _OpenClipTokenizer:
    """Any other open_clip tokenizer (Hugging Face, SigLIP): its tensor as int32 numpy."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, captions: list[str]) -> np.ndarray:
        if not captions:
            return np.zeros((0, self.context_length), dtype=np.int32)
        return self.tokenizer(captions).numpy().astype(np.int32)


def _model_config(model: str) -> dict | None:
    """The open_clip JSON config of `model`, read as open_clip's registry would find it
    (a .json path, the project's configs, open_clip's own); None for names it resolves
    otherwise (hf-hub:, local-dir:) or not at all."""
    if model.endswith(".json"):
        path = Path(model).expanduser()
    elif (MODEL_CONFIG_DIR / f"{model}.json").is_file():
        path = MODEL_CONFIG_DIR / f"{model}.json"
    else:
        spec = importlib.util.find_spec("open_clip")  # finds the package, imports nothing
        path = Path(spec.submodule_search_locations[0]) / "model_configs" / f"{model}.json"
    if ":" in model or not path.is_file():
        return None
    config = read_model_config(path)
    # open_clip registers only configs with these keys; for others it falls back itself.
    return config if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")) else None


class _NoTorch(types.ModuleType):
    """Stands in for torch while open_clip's tokenizer module runs: its annotations name
    torch types; SimpleTokenizer.encode never touches torch."""

    def __getattr__(self, name: str) -> Any:
        return object


@functools.cache
def _bpe_module() -> types.ModuleType:
    """open_clip's tokenizer.py, loaded as a module of its own (not through open_clip's
    package, whose __init__ imports every model)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("pipeline.data._open_clip_bpe", path)
    module = importlib.util.module_from_spec(spec)
    absent = "torch" not in sys.modules
    if absent:
        sys.modules["torch"] = _NoTorch("torch")
    try:
        spec.loader.exec_module(module)
    finally:
        if absent:
            del sys.modules["torch"]  # a later `import torch` gets the real one
    return module


def _bpe_tokenizer(config: dict | None) -> Tokenizer | None:
    """open_clip's SimpleTokenizer for `config`, as get_tokenizer builds it, when that is
    the tokenizer get_tokenizer picks and it needs no torch; else None."""
    if config is None:
        return None
    text = config.get("text_cfg", {})
    kwargs = dict(text.get("tokenizer_kwargs", {}))
    if text.get("hf_tokenizer_name") or kwargs.get("reduction_mask"):
        return None
    try:
        module = _bpe_module()
        # The module builds a default one on import (BPE tables, ~0.3 s): reused.
        bpe = module._tokenizer if not kwargs else module.SimpleTokenizer(**kwargs)
    except Exception:  # another open_clip whose module needs torch: its own path
        return None
    context_length = text.get("context_length", 77)
    return Tokenizer(bpe.encode, bpe.sot_token_id, bpe.eot_token_id, context_length)


def load_tokenizer(model: str) -> Tokenizer | _OpenClipTokenizer:
    """The tokenizer open_clip pairs with `model` (BPE, context length from its config), as
    a callable returning int32 numpy tokens."""
    if "siglip" not in model.lower():
        fast = _bpe_tokenizer(_model_config(model))
        if fast is not None:
            return fast
    import open_clip

    from pipeline.train.modeling import resolve_model_name

    return _OpenClipTokenizer(open_clip.get_tokenizer(resolve_model_name(model)))


def tokens_of_alive(batch: pd.DataFrame, tokenizer: Any) -> list[list[int] | None]:
    """Tokens of each row whose `reason` is unset (None for the rows already rejected)."""
    alive = batch["reason"].isna().to_numpy()
    tokens: list[list[int] | None] = [None] * len(batch)
    if alive.any():
        encoded = tokenizer([str(c) for c in batch.loc[alive, "caption"]])
        for row, vector in zip(np.flatnonzero(alive), encoded.tolist(), strict=True):
            tokens[row] = vector
    return tokens
