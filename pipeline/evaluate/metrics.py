"""Metrics as pure functions of logits and labels (open_clip's and CLIP_benchmark's definitions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

RETRIEVAL_KS = (1, 5, 10)  # CLIP_benchmark's recall@k


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


def write_tensorboard(results: dict[str, Any], logdir: str | Path, step: int = 0) -> Path:
    """The headline figures as TensorBoard scalars (eval/top1, eval/seen_top1,
    eval/image_retrieval_recall_at_1, ...) at `step`."""
    from tensorboardX import SummaryWriter

    keys = [k for k in results if k in _HEADLINE or (k.endswith("_top1") and k != "top1")]
    with SummaryWriter(str(logdir)) as writer:
        for key in keys:
            if isinstance(results[key], int | float):
                # TensorBoard tags allow no '@': recall@5 is written recall_at_5.
                writer.add_scalar(f"eval/{key.replace('@', '_at_')}", results[key], step)
    return Path(logdir)


_HEADLINE = ["top1", "top5", "mean_per_class_recall"] + [
    f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in RETRIEVAL_KS
]


def format_markdown(results: dict[str, Any], num_confused: int = 5) -> str:
    """A Markdown table of the headline figures in `results` (zero-shot, retrieval or both),
    then the most confused class pairs, if any."""
    groups = sorted(k for k in results if k.endswith("_top1") and k != "top1")
    lines = ["| metric | value |", "|---|---:|"]
    for key in [*_HEADLINE[:3], *groups, *_HEADLINE[3:]]:
        if key in results:
            value = results[key]
            lines.append(f"| {key} | {'n/a' if value is None else f'{100 * value:.2f}%'} |")
    counts = ("num_images", "num_classes", "num_templates", "skipped_images")
    for key in (*counts, "retrieval_num_pairs", "retrieval_num_images", "retrieval_skipped_images"):
        if key in results:
            lines.append(f"| {key} | {results[key]} |")
    confused = results.get("most_confused") or []
    if confused[:num_confused]:
        lines += ["", "| true class | predicted as | images |", "|---|---|---:|"]
        lines += [f"| {a} | {b} | {n} |" for a, b, n in confused[:num_confused]]
    return "\n".join(lines) + "\n"
