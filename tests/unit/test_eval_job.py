"""jobs/eval.py's standalone mode without Ray: every bad input is a clear message before Ray
starts; models, class names and datasets resolve as documented."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline import evaluate as ev
from pipeline.train.modeling import create_model, export_local_dir, model_config

REPO = Path(__file__).resolve().parents[2]
SYNSETS = ev.imagenet_synsets()


def _load_job():
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("eval_job", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = _load_job()


def png(seed: int, size=(12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, classes=("cat", "dog", "red_fox"), per_class=2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png(10 * c + i))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random clip-demo-tiny: its export dir, and the same weights as .pt and .safetensors."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = create_model("clip-demo-tiny")
    export_local_dir(model, model_config("clip-demo-tiny"), root / "model")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "ckpt.pt")
    save_file(state, str(root / "ckpt.safetensors"))
    return root


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(address):
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(job, "init_ray", refuse)


def standalone(*argv: str):
    return job.standalone(job.parser().parse_args(list(argv)))


def _bad_input_cases(tmp: Path, tiny: Path) -> dict[str, tuple[list[str], str]]:
    model = ["--model", str(tiny / "model")]
    good = make_folder(tmp / "good")
    (tmp / "empty").mkdir()
    make_folder(tmp / "empty_class")
    (tmp / "empty_class" / "zebra").mkdir()
    (tmp / "two.txt").write_text("one\ntwo\n")
    (tmp / "map.json").write_text(json.dumps({"cat": "a cat", "dog": "a dog"}))
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "open_clip_config.json").write_text(
        (tiny / "model" / "open_clip_config.json").read_text()
    )
    (tmp / "noconfig").mkdir()
    table = pa.table({"image": [png(0), png(1)], "label": [0, 7], "name": ["a", "b"]})
    pq.write_table(table, tmp / "ints.parquet")
    return {
        "empty folder": (
            [*model, "--dataset", str(tmp / "empty")],
            "has no class sub-folders",
        ),
        "empty class folder": (
            [*model, "--dataset", str(tmp / "empty_class")],
            "zebra has no images",
        ),
        "classnames length": (
            [*model, "--dataset", str(good), "--classnames", str(tmp / "two.txt")],
            "two.txt has 2 class names but",
        ),
        "classnames mapping": (
            [*model, "--dataset", str(good), "--classnames", str(tmp / "map.json")],
            "missing: ['red_fox']",
        ),
        "imagenet on other folders": (
            [*model, "--dataset", str(good), "--classnames", "imagenet"],
            "are not ImageNet-1k synset ids",
        ),
        "unknown model": (
            ["--model", "ViT-Z-99", "--dataset", str(good)],
            "unknown model 'ViT-Z-99': pass an exported model directory",
        ),
        "name without weights": (
            ["--model", "clip-demo-tiny", "--dataset", str(good)],
            "pass --pretrained PATH",
        ),
        "missing checkpoint": (
            ["--model", "clip-demo-tiny", "--pretrained", str(tmp / "no.pt"), "--dataset", "x"],
            "no.pt': no such file",
        ),
        "checkpoint of another model": (
            [
                "--model",
                "clip-demo-vit-tiny",
                "--pretrained",
                str(tiny / "ckpt.pt"),
                "--dataset",
                str(good),
            ],
            "do not fit the model",
        ),  # fmt: skip
        "model dir without weights": (
            ["--model", str(tmp / "noweights"), "--dataset", str(good)],
            "has open_clip_config.json but no weights",
        ),
        "model dir without config": (
            ["--model", f"local-dir:{tmp / 'noconfig'}", "--dataset", str(good)],
            "no open_clip_config.json",
        ),
        "missing model dir": (
            ["--model", str(tmp / "runs" / "model"), "--dataset", str(good)],
            "no such directory",
        ),
        "pretrained with a dir": (
            [*model, "--pretrained", str(tiny / "ckpt.pt"), "--dataset", str(good)],
            "--pretrained is for an open_clip model name",
        ),
        "no dataset": (model, "pass --dataset"),
        "parquet label column": (
            [*model, "--dataset", str(tmp / "ints.parquet"), "--label-col", "cls"],
            "no column 'cls' (--label-col); its columns: image, label, name",
        ),
        "int labels without names": (
            [*model, "--dataset", str(tmp / "ints.parquet")],
            "holds integers; pass --classnames",
        ),
        "int labels out of range": (
            [*model, "--dataset", str(tmp / "ints.parquet"), "--classnames", str(tmp / "two.txt")],
            "labels [7] are outside the 2 class names",
        ),
        "image column of text": (
            [*model, "--dataset", str(tmp / "ints.parquet"), "--image-col", "name"],
            "not encoded image bytes",
        ),
        "retrieval without captions": (
            [*model, "--retrieval", str(tmp / "ints.parquet")],
            "no column 'caption' (--caption-col)",
        ),
        "output is a folder": (
            [*model, "--dataset", str(good), "--output", str(tmp)],
            "is a directory",
        ),
    }


def test_every_bad_input_is_named_before_ray(tmp_path, tiny, no_ray):
    for case, (argv, message) in _bad_input_cases(tmp_path, tiny).items():
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            standalone(*argv)
        assert message in str(info.value), (case, str(info.value))


def test_cli_bad_input_is_one_line_and_status_2(tmp_path):
    make_folder(tmp_path / "d")
    result = subprocess.run(
        [sys.executable, "jobs/eval.py", "--model", "ViT-Z-99", "--dataset", str(tmp_path / "d")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: unknown model 'ViT-Z-99'")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_imagenet_classnames_full_and_partial(tmp_path):
    assert len(SYNSETS) == 1000 and SYNSETS[:2] == ("n01440764", "n01443537")
    # A full validation layout: sorted synset folders are exactly open_clip's class order.
    root = tmp_path / "val"
    for synset in SYNSETS:
        (root / synset).mkdir(parents=True)
        (root / synset / "ILSVRC2012_val_00000001.JPEG").write_bytes(png(0, (8, 8)))
    data = ev.load_image_folder(root, "imagenet", "openai")
    assert data.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert len(data.templates) == 80 and len(data.paths) == 1000
    # A partial copy: each synset folder maps to its own name, whatever the subset.
    subset = [SYNSETS[1], SYNSETS[100], SYNSETS[999]]
    names = ev.resolve_classnames("imagenet", tmp_path, subset)
    assert names == ["goldfish", "black swan", "toilet paper"]
    # 1000 folders named otherwise map by position (sorted folder order).
    numbered = [f"{i:04d}" for i in range(1000)]
    assert ev.resolve_classnames("imagenet", tmp_path, numbered)[5] == "electric ray"


def test_classnames_json_list_and_mapping(tmp_path):
    root = make_folder(tmp_path / "d")
    mapping = {"cat": "kitty", "dog": "doggo", "red_fox": "fox", "extra": "unused"}
    (root / "classnames.json").write_text(json.dumps(mapping))
    assert ev.load_image_folder(root).classnames == ["kitty", "doggo", "fox"]
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    assert ev.load_image_folder(root, str(tmp_path / "names.json")).classnames == ["a", "b", "c"]


def test_parquet_labels(tmp_path):
    images = [png(i) for i in range(4)]
    pq.write_table(
        pa.table({"image": images, "label": ["dog", "cat", "dog", "red_fox"]}), tmp_path / "s.pq"
    )
    (tmp_path / "s.pq").rename(tmp_path / "s.parquet")
    data = ev.load_dataset(tmp_path / "s.parquet", templates="simple")
    assert isinstance(data, ev.ParquetSet) and data.num_rows == 4
    assert data.classnames == data.label_keys == ["cat", "dog", "red_fox"]  # sorted, verbatim
    assert data.label_ids(np.array(["dog", "red_fox"], dtype=object)).tolist() == [1, 2]
    (tmp_path / "m.json").write_text(json.dumps({"cat": "tabby", "dog": "hound", "red_fox": "fox"}))
    named = ev.load_dataset(tmp_path / "s.parquet", str(tmp_path / "m.json"))
    assert named.classnames == ["tabby", "hound", "fox"] and len(named.templates) == 80

    # Hugging Face's layout: image {bytes, path}, integer labels indexing the class names.
    struct = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)])
    pq.write_table(pa.table({"img": struct, "y": [0, 999, 1, 0]}), tmp_path / "hf.parquet")
    hf = ev.load_dataset(tmp_path / "hf.parquet", "imagenet", image_col="img", label_col="y")
    assert hf.label_keys is None and len(hf.classnames) == 1000
    assert hf.label_ids([999]).tolist() == [999]
    (tmp_path / "ids.json").write_text(json.dumps({"1": "b", "0": "a"}))
    pq.write_table(pa.table({"image": images[:2], "label": [1, 0]}), tmp_path / "two.parquet")
    assert ev.load_dataset(tmp_path / "two.parquet", str(tmp_path / "ids.json")).classnames == [
        "a",
        "b",
    ]


def test_model_forms_load_the_same_weights(tiny):
    by_dir = ev.resolve_model(tiny / "model")
    assert by_dir == ev.resolve_model(f"local-dir:{tiny / 'model'}")
    assert by_dir.is_dir and by_dir.pretrained is None
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = ev.load_model(by_dir)[0].encode_image(x)
        for ckpt in ("ckpt.pt", "ckpt.safetensors"):
            ref = ev.resolve_model("clip-demo-tiny", str(tiny / ckpt))
            assert (ref.model, ref.pretrained) == ("clip-demo-tiny", str(tiny / ckpt))
            model, preprocess, tokenizer = ev.load_model(ref)
            assert torch.equal(model.encode_image(x), reference)
    assert tokenizer(["a cat"]).shape == (
        1,
        open_clip.get_tokenizer("clip-demo-tiny").context_length,
    )


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = {"top1": 0.5, "top5": 0.75, "seen_top1": 0.25, "heldout_top1": None}
    results |= {"text_retrieval_recall@1": 0.125, "num_images": 8, "per_class": {"a": 1.0}}
    ev.write_tensorboard(results, tmp_path / "tb", step=7)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"eval/top1", "eval/top5", "eval/seen_top1", "eval/text_retrieval_recall_at_1"}
    (top1,) = events.Scalars("eval/top1")
    assert (top1.step, top1.value) == (7, 0.5)


def test_run_dir_mode_takes_eval_flags(tmp_path):
    args = job.parser().parse_args(
        ["--run-dir", str(tmp_path / "r"), "--classnames", "imagenet", "--batch-size", "32"]
    )
    assert not any(getattr(args, k) is not None for k in job.STANDALONE)  # run-dir mode
    spec = job.run_dir_spec(args)
    cfg = spec.config.eval
    assert (cfg.classnames, cfg.templates, cfg.batch_size) == ("imagenet", None, 32)
    assert spec.stages == ("evaluate",)
    assert dict(spec.set_by) == {
        "eval.classnames": "--classnames",
        "eval.batch_size": "--batch-size",
    }


def test_markdown_lists_confusions():
    text = ev.format_markdown(
        {"top1": 0.5, "most_confused": [("cat", "dog", 3), ("dog", "cat", 1)]}, num_confused=1
    )
    assert "| cat | dog | 3 |" in text and "| dog | cat |" not in text
