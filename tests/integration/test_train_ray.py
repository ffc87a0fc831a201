"""Training on a local Ray: 2 gloo workers stream real Parquet shards, checkpoint and export."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import schema
from pipeline.config import TrainConfig
from pipeline.tokenize import load_tokenizer
from pipeline.train import CHECKPOINT_FILE, run_training

pytestmark = pytest.mark.integration

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}


def _write_shards(directory, n: int, files: int = 3) -> None:
    """Solid-colour images captioned with their colour: real JPEGs, real tokens."""
    directory.mkdir(parents=True)
    tokenizer = load_tokenizer("clip-demo-tiny")
    rows = []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), rgb).save(buf, "JPEG")
        caption = f"a photo of something {name}"
        rows.append(
            {
                "key": f"k{i}", "url": f"http://example.com/{i}.jpg", "caption": caption,
                "jpg": buf.getvalue(), "width": 64, "height": 64, "original_width": 64,
                "original_height": 64, "sha256": f"{i}", "tokens": tokenizer([caption])[0].tolist(),
            }
        )  # fmt: skip
    per_file = -(-n // files)
    for f in range(files):
        chunk = rows[f * per_file : (f + 1) * per_file]
        table = pa.Table.from_pylist(chunk, schema=schema.SAMPLE)
        pq.write_table(table, directory / f"part-{f:05d}.parquet")


def test_two_workers_train_checkpoint_and_export(ray_local, tmp_path):
    shards = tmp_path / "data" / "shards"
    _write_shards(shards, 96)
    cfg = TrainConfig(
        global_batch_size=32, epochs=2, warmup_steps=1, checkpoint_every_steps=4, log_every_steps=2
    )
    result, metrics = run_training(cfg, shards, 96, tmp_path)

    # 96 samples / global batch 32 = 3 steps an epoch, for 2 epochs.
    assert metrics["step"] == 6
    assert np.isfinite(metrics["loss"])
    assert metrics["samples_per_second"] > 0
    assert 0.0 <= metrics["data_wait_fraction"] <= 1.0

    # The export is the final checkpoint's weights, in open_clip's local-dir layout.
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/{CHECKPOINT_FILE}", weights_only=False)
    assert state["step"] == 6
    exported = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    assert set(exported) == set(state["model"])
    for name, tensor in state["model"].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'model'}")
    image = preprocess(Image.new("RGB", (80, 80), COLOURS["red"])).unsqueeze(0)
    with torch.no_grad():
        features = model.encode_image(image, normalize=True)
        text = model.encode_text(tokenizer(["a photo of something red"]), normalize=True)
    assert features.shape == text.shape == (1, 96)

    # Training moved the weights away from the initialisation every worker started from.
    torch.manual_seed(cfg.seed)
    from pipeline.modeling import create_model

    initial = create_model(cfg.model).state_dict()
    moved = [n for n, t in initial.items() if not torch.equal(t, state["model"][n])]
    assert len(moved) > len(initial) // 2

    # TensorBoard scalars from rank 0, readable with TensorBoard's own reader.
    events = EventAccumulator(str(tmp_path / "train" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert events.Scalars("train/logit_scale")[-1].value <= cfg.max_logit_scale


def test_too_few_samples_is_refused_before_training(ray_local, tmp_path):
    shards = tmp_path / "shards"
    _write_shards(shards, 8, files=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run_training(TrainConfig(global_batch_size=32), shards, 8, tmp_path)
