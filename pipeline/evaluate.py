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

import functools
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from pipeline.config import EvalConfig
from pipeline.modeling import load_local_dir, resolve_model_name

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RETRIEVAL_KS = (1, 5, 10)  # CLIP_benchmark's recall@k


@dataclass(frozen=True)
class ImageFolderSet:
    """A labelled image folder, resolved and validated (nothing decoded yet)."""

    root: Path
    folders: list[str]  # sorted class folder names: label i is folders[i]
    classnames: list[str]
    templates: list[Any]  # callables taking a class name, as open_clip accepts them
    paths: list[str]
    labels: list[int]
    groups: dict[str, list[int]] = field(default_factory=dict)  # splits.json: group -> labels


def _fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


def resolve_templates(spec: str | None, root: Path | None = None) -> list[Any]:
    """'openai', 'simple', a templates file, or (None) root/templates.txt, else 'openai'."""
    if spec is None:
        has_file = root is not None and (root / "templates.txt").is_file()
        spec = str(root / "templates.txt") if has_file else "openai"
    if spec == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"templates {spec!r}: not 'openai', 'simple' nor an existing file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no templates (only blank lines and # comments)")
    for line in lines:
        if "{}" not in line and "{c}" not in line:
            raise ValueError(f"{path}: template {line!r} has no {{}} or {{c}} for the class name")
    # Callables, not str.format: a template may hold other braces.
    return [functools.partial(_fill, line) for line in lines]


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """ImageNet-1k synset ids (n01440764, ...) in class-index order, which is open_clip's
    IMAGENET_CLASSNAMES order. open_clip does not ship them; timm (which open_clip requires)
    does. Empty if timm is missing: then only a full 1000-folder layout maps by position."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return ()
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def _imagenet_classnames(keys: list[str], where: Any, what: str) -> list[str]:
    names = list(open_clip.IMAGENET_CLASSNAMES)
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    # Synset-named classes map by id, so a partial copy of ImageNet (any subset) works; the
    # classifier then holds only the classes present, as for any other folder.
    if index and all(k in index for k in keys):
        return [names[index[k]] for k in keys]
    if len(keys) == len(names):  # 1000 classes named otherwise: sorted order is class order
        return names
    unknown = [k for k in keys if k not in index]
    raise ValueError(
        f"open_clip's IMAGENET_CLASSNAMES has {len(names)} class names but {where} has "
        f"{len(keys)} {what}, and {len(unknown)} of them are not ImageNet-1k synset ids "
        f"(n01440764, ...): {unknown[:5]}; name the folders by synset id, or pass a "
        "classnames file"
    )


def _read_classnames_file(path: Path) -> list[str] | dict[str, str]:
    """One name per line, or JSON: a list of names or {folder or label: name}."""
    if path.suffix.lower() != ".json":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
            return {str(k): v for k, v in raw.items()}
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ValueError(f"{path}: expected a JSON list of names or {{folder: name}}")
        names = [v.strip() for v in raw]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def resolve_classnames(
    spec: str | None, root: Path | None, folders: list[str], what: str = "class folders"
) -> list[str]:
    """'imagenet', a names file (.txt lines in sorted folder order, or .json list / mapping),
    or (None) root/classnames.txt or .json, else the folder names with _ as spaces.

    `folders` are the class keys in label order: folder names, or a Parquet's string labels.
    """
    where = root
    if spec is None and root is not None:
        found = [root / f for f in ("classnames.txt", "classnames.json") if (root / f).is_file()]
        spec = str(found[0]) if found else None
    if spec is None:
        return [name.replace("_", " ") for name in folders]
    if spec == "imagenet":
        return _imagenet_classnames(folders, where, what)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classnames {spec!r}: not 'imagenet' nor an existing file")
    names = _read_classnames_file(path)
    if isinstance(names, dict):
        missing = [f for f in folders if f not in names]
        if missing:
            raise ValueError(
                f"{path} names {len(folders) - len(missing)} of the {len(folders)} {what} in "
                f"{where}; missing: {missing[:5]}"
            )
        return [names[f] for f in folders]
    if len(names) != len(folders):
        raise ValueError(
            f"{spec} has {len(names)} class names but {where} has {len(folders)} {what}"
        )
    return names


def load_image_folder(
    dataset_dir: str | Path, classnames: str | None = None, templates: str | None = None
) -> ImageFolderSet:
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"eval dataset {root} does not exist or is not a folder")
    # Hidden folders (.ipynb_checkpoints, ...) are never classes.
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (expected one folder per class)")
    paths, labels = [], []
    for label, name in enumerate(folders):
        files = sorted(
            str(p)
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ValueError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    groups: dict[str, list[int]] = {}
    splits = root / "splits.json"
    if splits.is_file():
        try:
            raw = json.loads(splits.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{splits}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise ValueError(f"{splits}: expected {{group name: [class folder names]}}")
        for group, members in raw.items():
            unknown = sorted(set(map(str, members)) - set(folders))
            if unknown:
                raise ValueError(f"{splits}: group {group!r} names unknown folders {unknown[:5]}")
            groups[group] = sorted(folders.index(m) for m in set(members))
    return ImageFolderSet(
        root=root,
        folders=folders,
        classnames=resolve_classnames(classnames, root, folders),
        templates=resolve_templates(templates, root),
        paths=paths,
        labels=labels,
        groups=groups,
    )


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class ImageEmbedder:
    """Ray Data callable class: the model loads once per actor; a batch maps to embeddings.

    Input columns: `path` (a file) or `image` (encoded bytes), plus any others (index, label),
    which pass through. Output adds `embedding` (float32, L2-normalised) and `ok`; an image
    that fails to decode gets ok=False and a zero row, so one bad file never sinks the eval.
    """

    def __init__(self, model_dir: str, use_gpu: bool = False):
        self.model, self.preprocess, _ = load_local_dir(model_dir)
        self.device = _device(use_gpu)
        self.model.to(self.device)
        # The embedding width, so a batch with no readable image still has the right shape.
        probe = self.preprocess(Image.new("RGB", (8, 8)))[None].to(self.device)
        with torch.inference_mode():
            self.dim = int(self.model.encode_image(probe).shape[-1])

    def _load(self, source: Any) -> torch.Tensor:
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


def embed_images(
    rows: list[dict[str, Any]], model_dir: str | Path, cfg: EvalConfig, use_gpu: bool = False
) -> dict[str, np.ndarray]:
    """Embed rows ({index, path or image, ...}) with Ray Data; columns come back in index order."""
    # About one batch per block, so every actor in the pool gets work.
    ds = ray.data.from_items(
        rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.batch_size))
    )
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "use_gpu": use_gpu},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=1 if use_gpu else 0,
        udf_modifying_row_count=False,
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["index"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


def _unique(names: list[str]) -> list[str]:
    # ImageNet's names repeat ('missile', 'sunglasses'): keep per_class keys distinct.
    return [f"{n} ({i})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def classification_metrics(
    logits_NC: Any,
    labels_N: Any,
    classnames: list[str],
    groups: dict[str, list[int]] | None = None,
    num_confused: int = 10,
) -> dict[str, Any]:
    """top1/top5 as open_clip_train's `accuracy`, mean per-class recall, confusions, group top1."""
    logits = torch.as_tensor(np.asarray(logits_NC), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(labels_N), dtype=torch.long)
    n, c = logits.shape
    if n == 0:
        raise ValueError("no images to score")
    k = min(5, c)
    topk_NK = logits.topk(k, dim=1, largest=True, sorted=True).indices
    correct1_N = topk_NK[:, 0] == labels
    confusion_CC = torch.zeros(c, c, dtype=torch.long)
    confusion_CC.index_put_(
        (labels, topk_NK[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True
    )
    support_C, hits_C = confusion_CC.sum(1), confusion_CC.diag()
    names = _unique(list(classnames))
    per_class = {names[i]: hits_C[i].item() / support_C[i].item() for i in range(c) if support_C[i]}
    off_CC = confusion_CC.clone().fill_diagonal_(0)
    pairs = sorted(((-off_CC[i, j].item(), i, j) for i, j in off_CC.nonzero().tolist()))
    results: dict[str, Any] = {
        "top1": correct1_N.sum().item() / n,
        "top5": (topk_NK == labels[:, None]).any(1).sum().item() / n,
        # Over classes that have images, as sklearn's balanced accuracy (CLIP_benchmark).
        "mean_per_class_recall": float(np.mean(list(per_class.values()))),
        "num_images": n,
        "num_classes": c,
        "per_class": per_class,
        "most_confused": [(names[i], names[j], -m) for m, i, j in pairs[:num_confused]],
    }
    for group, members in (groups or {}).items():
        mask_N = torch.isin(labels, torch.as_tensor(members, dtype=torch.long))
        results[f"{group}_top1"] = (
            correct1_N[mask_N].float().mean().item() if mask_N.any() else None
        )
    return results


def retrieval_metrics(scores_TI: Any, positive_TI: Any = None, ks=RETRIEVAL_KS) -> dict[str, float]:
    """CLIP_benchmark's recall@k: a query succeeds if any positive is in its top k.

    `scores_TI` is text x image similarity; positives default to the diagonal (row i's caption
    describes row i's image). k is capped at the number of candidates.
    """
    scores = torch.as_tensor(np.asarray(scores_TI), dtype=torch.float32)
    pos = torch.eye(*scores.shape, dtype=torch.bool) if positive_TI is None else positive_TI
    pos = torch.as_tensor(np.asarray(pos), dtype=torch.bool)

    def recall(s_QD: torch.Tensor, p_QD: torch.Tensor, k: int) -> float:
        top_QK = s_QD.topk(min(k, s_QD.shape[1]), dim=1).indices
        return p_QD.gather(1, top_QK).any(1).sum().item() / s_QD.shape[0]

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = recall(scores, pos, k)  # text query -> images
        out[f"text_retrieval_recall@{k}"] = recall(scores.T, pos.T, k)  # image query -> texts
    return out


def evaluate_zero_shot(
    model_dir: str | Path, dataset_dir: str | Path, cfg: EvalConfig, use_gpu: bool = False
) -> dict[str, Any]:
    data = load_image_folder(dataset_dir, cfg.classnames, cfg.templates)
    model, _, tokenizer = load_local_dir(model_dir)
    device = _device(use_gpu)
    # Built once on the driver: classes x templates texts, averaged per class, normalised.
    classifier_DC = (
        open_clip.build_zero_shot_classifier(
            model.to(device), tokenizer, data.classnames, data.templates, device=device
        )
        .float()
        .cpu()
    )
    del model
    pairs = enumerate(zip(data.paths, data.labels, strict=True))
    rows = [{"index": i, "path": p, "label": y} for i, (p, y) in pairs]
    out = embed_images(rows, model_dir, cfg, use_gpu)
    ok = out["ok"]
    if not ok.any():
        raise ValueError(f"{data.root}: none of {len(rows)} images could be read")
    # open_clip's 100x scale: it does not change rankings, only keeps logits comparable.
    logits_NC = 100.0 * torch.from_numpy(out["embedding"][ok]) @ classifier_DC
    results = classification_metrics(logits_NC, out["label"][ok], data.classnames, data.groups)
    results.update(skipped_images=int((~ok).sum()), num_templates=len(data.templates))
    return results


def evaluate_retrieval(
    model_dir: str | Path, parquet_path: str | Path, cfg: EvalConfig, use_gpu: bool = False
) -> dict[str, Any]:
    """Image<->text recall@1/5/10 on a Parquet of (image bytes, caption) pairs.

    The table is read on the driver (captions are encoded there, image bytes go to the object
    store once): meant for eval sets of up to tens of thousands of small images.
    """
    table = pq.read_table(str(parquet_path), columns=["image", "caption"])
    if table.num_rows == 0:
        raise ValueError(f"{parquet_path}: no rows")
    captions = table.column("caption").to_pylist()
    if any(c is None for c in captions):
        raise ValueError(f"{parquet_path}: {captions.count(None)} rows have no caption")
    images = table.column("image").to_pylist()
    out = embed_images(
        [{"index": i, "image": b} for i, b in enumerate(images)], model_dir, cfg, use_gpu
    )
    ok = out["ok"]
    if not ok.any():
        raise ValueError(f"{parquet_path}: none of {len(images)} images could be read")
    # An unreadable image drops its pair from both sides, so positives stay on the diagonal.
    captions = [c for c, keep in zip(captions, ok, strict=True) if keep]
    model, _, tokenizer = load_local_dir(model_dir)
    device = _device(use_gpu)
    model.to(device)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(captions), cfg.batch_size):
            tokens = tokenizer(captions[i : i + cfg.batch_size]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    text_TD = torch.cat(chunks)
    scores_TI = text_TD @ torch.from_numpy(out["embedding"][ok]).T
    results: dict[str, Any] = retrieval_metrics(scores_TI)
    # Prefixed: the caller may merge these with zero-shot results (which has skipped_images).
    results.update(retrieval_num_pairs=len(captions), retrieval_skipped_images=int((~ok).sum()))
    return results


_HEADLINE = ["top1", "top5", "mean_per_class_recall"] + [
    f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in RETRIEVAL_KS
]


def format_markdown(results: dict[str, Any]) -> str:
    """A Markdown table of the headline figures in `results` (zero-shot, retrieval or both)."""
    groups = sorted(k for k in results if k.endswith("_top1") and k != "top1")
    lines = ["| metric | value |", "|---|---:|"]
    for key in [*_HEADLINE[:3], *groups, *_HEADLINE[3:]]:
        if key in results:
            value = results[key]
            lines.append(f"| {key} | {'n/a' if value is None else f'{100 * value:.2f}%'} |")
    counts = ("num_images", "num_classes", "skipped_images", "retrieval_num_pairs")
    for key in (*counts, "retrieval_skipped_images"):
        if key in results:
            lines.append(f"| {key} | {results[key]} |")
    return "\n".join(lines) + "\n"
