"""Training on a local Ray: 2 gloo workers stream real Parquet shards, checkpoint and export."""

from __future__ import annotations

import io
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

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
from pipeline.data.tokenize import load_tokenizer
from pipeline.train.loop import CHECKPOINT_FILE, run_training

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
    # Two workers (the default, auto, picks one on a CPU machine): the multi-worker path.
    cfg = TrainConfig(
        num_workers=2,
        cpus_per_worker=0.5,
        global_batch_size=32,
        epochs=2,
        warmup_steps=1,
        checkpoint_every_steps=4,
        log_every_steps=2,
    )
    staged = set(Path(tempfile.gettempdir()).glob("clip-ckpt-*"))
    result, metrics = run_training(cfg, shards, 96, tmp_path)
    # Each checkpoint is staged in a temporary folder for Ray Train to upload: none stays behind.
    assert set(Path(tempfile.gettempdir()).glob("clip-ckpt-*")) <= staged

    # 96 samples / global batch 32 = 3 steps an epoch, for 2 epochs.
    assert metrics["step"] == 6
    assert np.isfinite(metrics["loss"])
    assert metrics["samples_per_second"] > 0
    assert 0.0 <= metrics["data_wait_fraction"] <= 1.0

    # The export is the final checkpoint's weights, in open_clip's local-dir layout.
    with result.checkpoint.as_directory() as d:
        state = torch.load(f"{d}/{CHECKPOINT_FILE}", weights_only=True)
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
    from pipeline.train.modeling import create_model

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


def _equivalence_loop(config):
    """On each Ray Train worker: one step on this rank's slice of a fixed global batch, through
    the real DDP wrapper and loss; rank 0 saves the averaged gradients."""
    import ray.train
    import ray.train.torch

    from pipeline.train.contrastive import build_loss, contrastive_step
    from pipeline.train.modeling import create_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(create_model(config["model"]))
    images, texts = torch.load(config["batch"], weights_only=True)
    rows = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    grads = {}
    for accum_freq in (1, 2):
        model.zero_grad(set_to_none=True)
        loss_fn = build_loss("clip", rank, world)
        contrastive_step(model, loss_fn, images[rows], texts[rows], accum_freq)
        grads[accum_freq] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    if rank == 0:
        torch.save(grads, config["out"])
    ray.train.report({"done": 1})


def test_two_workers_compute_the_gradients_of_one_process_over_the_global_batch(
    ray_local, tmp_path
):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.contrastive import build_loss, contrastive_step
    from pipeline.train.modeling import create_model, model_config

    # Test modules are not importable on Ray workers: ship the loop function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    model_name = "clip-demo-vit-tiny"  # LayerNorm only: BatchNorm statistics are per worker
    size = model_config(model_name)["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, size, size, generator=g)
    texts = torch.randint(1, 400, (16, 24), generator=g)
    torch.save((images, texts), tmp_path / "batch.pt")

    trainer = TorchTrainer(
        _equivalence_loop,
        train_loop_config={
            "model": model_name,
            "batch": str(tmp_path / "batch.pt"),
            "out": str(tmp_path / "grads.pt"),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    workers = torch.load(tmp_path / "grads.pt", weights_only=True)

    torch.manual_seed(0)
    model = create_model(model_name)
    contrastive_step(model, build_loss("clip", 0, 1), images, texts)
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert sorted(workers) == [1, 2]  # without and with feature-cache accumulation
    for accum_freq, grads in workers.items():
        assert set(grads) == set(reference)
        for name, grad in reference.items():
            msg = f"{name}, accum_freq={accum_freq}"
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=msg)
    # Without gathering negatives the gradients differ: the check above can fail.
    model.zero_grad()
    half = slice(0, 8)
    contrastive_step(model, build_loss("clip", 0, 1), images[half], texts[half])
    assert not torch.allclose(model.logit_scale.grad, reference["logit_scale"], atol=1e-5)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _train_workers_of_this_ray(ray_module) -> list[int]:
    """PIDs of Ray Train workers started by this test session's raylet, and no one else's."""
    node = ray_module._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    pids = []
    for pid in _descendants(raylet):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def test_a_killed_worker_is_replaced_and_the_run_resumes_from_its_last_checkpoint(
    ray_local, tmp_path
):
    shards = tmp_path / "data" / "shards"
    _write_shards(shards, 96)
    cfg = TrainConfig(
        num_workers=2,
        cpus_per_worker=0.5,
        global_batch_size=32,
        max_steps=60,
        warmup_steps=1,
        checkpoint_every_steps=5,
        log_every_steps=5,
        zeroshot_every_steps=0,
    )
    outcome = {}

    def train():
        outcome["result"], outcome["metrics"] = run_training(cfg, shards, 96, tmp_path)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 600
    # Two checkpoints on disk: the first one's report has certainly completed (registered).
    while len(list((tmp_path / "train").glob("checkpoint_*/state.pt"))) < 2:
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    victims = _train_workers_of_this_ray(ray_local)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)

    assert outcome["metrics"]["step"] == 60  # the configured number of steps, no more, no less
    with outcome["result"].checkpoint.as_directory() as d:
        state = torch.load(f"{d}/{CHECKPOINT_FILE}", weights_only=True)
    assert state["step"] == 60
    # It restarted once, from a checkpoint step (not from zero, not mid-interval).
    assert len(state["resumes"]) == 1
    assert state["resumes"][0] > 0 and state["resumes"][0] % 5 == 0
    assert not set(_train_workers_of_this_ray(ray_local)) & set(victims)


def test_siglip_with_a_fixed_temperature_and_a_zero_shot_probe(ray_local, tmp_path):
    shards = tmp_path / "data" / "shards"
    _write_shards(shards, 96)
    folder = tmp_path / "val"
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), rgb).save(folder / name / f"{i}.png")
    (folder / "templates.txt").write_text("a photo of something {}\n")
    cfg = TrainConfig(
        loss="siglip",
        init_temperature=0.1,
        learn_temperature=False,
        global_batch_size=32,
        max_steps=6,
        warmup_steps=1,
        checkpoint_every_steps=3,
        log_every_steps=3,
        zeroshot_every_steps=3,
        zeroshot_images_per_class=2,
    )
    _, metrics = run_training(cfg, shards, 96, tmp_path, zeroshot_dataset=folder)

    assert 0.0 <= metrics["zeroshot_top1"] <= 1.0
    events = EventAccumulator(str(tmp_path / "train" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/zeroshot_top1")] == [3, 6]
    # A fixed temperature stays exactly where it was set.
    assert {round(e.value, 4) for e in events.Scalars("train/logit_scale")} == {10.0}
    # The export keeps SigLIP's learned bias: open_clip rebuilds the model and loads it.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    assert model.logit_bias is not None
    assert model.logit_bias.item() != pytest.approx(cfg.init_logit_bias, abs=1e-6)
