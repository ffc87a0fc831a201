"""pipeline.evaluate without Ray: dataset resolution, metrics, and the batch function."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline import evaluate as ev
from pipeline.train.modeling import create_model, export_local_dir, load_local_dir, model_config

COLORS = {
    "blue_square": (30, 60, 220),
    "green_circle": (30, 200, 60),
    "red_triangle": (220, 40, 30),
}


def make_folder(root, images_per_class=3, corrupt=True):
    """3 classes x images_per_class small images, plus one corrupt file in the first class."""
    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(images_per_class):
            noise = rng.integers(0, 80, size=(48 + 8 * i, 56, 3), dtype=np.uint8)
            img = Image.fromarray(noise)
            ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=color)
            img.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / "blue_square" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("clip-demo-tiny")
    return export_local_dir(model, model_config("clip-demo-tiny"), tmp_path_factory.mktemp("m"))


def accuracy(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy, but `.item()` where it calls float() on a shape-(1,)
    array, which NumPy >= 2.4 refuses (TypeError); the counting is unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).item()) for k in topk]


def reference_logits(model_dir, data):
    """open_clip alone, one process, one batch: what open_clip_train's zero-shot eval computes."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, data.classnames, data.templates, device="cpu"
    )
    good = [(p, y) for p, y in zip(data.paths, data.labels, strict=True) if "broken" not in p]
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in good])
    with torch.no_grad():
        output = model(image=x)
    features = output["image_features"] if isinstance(output, dict) else output[0]
    return features, 100.0 * features @ classifier, torch.tensor([y for _, y in good])


def test_folder_defaults(tmp_path):
    data = ev.load_image_folder(make_folder(tmp_path / "d"))
    assert data.folders == sorted(COLORS)
    assert data.classnames == ["blue square", "green circle", "red triangle"]
    assert len(data.templates) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert len(data.paths) == 10 and data.labels == [0] * 4 + [1] * 3 + [2] * 3
    assert data.groups == {}


def test_folder_files_and_explicit_choices(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "classnames.txt").write_text("a square\na circle\na triangle\n")
    (root / "templates.txt").write_text("# mine\n\na photo of {}.\n{c}, drawn {{ish}}\n")
    (root / "splits.json").write_text(json.dumps({"seen": ["blue_square"], "heldout": []}))
    data = ev.load_image_folder(root)
    assert data.classnames == ["a square", "a circle", "a triangle"]
    assert [t("x") for t in data.templates] == ["a photo of x.", "x, drawn {{ish}}"]
    assert data.groups == {"seen": [0], "heldout": []}
    simple = ev.load_image_folder(root, templates="simple").templates
    assert simple == list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    with pytest.raises(ValueError, match="1000 class names"):
        ev.load_image_folder(root, classnames="imagenet")


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("no_classes", ValueError, "no class sub-folders"),
        ("empty_class", ValueError, "has no images"),
        ("classnames", ValueError, "2 class names but"),
        ("templates", ValueError, "no templates"),
        ("placeholder", ValueError, "has no {}"),
        ("splits", ValueError, "unknown folders \\['purple'\\]"),
        ("templates_arg", FileNotFoundError, "nope.txt"),
    ],
)
def test_folder_errors(tmp_path, case, error, message):
    root = tmp_path / "d"
    kwargs = {}
    if case == "no_classes":
        root.mkdir()
        (root / "stray.png").write_bytes(b"")
    elif case != "missing":
        make_folder(root)
    if case == "empty_class":
        (root / "zebra").mkdir()
        (root / "zebra" / "notes.txt").write_text("no images here")
    elif case == "classnames":
        (root / "classnames.txt").write_text("one\ntwo\n")
    elif case == "templates":
        (root / "templates.txt").write_text("# only a comment\n\n")
    elif case == "placeholder":
        (root / "templates.txt").write_text("a photo.\n")
    elif case == "splits":
        (root / "splits.json").write_text(json.dumps({"seen": ["blue_square", "purple"]}))
    elif case == "templates_arg":
        kwargs["templates"] = str(tmp_path / "nope.txt")
    with pytest.raises(error, match=message) as info:
        ev.load_image_folder(root, **kwargs)
    assert str(tmp_path) in str(info.value)


def test_classification_metrics_known_answer():
    # 4 images, 3 classes: image 1 (class 0) is called 1, image 3 (class 2) is called 0; with
    # 3 classes top-5 is top-3, which always holds the answer.
    logits = [[9, 1, 0], [5, 6, 0], [0, 9, 1], [9, 1, 2]]
    m = ev.classification_metrics(
        logits, [0, 0, 1, 2], ["a", "b", "c"], groups={"seen": [0, 1], "heldout": [2], "none": []}
    )
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["most_confused"] == [("a", "b", 1), ("c", "a", 1)]
    assert (m["seen_top1"], m["heldout_top1"], m["none_top1"]) == (pytest.approx(2 / 3), 0.0, None)
    assert (m["num_images"], m["num_classes"]) == (4, 3)
    # A class without images is left out of the per-class mean (as balanced accuracy does).
    assert (
        ev.classification_metrics([[1, 0, 0]], [0], ["a", "b", "c"])["mean_per_class_recall"] == 1
    )
    # Repeated names (ImageNet has two 'missile') keep distinct per-class keys.
    assert set(ev.classification_metrics([[1, 0]], [0], ["x", "x"])["per_class"]) == {"x (0)"}


def test_classification_metrics_equal_open_clip_accuracy():
    gen = torch.Generator().manual_seed(0)
    logits, labels = (
        torch.randn(200, 12, generator=gen),
        torch.randint(0, 12, (200,), generator=gen),
    )
    top1, top5 = accuracy(logits, labels, topk=(1, 5))
    m = ev.classification_metrics(logits, labels, [str(i) for i in range(12)])
    assert (m["top1"], m["top5"]) == (top1 / 200, top5 / 200)


def test_retrieval_metrics_known_answer_and_clip_benchmark():
    # Text queries (rows): text 0 ranks image 0 first, text 1 image 1 second, text 2 image 2 last.
    scores = [[0.9, 0.1, 0.0], [0.8, 0.7, 0.2], [0.5, 0.6, 0.1]]
    m = ev.retrieval_metrics(scores, ks=(1, 2, 10))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["image_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@10"] == 1.0  # k capped at the 3 candidates
    # Image queries (columns): images 0 and 1 find their text first, image 2 second.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0

    # CLIP_benchmark's recall_at_k (one-hot formulation) on random scores with 2 captions/image.
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 20, generator=gen)
    positive = torch.zeros(40, 20, dtype=torch.bool)
    positive[torch.arange(40), torch.arange(40) // 2] = True

    def clip_benchmark_recall(s, p, k):
        onehot = torch.nn.functional.one_hot(s.topk(k, dim=1)[1], num_classes=s.shape[1])
        return ((onehot * p.view(s.shape[0], 1, -1)).sum(dim=(1, 2)) > 0).float().mean().item()

    m = ev.retrieval_metrics(scores, positive, ks=(1, 5))
    for k in (1, 5):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(
            clip_benchmark_recall(scores, positive, k)
        )
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(
            clip_benchmark_recall(scores.T, positive.T, k)
        )


def test_embedder_batch_equals_open_clip(tmp_path, model_dir):
    root = make_folder(tmp_path / "d")
    (root / "templates.txt").write_text("a photo of a {}.\na drawing of the {c}.\n")
    data = ev.load_image_folder(root)
    embedder = ev.ImageEmbedder(str(model_dir))
    batch = {
        "index": np.arange(len(data.paths)),
        "path": np.array(data.paths, dtype=object),
        "label": np.array(data.labels),
    }
    out = embedder(batch)
    assert out["ok"].tolist() == ["broken" not in p for p in data.paths]
    assert out["embedding"].dtype == np.float32 and not out["embedding"][~out["ok"]].any()
    assert np.allclose(np.linalg.norm(out["embedding"][out["ok"]], axis=1), 1, atol=1e-5)
    assert out["label"].tolist() == data.labels and "path" not in out

    features, ref_logits, ref_labels = reference_logits(model_dir, data)
    emb = torch.from_numpy(out["embedding"][out["ok"]])
    assert torch.allclose(emb, features, atol=1e-5)
    # Bytes in an `image` column go the same way (the retrieval path).
    encoded = np.array([open(p, "rb").read() for p in data.paths[:2]], dtype=object)
    as_bytes = embedder({"index": np.arange(2), "image": encoded})
    assert np.allclose(as_bytes["embedding"], out["embedding"][:2], atol=1e-6)

    model, _, tokenizer = load_local_dir(model_dir)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, data.classnames, data.templates
    )
    m = ev.classification_metrics(100 * emb @ classifier, out["label"][out["ok"]], data.classnames)
    top1, top3 = accuracy(ref_logits, ref_labels, topk=(1, 3))  # k = min(5, 3 classes)
    assert (m["top1"], m["top5"], m["num_images"]) == (top1 / 9, top3 / 9, 9)


def test_format_markdown():
    text = ev.format_markdown(
        {"top1": 0.5, "top5": 1.0, "seen_top1": 0.25, "heldout_top1": None, "num_images": 4}
        | {"per_class": {"a": 1.0}, "text_retrieval_recall@1": 0.125}
    )
    lines = text.splitlines()
    assert lines[:2] == ["| metric | value |", "|---|---:|"]
    assert "| top1 | 50.00% |" in lines and "| heldout_top1 | n/a |" in lines
    assert "| seen_top1 | 25.00% |" in lines and "| text_retrieval_recall@1 | 12.50% |" in lines
    assert "| num_images | 4 |" in lines and "per_class" not in text
