"""The model to evaluate: an exported local-dir, or an open_clip name with a local checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from pipeline import storage
from pipeline.train.modeling import load_local_dir, resolve_model_name

LOCAL_DIR = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip's local-dir loader reads


@dataclass(frozen=True)
class ModelRef:
    """A checked model to evaluate: an exported local-dir, or an architecture + checkpoint."""

    model: str  # an absolute local-dir path, or an open_clip model name / absolute .json config
    pretrained: str | None = None  # absolute checkpoint path, with a model name only
    is_dir: bool = False


def resolve_model(model: str | Path | ModelRef, pretrained: str | None = None) -> ModelRef:
    """Check what `--model` / `--pretrained` name, without building the model.

    A directory (or local-dir:PATH) is an exported model with its own weights; anything else
    is an open_clip model name or JSON config and needs a local checkpoint file: nothing is
    downloaded, and random weights are never evaluated by accident.
    """
    if isinstance(model, ModelRef):
        return model
    text = str(model)
    if storage.is_uri(text.removeprefix(LOCAL_DIR)):
        return _resolve_uri(storage.normalize(text.removeprefix(LOCAL_DIR)), pretrained)
    path = Path(text.removeprefix(LOCAL_DIR)).expanduser()
    if text.startswith(LOCAL_DIR) or path.is_dir():
        if pretrained is not None:
            raise ValueError(
                f"--pretrained is for an open_clip model name; {path} is an exported model "
                "with its own weights"
            )
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not an exported open_clip model: no open_clip_config.json "
                "(RUN/model, as jobs/train.py exports it, has one)"
            )
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise FileNotFoundError(
                f"{path} has open_clip_config.json but no weights "
                f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}): the export is incomplete"
            )
        return ModelRef(str(path.resolve()), is_dir=True)
    if not text.endswith(".json") and ("/" in text or "\\" in text):
        raise FileNotFoundError(f"model {text!r}: no such directory (an exported model, RUN/model)")
    try:
        resolve_model_name(text)
    except ValueError:
        raise ValueError(
            f"unknown model {text!r}: pass an exported model directory (RUN/model or "
            "local-dir:PATH), or an open_clip model name (ViT-B-32, RN50, clip-demo-tiny, ...: "
            "open_clip.list_models()) or JSON config together with --pretrained PATH"
        ) from None
    if pretrained is None:
        raise ValueError(
            f"model {text!r} is an architecture without weights: pass --pretrained PATH, a local "
            "checkpoint (.pt, .bin, .safetensors); nothing is downloaded"
        )
    ckpt = Path(pretrained).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"--pretrained {pretrained!r}: no such file (a local checkpoint; open_clip's "
            "pretrained tags are not downloaded)"
        )
    name = str(Path(text).expanduser().resolve()) if text.endswith(".json") else text
    return ModelRef(name, pretrained=str(ckpt.resolve()))


def _resolve_uri(uri: str, pretrained: str | None) -> ModelRef:
    """An exported model in a bucket (RUN/model): checked by listing; loaded by each process
    from a temporary copy, so actors on any node read it."""
    if pretrained is not None:
        raise ValueError(f"--pretrained is for an open_clip model name; {uri} is an exported model")
    if not storage.exists(storage.join(uri, "open_clip_config.json")):
        raise FileNotFoundError(f"{uri} is not an exported open_clip model: no config")
    if not any(storage.list_files(uri, s) for s in WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{uri} has open_clip_config.json but no weights")
    return ModelRef(uri, is_dir=True)


def load_model(model: str | Path | ModelRef) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, preprocess, tokenizer); a checkpoint that does not fit is a
    ValueError naming both."""
    ref = resolve_model(model)
    try:
        if ref.is_dir:
            return load_local_dir(ref.model)
        name = resolve_model_name(ref.model)  # registers configs in this process (an actor too)
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=ref.pretrained)
    except RuntimeError as e:  # load_state_dict's missing / unexpected keys, size mismatches
        weights = ref.model if ref.is_dir else ref.pretrained
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"weights in {weights} do not fit the model: {first[:300]}") from None
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(name)
