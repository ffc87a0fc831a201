"""jobs/eval.py standalone on a local Ray: its figures equal a one-process computation with
open_clip's build_zero_shot_classifier and CLIP_benchmark's metric definitions."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pipeline import evaluate as ev
from pipeline.config import EvalConfig
from pipeline.train.modeling import create_model, export_local_dir, model_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL = "clip-demo-vit-tiny"


def draw(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 200, size=(48 + seed % 3 * 8, 56, 3), dtype=np.uint8))
    color = tuple(int(v) for v in rng.integers(0, 255, size=3))
    ImageDraw.Draw(img).ellipse((8, 8, 36, 36), fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # The ViT, seed 3: a random model whose predictions spread over several classes (random
    # ResNets call every image one class), so a wrong class order would change the figures.
    torch.manual_seed(3)
    model = create_model(MODEL)
    export_local_dir(model, model_config(MODEL), root / "model")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "weights.safetensors"))
    return root


def clip_benchmark_recall(scores, positive, k):
    """clip_benchmark.metrics.zeroshot_retrieval.recall_at_k, then `> 0` and the mean."""
    nb_texts, nb_images = scores.shape
    topk = torch.topk(scores, k, dim=1)[1]
    onehot = torch.nn.functional.one_hot(topk, num_classes=nb_images)
    true_positive = (onehot * positive.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
    return ((true_positive / positive.sum(dim=1)) > 0).float().mean().item()


def test_cli_imagenet_layout_matches_open_clip(tmp_path, tiny):
    # A partial ImageNet validation layout: synset folders, JPEGs, one unreadable file.
    synsets = ev.imagenet_synsets()[::100]  # 10 classes
    val = tmp_path / "val"
    for c, synset in enumerate(synsets):
        (val / synset).mkdir(parents=True)
        for i in range(2):
            (val / synset / f"ILSVRC2012_val_{c:04d}{i}.JPEG").write_bytes(draw(10 * c + i))
    (val / synsets[3] / "ILSVRC2012_val_broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    # Retrieval: image 0 has two captions, row 9 repeats image 4's bytes (one image, two
    # captions), row 10's image is unreadable (dropped with its caption).
    images = [draw(100 + i, "PNG") for i in range(9)] + [draw(104, "PNG"), b"junk"]
    captions = [[f"picture {i}"] for i in range(11)]
    captions[0].append("another view of picture 0")
    pq.write_table(pa.table({"image": images, "caption": captions}), tmp_path / "ret.parquet")

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    out = tmp_path / "out" / "results.json"
    result = subprocess.run(
        [sys.executable, "jobs/eval.py", "--model", str(tiny / "model"), "--dataset", str(val),
         "--classnames", "imagenet", "--templates", "openai",
         "--retrieval", str(tmp_path / "ret.parquet"), "--output", str(out),
         "--batch-size", "8", "--address", "local"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())

    # One process, open_clip alone.
    name = f"local-dir:{tiny / 'model'}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    index = {s: i for i, s in enumerate(ev.imagenet_synsets())}
    classnames = [open_clip.IMAGENET_CLASSNAMES[index[s]] for s in synsets]
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, open_clip.OPENAI_IMAGENET_TEMPLATES
    )
    files = [(p, c) for c, s in enumerate(synsets) for p in sorted((val / s).iterdir())]
    good = [(p, c) for p, c in files if "broken" not in p.name]
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in good])
    target = torch.tensor([c for _, c in good])
    with torch.no_grad():
        logits = 100.0 * model.encode_image(x, normalize=True) @ classifier
    pred = logits.topk(5, 1, True, True)[1].t()  # CLIP_benchmark's / open_clip_train's accuracy
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    top1 = correct[:1].reshape(-1).float().sum().item() / len(good)
    top5 = correct[:5].reshape(-1).float().sum().item() / len(good)
    assert len(set(pred[0].tolist())) >= 3  # the check below can tell class orders apart
    recalls = [(pred[0][target == c] == c).float().mean().item() for c in range(10)]
    assert results["per_class"] == pytest.approx(dict(zip(classnames, recalls, strict=True)))
    assert results["top1"] == pytest.approx(top1, abs=1e-9)
    assert results["top5"] == pytest.approx(top5, abs=1e-9)
    assert results["mean_per_class_recall"] == pytest.approx(np.mean(recalls), abs=1e-9)
    assert (results["num_images"], results["num_classes"], results["skipped_images"]) == (20, 10, 1)
    assert results["num_templates"] == 80 and "tench" in results["per_class"]

    with torch.no_grad():
        pixels = [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:9]]
        image_ID = model.encode_image(torch.stack(pixels), normalize=True)
        texts = [c for row in captions[:10] for c in row]
        text_TD = model.encode_text(tokenizer(texts), normalize=True)
    text_image = [i for i, row in enumerate(captions[:10]) for _ in row]
    text_image[-1] = 4  # row 9 is image 4 again
    positive = torch.zeros(len(texts), 9)
    positive[torch.arange(len(texts)), torch.tensor(text_image)] = 1
    scores = text_TD @ image_ID.T
    for k in (1, 5, 10):
        ref_i = clip_benchmark_recall(scores, positive, min(k, 9))
        ref_t = clip_benchmark_recall(scores.T, positive.T, k)
        assert results[f"image_retrieval_recall@{k}"] == pytest.approx(ref_i, abs=1e-6), k
        assert results[f"text_retrieval_recall@{k}"] == pytest.approx(ref_t, abs=1e-6), k
    counts = [results[f"retrieval_{k}"] for k in ("num_pairs", "num_images", "skipped_images")]
    assert counts == [11, 9, 1]

    # stdout: the Markdown table; stderr: the skipped files counted and named.
    assert f"| top1 | {100 * top1:.2f}% |" in result.stdout
    assert "| true class | predicted as | images |" in result.stdout
    assert "warning: 2 unreadable images skipped" in result.stderr
    assert "ILSVRC2012_val_broken.JPEG" in result.stderr


def test_parquet_and_named_model_equal_folder_and_export(ray_local, tmp_path, tiny):
    """Hugging Face's layout (image struct, int labels) with the model given by name and
    checkpoint scores exactly as the same images in a folder with the exported model."""
    classes = ["ant", "bee", "cow"]
    folder = tmp_path / "folder"
    rows = []
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            data = draw(7 * c + i)
            (folder / name / f"{i}.jpg").write_bytes(data)
            rows.append(({"bytes": data, "path": f"{name}/{i}.jpg"}, c))
    rows.append(({"bytes": b"not an image", "path": "x.jpg"}, 0))
    table = pa.table({"img": pa.array([r for r, _ in rows]), "y": [c for _, c in rows]})
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=4)
    (tmp_path / "names.json").write_text(json.dumps(classes))

    cfg = EvalConfig(batch_size=4, templates="simple", classnames=str(tmp_path / "names.json"))
    data = ev.load_dataset(tmp_path / "hf.parquet", cfg.classnames, cfg.templates, "img", "y")
    by_name = ev.resolve_model(MODEL, str(tiny / "weights.safetensors"))
    from_parquet = ev.evaluate_zero_shot(by_name, data, cfg)
    from_folder = ev.evaluate_zero_shot(tiny / "model", folder, cfg)
    for key in ("top1", "top5", "mean_per_class_recall", "per_class", "most_confused"):
        assert from_parquet[key] == from_folder[key], key
    assert (from_parquet["num_images"], from_parquet["skipped_images"]) == (9, 1)
    assert from_folder["skipped_images"] == 0


def test_run_dir_mode_writes_results_and_tensorboard(
    ray_local, tmp_path, tiny, monkeypatch, capsys
):
    """`jobs/eval.py --run-dir RUN --eval-dataset D` as before, now with TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("eval_job", REPO / "jobs" / "eval.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    # ray_local is up: neither the job's nor the front door's Ray start.
    monkeypatch.setattr(job, "init_ray", lambda address: None)
    monkeypatch.setattr(sys.modules["common"], "init_ray", lambda address: None)

    run = tmp_path / "run"
    shutil.copytree(tiny / "model", run / "model")  # RUN/model as jobs/train.py leaves it
    folder = tmp_path / "eval"
    for c, name in enumerate(["ant", "bee"]):
        (folder / name).mkdir(parents=True)
        (folder / name / "0.png").write_bytes(draw(c, "PNG"))
    args = ["--run-dir", str(run), "--eval-dataset", str(folder), "--templates", "simple"]
    job.run_dir_mode(job.parser().parse_args(args))
    results = json.loads((run / "eval" / "results.json").read_text())
    assert (results["num_images"], results["num_templates"]) == (2, 7)
    # CLIP_benchmark's shape beside ours.
    assert results["task"] == "zeroshot_classification" and results["model"] == str(run / "model")
    assert results["metrics"] == {
        "acc1": results["top1"],
        "acc5": results["top5"],
        "mean_per_class_recall": results["mean_per_class_recall"],
    }
    assert "== Summary" in capsys.readouterr().out
    events = EventAccumulator(str(run / "eval" / "tensorboard"))
    events.Reload()
    (top1,) = events.Scalars("eval/top1")
    assert (top1.step, top1.value) == (0, pytest.approx(results["top1"]))
