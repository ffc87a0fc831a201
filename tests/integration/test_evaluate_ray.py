"""pipeline.evaluate end to end on a local Ray: figures equal a one-process open_clip run."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline import evaluate as ev
from pipeline.config import EvalConfig
from pipeline.train.modeling import create_model, export_local_dir, model_config

pytestmark = pytest.mark.integration

CLASSES = ["blue_square", "green_circle", "red_triangle", "yellow_star"]
COLORS = [(30, 60, 220), (30, 200, 60), (220, 40, 30), (230, 220, 20)]


def draw(rng, color, fmt="PNG") -> bytes:
    img = Image.fromarray(rng.integers(0, 120, size=(56, 64, 3), dtype=np.uint8))
    x, y = (int(v) for v in rng.integers(0, 28, size=2))
    ImageDraw.Draw(img).ellipse((x, y, x + 24, y + 24), fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("clip-demo-tiny")
    return export_local_dir(model, model_config("clip-demo-tiny"), tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def reference(model_dir):
    """open_clip alone in this process: (model, preprocess, tokenizer)."""
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def test_zero_shot_matches_open_clip(ray_local, tmp_path, model_dir, reference, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "eval"
    for name, color in zip(CLASSES, COLORS, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(draw(rng, color, "JPEG"))
    (root / "green_circle" / "corrupt.png").write_bytes(b"\x89PNG truncated")
    (root / "templates.txt").write_text("a photo of a {}.\na drawing of the {c}.\n")
    (root / "splits.json").write_text(json.dumps({"seen": CLASSES[:3], "heldout": ["yellow_star"]}))
    # batch_size 4 over 13 files: several blocks and batches, one with the corrupt file.
    monkeypatch.setattr("pipeline.evaluate.embedding.PROGRESS_EVERY_S", 0.0)  # a line a batch
    lines = []
    results = ev.evaluate_zero_shot(model_dir, root, EvalConfig(batch_size=4), log=lines.append)
    # The console's progress: counts that grow to the 13 files, then one closing line.
    counts = [int(line.split()[1].split("/")[0]) for line in lines[:-1]]
    assert counts == sorted(counts) and all(0 < c < 13 for c in counts) and len(counts) >= 1
    assert all("/13 images embedded after" in line for line in lines[:-1])
    assert lines[-1].startswith("[eval] 13 images embedded in ")

    model, preprocess, tokenizer = reference
    data = ev.load_image_folder(root)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, data.classnames, data.templates
    )
    good = [(p, y) for p, y in zip(data.paths, data.labels, strict=True) if "corrupt" not in p]
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in good])
    with torch.no_grad():
        logits = 100.0 * model.encode_image(x, normalize=True) @ classifier
    labels = torch.tensor([y for _, y in good])
    pred_N = logits.topk(4, dim=1).indices  # open_clip_train's accuracy, with k = 4 classes
    assert results["top1"] == (pred_N[:, 0] == labels).sum().item() / 12
    assert results["top5"] == 1.0  # 4 classes: the top 4 always holds the answer
    expected = ev.classification_metrics(logits, labels, data.classnames, data.groups)
    for key in ("per_class", "most_confused", "mean_per_class_recall", "seen_top1", "heldout_top1"):
        assert results[key] == expected[key], key
    assert results["heldout_top1"] == (pred_N[9:, 0] == 3).float().mean().item()
    assert (results["num_images"], results["num_classes"], results["skipped_images"]) == (12, 4, 1)
    assert results["num_templates"] == 2
    json.dumps(results)  # results.json-ready
    assert "| top1 |" in ev.format_markdown(results)


def test_retrieval_matches_open_clip(ray_local, tmp_path, model_dir, reference):
    rng = np.random.default_rng(1)
    captions = [f"a {name.replace('_', ' ')} number {i}" for i in range(3) for name in CLASSES]
    images = [draw(rng, COLORS[i % 4]) for i in range(len(captions))]
    images[5] = b"not an image"  # its pair is dropped from both sides
    path = tmp_path / "retrieval.parquet"
    pq.write_table(pa.table({"image": images, "caption": captions}), path)
    results = ev.evaluate_retrieval(model_dir, path, EvalConfig(batch_size=5))

    model, preprocess, tokenizer = reference
    keep = [i for i in range(len(images)) if i != 5]
    x = torch.stack([preprocess(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in keep])
    with torch.no_grad():
        image_ID = model.encode_image(x, normalize=True)
        text_TD = model.encode_text(tokenizer([captions[i] for i in keep]), normalize=True)
    scores_TI = text_TD @ image_ID.T
    ranks_T = (scores_TI > scores_TI.diag()[:, None]).sum(1)  # images above the right one
    ranks_I = (scores_TI.T > scores_TI.diag()[:, None]).sum(1)
    for k in (1, 5, 10):
        assert results[f"image_retrieval_recall@{k}"] == (ranks_T < k).sum().item() / 11
        assert results[f"text_retrieval_recall@{k}"] == (ranks_I < k).sum().item() / 11
    assert (results["retrieval_num_pairs"], results["retrieval_skipped_images"]) == (11, 1)
