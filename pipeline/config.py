"""One frozen dataclass per stage, and the named presets that fill them.

Only ``asdict(config)`` crosses into Ray; workers rebuild the dataclass with
``from_dict``. Every default carries the reason it was chosen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class DemoConfig:
    """The built-in demo corpus: procedurally drawn shapes served on 127.0.0.1."""

    seed: int = 0
    num_train: int = 10_000  # enough pairs for a tiny CLIP to learn 64 classes in minutes
    eval_images_per_class: int = 20  # 64 classes x 20 = 1,280 fresh eval images
    num_retrieval: int = 500  # image-caption pairs for retrieval R@k, unseen captions
    min_image_side: int = 80  # served images are bigger than the training size: resizing is real
    max_image_side: int = 160
    bad_fraction: float = 0.07  # 5-10% bad URLs give the data funnel something to show
    num_heldout: int = 6  # shape-colour combinations never shown in training


@dataclass(frozen=True)
class DownloadConfig:
    """Fetching and resizing, with img2dataset's semantics for the resize options."""

    image_size: int = 64  # the tiny models train at 64 px; datacomp-small uses 224
    resize_mode: str = "center_crop"  # img2dataset: no, keep_ratio, center_crop, border
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout: float = 10.0  # seconds per connect/read; a stalled server cannot hold a thread
    retries: int = 1  # only transient failures (timeouts, 5xx, connection errors) retry
    thread_count: int = 16  # fetches overlapped per actor: downloading is I/O bound
    concurrency: int = 2  # download actors
    batch_size: int = 64  # rows handed to one actor call
    user_agent_token: str | None = "clip-pipeline"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # Private, loopback, link-local and reserved addresses are refused unless listed here.
    allowed_networks: tuple[str, ...] = ()
    max_redirects: int = 5
    max_bytes: int = 16 * MIB  # bodies are capped while streaming
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold


@dataclass(frozen=True)
class FilterConfig:
    """Predicates applied after download; every drop is counted and kept in rejects.

    Duplicate URLs are always dropped before download: a sample's key derives from its URL.
    """

    min_image_side: int = 32  # on the original image: smaller ones are thumbnails or icons
    max_aspect_ratio: float = 3.0  # banners and strips teach nothing about objects
    min_caption_chars: int = 5
    max_caption_chars: int = 1_000
    min_caption_words: int = 2  # a bare word is a label, not a caption
    caption_blocklist: tuple[str, ...] = ()  # regular expressions, matched case-insensitively
    dedup_images: bool = True  # exact duplicates by sha256 of the downloaded bytes


@dataclass(frozen=True)
class TokenizeConfig:
    model: str = "clip-demo-tiny"  # must name the model trained on these tokens


@dataclass(frozen=True)
class PrepareConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    rows_per_shard: int = 2_000  # ~2-6 MB shards at 64 px: a few per worker, cheap to stream
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "clip-demo-tiny"  # an open_clip model name or a path to an open_clip JSON config
    num_workers: int = 2
    use_gpu: bool = False
    # Fractional CPUs let two training workers and Ray Data's decode tasks share 2 cores.
    cpus_per_worker: float = 0.5
    global_batch_size: int = 256
    epochs: int = 10
    lr: float = 2e-3  # tiny models at batch 256 train fast with a high lr and warmup
    weight_decay: float = 0.1
    warmup_steps: int = 50
    init_temperature: float = 0.07  # CLIP's initial temperature, logit scale 1/0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # CLIP clamps the learned scale here
    seed: int = 0
    checkpoint_every_steps: int = 200
    max_failures: int = 2  # worker deaths survived by restoring the last checkpoint
    log_every_steps: int = 10


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    classnames: str | None = None  # a file, or "imagenet"; default: classnames.txt or folders
    templates: str | None = None  # a file, or "openai"/"simple"; default: templates.txt
    concurrency: int = 1  # embedding actors (each loads the model once)


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "demo"
    demo: DemoConfig = field(default_factory=DemoConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _tiny() -> PipelineConfig:
    # The same path as the demo on a few hundred pairs: about a minute, for tests.
    return PipelineConfig(
        preset="tiny",
        demo=DemoConfig(num_train=400, eval_images_per_class=2, num_retrieval=64),
        prepare=PrepareConfig(rows_per_shard=150),
        train=TrainConfig(global_batch_size=64, epochs=2, warmup_steps=2, checkpoint_every_steps=5),
        eval=EvalConfig(batch_size=128),
    )


def _datacomp_small() -> PipelineConfig:
    # DataComp small scale: ViT-B-32 at 224 px, global batch 4096, lr 5e-4, warmup 500.
    return PipelineConfig(
        preset="datacomp-small",
        prepare=PrepareConfig(
            rows_per_shard=10_000,
            download=DownloadConfig(image_size=224, concurrency=16, thread_count=64),
            tokenize=TokenizeConfig(model="ViT-B-32"),
        ),
        train=TrainConfig(
            model="ViT-B-32",
            num_workers=8,
            use_gpu=True,
            cpus_per_worker=8,
            global_batch_size=4096,
            epochs=1,
            lr=5e-4,
            weight_decay=0.2,
            warmup_steps=500,
            checkpoint_every_steps=1_000,
        ),
        eval=EvalConfig(concurrency=4),
    )


PRESETS = {
    "demo": PipelineConfig,
    "tiny": _tiny,
    "datacomp-small": _datacomp_small,
}


def get_preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from ``asdict`` output, e.g. on a Ray worker."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, dict) and dataclasses.is_dataclass(f.default_factory):
            value = from_dict(f.default_factory, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def config_hash(config: Any) -> str:
    """A short, stable fingerprint of a config: a finished stage is reused only if it matches."""
    payload = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
