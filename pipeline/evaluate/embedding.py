"""Image embeddings as Ray Data batch inference: an actor pool, the model loaded once per actor."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import EvalConfig
from pipeline.evaluate.datasets import ParquetSet
from pipeline.evaluate.models import ModelRef, load_model, resolve_model


def torch_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def embedding_resources(
    cluster: Mapping[str, float], use_gpu: bool | None = None, concurrency: int | None = None
) -> tuple[bool, int]:
    """(use_gpu, most embedding actors) for a cluster's resources (`ray.cluster_resources()`).

    use_gpu None: a GPU per actor when the cluster has GPUs. concurrency None: one actor per
    GPU, else half the CPUs (at most 8: CPU actors run torch on the one CPU Ray gives each, the
    other half reads); given, it is capped at the GPUs the cluster has now (an autoscaling
    cluster with none up yet keeps it: its actors' GPU requests bring GPU nodes up).
    """
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
    if use_gpu is None:
        use_gpu = gpus > 0
    if concurrency is None:
        concurrency = gpus if use_gpu else min(8, cpus // 2)
    elif use_gpu and gpus > 0:
        concurrency = min(concurrency, gpus)
    return use_gpu, max(1, concurrency)


class ImageEmbedder:
    """Ray Data callable class: the model loads once per actor; a batch maps to embeddings.

    Input columns: `path` (a file) or `image` (encoded bytes, or a {bytes, path} struct), plus
    any others (index, label), which pass through. Output adds `embedding` (float32,
    L2-normalised) and `ok`; an image that fails to decode gets ok=False and a zero row, so one
    bad file never sinks the eval. `model` is what `resolve_model` accepts (plain strings cross
    into Ray).
    """

    def __init__(self, model: str, use_gpu: bool = False, pretrained: str | None = None):
        self.model, self.preprocess, _ = load_model(resolve_model(model, pretrained))
        self.device = torch_device(use_gpu)
        self.model.to(self.device)
        # The embedding width, so a batch with no readable image still has the right shape.
        probe = self.preprocess(Image.new("RGB", (8, 8)))[None].to(self.device)
        with torch.inference_mode():
            self.dim = int(self.model.encode_image(probe).shape[-1])

    def _load(self, source: Any) -> torch.Tensor:
        if isinstance(source, dict):  # Hugging Face's image struct
            source = source.get("bytes") or source.get("path")
        if isinstance(source, str) and storage.is_uri(source):
            source = storage.read_bytes(source)  # an image folder in a bucket
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return self.preprocess(img.convert("RGB"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = batch["image"] if "image" in batch else batch["path"]
        ok_B = np.zeros(len(sources), dtype=bool)
        pixels = []
        for i, source in enumerate(sources):
            try:
                pixels.append(self._load(source))
                ok_B[i] = True
            except Exception:  # corrupt, truncated, missing, decompression bomb: skip, count
                pass
        embedding_BD = np.zeros((len(sources), self.dim), dtype=np.float32)
        if pixels:
            # fp32, not amp: the figures then equal a plain one-process open_clip run.
            with torch.inference_mode():
                x = torch.stack(pixels).to(self.device)
                embedding_BD[ok_B] = self.model.encode_image(x, normalize=True).float().cpu()
        out = {k: v for k, v in batch.items() if k not in ("image", "path")}
        out.update(ok=ok_B, embedding=embedding_BD)
        return out


PROGRESS_EVERY_S = 15.0  # as prepare's shard ticker: a line a person reads, not a log flood


def _embed(
    ds: Any, model: ModelRef, cfg: EvalConfig, use_gpu: bool, total: int, log: Any = None
) -> dict[str, np.ndarray]:
    """Run ImageEmbedder over a dataset; all columns (embedding, ok, pass-through) gathered.

    log: called with a progress line every PROGRESS_EVERY_S seconds and once at the end."""
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={
            "model": model.model,
            "pretrained": model.pretrained,
            "use_gpu": use_gpu,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        # Grows from one actor up to `concurrency` while work is queued (one GPU each on GPU).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.concurrency)),
        num_gpus=1 if use_gpu else 0,
        udf_modifying_row_count=False,
    )
    parts, done = [], 0
    start = last = time.monotonic()
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if not len(part.get("ok", ())):
            continue
        parts.append(part)
        done += len(part["ok"])
        now = time.monotonic()
        if log is not None and now - last >= PROGRESS_EVERY_S and done < total:
            last = now
            eta = (now - start) / done * (total - done)
            log(f"[eval] {done}/{total} images embedded after {now - start:.0f}s, ETA {eta:.0f}s")
    if log is not None:
        log(f"[eval] {done} images embedded in {time.monotonic() - start:.0f}s")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def embed_images(
    rows: list[dict[str, Any]],
    model: str | Path | ModelRef,
    cfg: EvalConfig,
    use_gpu: bool = False,
    log: Any = None,
) -> dict[str, np.ndarray]:
    """Embed rows ({index, path or image, ...}) with Ray Data; columns come back in index order."""
    # About one batch per block, so every actor in the pool gets work.
    ds = ray.data.from_items(
        rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.batch_size))
    )
    cols = _embed(ds, resolve_model(model), cfg, use_gpu, len(rows), log)
    order = np.argsort(cols["index"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def embed_parquet(
    data: ParquetSet,
    model: str | Path | ModelRef,
    cfg: EvalConfig,
    use_gpu: bool = False,
    log: Any = None,
) -> dict[str, np.ndarray]:
    """Embed a labelled Parquet read by Ray Data (in blocks: never whole on the driver);
    rows come back in no particular order, each with its label."""
    ds = ray.data.read_parquet(
        str(data.path), override_num_blocks=max(1, math.ceil(data.num_rows / cfg.batch_size))
    ).select_columns([data.image_col, data.label_col])  # pushed down into the read
    renames = {
        k: v for k, v in {data.image_col: "image", data.label_col: "label"}.items() if k != v
    }
    if renames:
        ds = ds.rename_columns(renames)
    return _embed(ds, resolve_model(model), cfg, use_gpu, data.num_rows, log)
