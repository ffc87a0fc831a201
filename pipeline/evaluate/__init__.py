"""Zero-shot classification and image-text retrieval of an exported open_clip model.

The model is an exported local-dir (RUN/model) or an open_clip architecture with a local
checkpoint file (`resolve_model`). The data is an image folder (one sub-folder per class) or a
Parquet file of image bytes and labels (`load_dataset`); retrieval reads a Parquet of images and
captions. Image embeddings come from Ray Data batch inference (an actor pool, each actor loads
the model once, one GPU each when asked); the text side (the zero-shot classifier, captions) is
small and is encoded once on the driver. Metrics are pure functions of logits and labels,
testable without Ray. The caller starts Ray; paths (model, data) must be readable on every node.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from pipeline import storage
from pipeline.config import EvalConfig
from pipeline.evaluate.datasets import (
    IMAGE_EXTENSIONS,
    ImageFolderSet,
    ParquetSet,
    image_column_ok,
    imagenet_synsets,
    load_dataset,
    load_image_folder,
    load_parquet_set,
    parquet_schema,
    resolve_classnames,
    resolve_templates,
)
from pipeline.evaluate.embedding import (
    ImageEmbedder,
    embed_images,
    embed_parquet,
    embedding_resources,
    torch_device,
)
from pipeline.evaluate.metrics import (
    RETRIEVAL_KS,
    classification_metrics,
    format_markdown,
    retrieval_metrics,
    write_tensorboard,
)
from pipeline.evaluate.models import ModelRef, load_model, resolve_model

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageEmbedder",
    "ImageFolderSet",
    "ModelRef",
    "ParquetSet",
    "RETRIEVAL_KS",
    "check_retrieval",
    "classification_metrics",
    "embed_images",
    "embed_parquet",
    "embedding_resources",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "format_markdown",
    "imagenet_synsets",
    "load_dataset",
    "load_image_folder",
    "load_model",
    "load_parquet_set",
    "resolve_classnames",
    "resolve_model",
    "resolve_templates",
    "retrieval_metrics",
    "write_tensorboard",
]


def evaluate_zero_shot(
    model: str | Path | ModelRef,
    dataset: str | Path | ImageFolderSet | ParquetSet,
    cfg: EvalConfig,
    use_gpu: bool = False,
    loaded: tuple[torch.nn.Module, Any, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Zero-shot classification of an image folder or labelled Parquet (see `load_dataset`).

    `loaded` is `load_model(model)` when the caller already holds it (it is left on the CPU);
    `log` gets the embedding's progress lines.
    """
    data = dataset
    if not isinstance(data, ImageFolderSet | ParquetSet):
        data = load_dataset(dataset, cfg.classnames, cfg.templates)
    ref = resolve_model(model)
    net, _, tokenizer = loaded or load_model(ref)
    device = torch_device(use_gpu)
    # Built once on the driver: classes x templates texts, averaged per class, normalised.
    classifier_DC = (
        open_clip.build_zero_shot_classifier(
            net.to(device), tokenizer, data.classnames, data.templates, device=device
        )
        .float()
        .cpu()
    )
    net.cpu()  # the driver may share a GPU with the actors
    if isinstance(data, ImageFolderSet):
        pairs = enumerate(zip(data.paths, data.labels, strict=True))
        rows = [{"index": i, "path": p, "label": y} for i, (p, y) in pairs]
        out = embed_images(rows, ref, cfg, use_gpu, log)
        labels_N, where, total = out["label"], data.root, len(rows)
    else:
        out = embed_parquet(data, ref, cfg, use_gpu, log)
        labels_N, where, total = data.label_ids(out["label"]), data.path, data.num_rows
    ok = out["ok"]
    if not ok.any():
        raise ValueError(f"{where}: none of {total} images could be read")
    # open_clip's 100x scale: it does not change rankings, only keeps logits comparable.
    logits_NC = 100.0 * torch.from_numpy(out["embedding"][ok]) @ classifier_DC
    results = classification_metrics(logits_NC, labels_N[ok], data.classnames, data.groups)
    results.update(skipped_images=int((~ok).sum()), num_templates=len(data.templates))
    if isinstance(data, ImageFolderSet) and not ok.all():
        results["skipped_examples"] = [data.paths[i] for i in out["index"][~ok][:10]]
    return results


def _caption_lists(values: list[Any], path: Any) -> list[list[str]]:
    """Each row's captions: a string, or a list of strings (several captions of one image)."""
    out = []
    for i, v in enumerate(values):
        captions = [v] if isinstance(v, str) else list(v or [])
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{path}: row {i} has no caption (or an empty one)")
        out.append(captions)
    return out


def check_retrieval(
    path: str | Path, image_col: str = "image", caption_col: str = "caption"
) -> str:
    """Fail fast on a retrieval Parquet that cannot work (before Ray starts); local or URI."""
    path = storage.normalize(path)
    schema = parquet_schema(path, {"--image-col": image_col, "--caption-col": caption_col})
    if not image_column_ok(schema.field(image_col).type):
        raise ValueError(f"{path}: column {image_col!r} is not encoded image bytes")
    if storage.parquet_rows(path) == 0:
        raise ValueError(f"{path}: no rows")
    return path


def evaluate_retrieval(
    model: str | Path | ModelRef,
    parquet_path: str | Path,
    cfg: EvalConfig,
    use_gpu: bool = False,
    loaded: tuple[torch.nn.Module, Any, Any] | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    log: Any = None,
) -> dict[str, Any]:
    """Image<->text recall@1/5/10 on a Parquet of (image bytes, caption) rows, as CLIP_benchmark.

    A caption cell may hold a list of captions, and rows with identical image bytes are one
    image: every caption of an image is a positive for it (COCO's five captions per image).
    The table is read on the driver (captions are encoded there, image bytes go to the object
    store once): meant for eval sets of up to tens of thousands of small images.
    """
    path = check_retrieval(parquet_path, image_col, caption_col)
    table = storage.read_parquet(path, columns=[image_col, caption_col])
    captions_per_row = _caption_lists(table.column(caption_col).to_pylist(), path)
    image_of_key: dict[str, int] = {}
    images, texts, text_image = [], [], []
    for value, captions in zip(table.column(image_col).to_pylist(), captions_per_row, strict=True):
        raw = value.get("bytes") if isinstance(value, dict) else value
        key = hashlib.sha256(raw or b"").hexdigest()
        if key not in image_of_key:
            image_of_key[key] = len(images)
            images.append(raw or b"")
        texts += captions
        text_image += [image_of_key[key]] * len(captions)
    ref = resolve_model(model)
    rows = [{"index": i, "image": b} for i, b in enumerate(images)]
    out = embed_images(rows, ref, cfg, use_gpu, log)
    ok = out["ok"]
    if not ok.any():
        raise ValueError(f"{path}: none of {len(images)} images could be read")
    # An unreadable image drops with its captions; the others keep their positives.
    new_id_I = np.cumsum(ok) - 1
    keep_T = [t for t, img in enumerate(text_image) if ok[img]]
    texts = [texts[t] for t in keep_T]
    positive_TI = torch.zeros(len(texts), int(ok.sum()), dtype=torch.bool)
    image_T = torch.as_tensor(new_id_I[[text_image[t] for t in keep_T]])
    positive_TI[torch.arange(len(texts)), image_T] = True
    net, _, tokenizer = loaded or load_model(ref)
    device = torch_device(use_gpu)
    net.to(device)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(texts), cfg.batch_size):
            tokens = tokenizer(texts[i : i + cfg.batch_size]).to(device)
            chunks.append(net.encode_text(tokens, normalize=True).float().cpu())
    net.cpu()
    text_TD = torch.cat(chunks)
    scores_TI = text_TD @ torch.from_numpy(out["embedding"][ok]).T
    results: dict[str, Any] = retrieval_metrics(scores_TI, positive_TI)
    # Prefixed: the caller may merge these with zero-shot results (which has skipped_images).
    results.update(
        retrieval_num_pairs=len(texts),
        retrieval_num_images=int(ok.sum()),
        retrieval_skipped_images=int((~ok).sum()),
    )
    return results


def clip_benchmark_keys(
    results: dict[str, Any], model: str, pretrained: str | None = None
) -> dict[str, Any]:
    """CLIP_benchmark's result shape beside ours, so tools that read its JSON read ours (its
    retrieval keys, image_retrieval_recall@k, are ours already)."""
    return {
        "model": model,
        "pretrained": pretrained,
        "task": "zeroshot_classification",
        "language": "en",
        "metrics": {
            "acc1": results.get("top1"),
            "acc5": results.get("top5"),
            "mean_per_class_recall": results.get("mean_per_class_recall"),
        },
    }
