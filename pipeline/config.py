"""One frozen dataclass per stage, and the named presets that fill them.

Only ``asdict(config)`` crosses into Ray; workers rebuild the dataclass with
``from_dict``. Every default carries the reason it was chosen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The project's open_clip model configs (pipeline/models/*.json), registered by name.
MODEL_CONFIG_DIR = Path(__file__).parent / "models"


def read_model_config(path: str | Path) -> dict[str, Any]:
    """An open_clip model config file, parsed; one that is not JSON is named in the error."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {str(path)!r} is not valid JSON: {err}") from err


MIB = 1024 * 1024


def choices(*values: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the values a field accepts (checked in config files, listed by --help)."""
    return {"choices": values}


@dataclass(frozen=True)
class DemoConfig:
    """The built-in demo corpus: procedurally drawn shapes served on 127.0.0.1."""

    seed: int = 0
    num_train: int = 10_000  # enough pairs for a tiny CLIP to learn 64 classes in minutes
    eval_images_per_class: int = 20  # 64 classes x 20 = 1,280 fresh eval images
    # 1,024 images: a sweep ranks trials on this probe, and on 256 a trial's top-1 moves by
    # 2-3 points from one probe to the next on sampling noise alone (training probes 4/class).
    val_images_per_class: int = 16
    num_retrieval: int = 500  # image-caption pairs for retrieval R@k, unseen captions
    min_image_side: int = 80  # served images are bigger than the training size: resizing is real
    max_image_side: int = 160
    bad_fraction: float = 0.07  # 5-10% bad URLs give the data funnel something to show
    num_heldout: int = 6  # shape-colour combinations never shown in training


@dataclass(frozen=True)
class DownloadConfig:
    """Fetching and resizing, with img2dataset's semantics for the resize options."""

    image_size: int = 64  # the tiny models train at 64 px; datacomp-small uses 224
    # img2dataset's resize modes
    resize_mode: str = field(
        default="center_crop", metadata=choices("no", "keep_ratio", "center_crop", "border")
    )
    resize_only_if_bigger: bool = False
    encode_format: str = field(default="jpg", metadata=choices("jpg", "png", "webp"))
    encode_quality: int = 95
    timeout: float = 10.0  # seconds per connect/read; a stalled server cannot hold a thread
    retries: int = 1  # only transient failures (timeouts, 5xx, connection errors) retry
    thread_count: int = 16  # fetches overlapped per actor: downloading is I/O bound
    # Unused since prepare runs one task per input shard on every CPU the cluster has (kept so
    # configs naming it stay valid).
    concurrency: int = 2
    batch_size: int = 64  # rows handed to one actor call
    user_agent_token: str | None = "clip-pipeline"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # Private, loopback, link-local and reserved addresses are refused unless listed here.
    allowed_networks: tuple[str, ...] = ()
    max_redirects: int = 5
    max_bytes: int = 16 * MIB  # bodies are capped while streaming
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold
    # JPEGs much bigger than the target are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    # scaling) before img2dataset's resize: same output size, visually the same, several
    # times less decoding work. False: always img2dataset's full-size decode.
    fast_resize: bool = True


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
    # Near-duplicates: 64-bit perceptual hashes (imagehash.phash) within this Hamming distance
    # of an earlier kept image. None: off (re-encodes and resizes of one photo are 0-4 apart;
    # the demo's drawn shapes are legitimately alike, so it is off by default).
    near_duplicate_distance: int | None = None
    # An eval image folder: training images within `decontaminate_distance` of any of its
    # images are dropped, so zero-shot scores are not inflated by memorised test images.
    decontaminate: str | None = None
    decontaminate_distance: int = 4  # a little looser than near-dups: a leak costs more


@dataclass(frozen=True)
class TokenizeConfig:
    model: str = "clip-demo-tiny"  # must name the model trained on these tokens


@dataclass(frozen=True)
class PrepareConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    # Input rows per shard: shard N holds the survivors of input rows [N*k, (N+1)*k), and is
    # the unit of resume (~2-6 MB shards at 64 px: a few per worker, cheap to stream).
    rows_per_shard: int = 2_000
    # Extra URL-list columns carried into shards and rejects, after the DESIGN.md columns.
    save_additional_columns: tuple[str, ...] = ()
    # Stop the run (error, exit 2) once more than this fraction of the rows fetched so far
    # (100 at least) failed to download: a mostly dead list. None: never stop.
    max_failure_rate: float | None = None
    # A shard task whose worker finishes no download batch for this long is failed and run
    # again (a hung worker must not hold the run). None: no watchdog.
    stall_minutes: float | None = 10.0
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "clip-demo-tiny"  # an open_clip model name or a path to an open_clip JSON config
    # auto: decided from the cluster once Ray starts (pipeline/train/layout.py): one worker per
    # GPU; on CPUs one worker per node using the node's cores (on 2 cores it trains 1.7x faster
    # than 2 workers, which all-reduce gradients over the same cores); a sweep's trial: one.
    # An integer: that many workers, cpus_per_worker CPUs each.
    num_workers: int | str = "auto"
    use_gpu: bool = False
    # The CPUs of each worker when num_workers is an integer (and of a sweep's trial worker):
    # fractional CPUs let two training workers and Ray Data's decode tasks share 2 cores.
    cpus_per_worker: float = 0.5
    global_batch_size: int = 256
    epochs: int = 10
    lr: float = 2e-3  # tiny models at batch 256 train fast with a high lr and warmup
    weight_decay: float = 0.1
    warmup_steps: int = 50
    init_temperature: float = 0.07  # CLIP's initial temperature, logit scale 1/0.07
    learn_temperature: bool = True  # False: fixed, so a sweep's temperature axis is exactly it
    max_logit_scale: float = 100.0  # CLIP clamps the learned scale here
    # clip: open_clip's ClipLoss; siglip: the sigmoid loss (set the temperature to 0.1)
    loss: str = field(default="clip", metadata=choices("clip", "siglip"))
    init_logit_bias: float = -10.0  # SigLIP only: the paper's initial bias
    max_steps: int = 0  # 0: `epochs` epochs; otherwise exactly this many steps
    # Feature-cache accumulation: each worker's batch runs as accum_freq micro-batches, so a
    # global batch bigger than memory keeps the same loss and gradients.
    accum_freq: int = 1
    grad_clip_norm: float = 0.0  # 0: no clipping; the norm is logged either way
    grad_checkpointing: bool = False  # recompute transformer activations: less memory, ~30% time
    # auto: bf16 autocast on GPU, fp32 on CPU
    precision: str = field(default="auto", metadata=choices("auto", "bf16", "fp32"))
    seed: int = 0
    checkpoint_every_steps: int = 200
    max_failures: int = 2  # worker deaths survived by restoring the last checkpoint
    log_every_steps: int = 10
    # Zero-shot top-1 on a small held-out folder (--val-dataset; the demo has one) every N
    # steps (0: never): TensorBoard shows what the model learns, and a sweep's early stopping
    # ranks trials by it.
    zeroshot_every_steps: int = 60
    zeroshot_images_per_class: int = 4
    # Ray's placement of workers over nodes
    placement_strategy: str = field(
        default="PACK", metadata=choices("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    data_cpus_per_task: float = 0.25  # Ray Data read+decode tasks beside the workers


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    classnames: str | None = None  # a file, or "imagenet"; default: classnames.txt or folders
    templates: str | None = None  # a file, or "openai"/"simple"; default: templates.txt
    concurrency: int = 1  # embedding actors (each loads the model once)


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep of the contrastive knobs, early-stopped at rungs on zero-shot accuracy.

    Each axis sets one training field (temperatures: train.init_temperature, learn_temperature:
    train.learn_temperature, batch_sizes: train.global_batch_size, the lr rule or lrs: train.lr,
    seeds: train.seed; max_steps: train.max_steps); every other training field is the run's
    train section, the same for every trial. Every trial trains `max_steps` steps unless the
    scheduler stops it at a rung (grace_period, grace_period * reduction_factor, ...);
    zero-shot top-1 on a small held-out image folder is measured every
    train.zeroshot_every_steps, so rungs fall on multiples of it.
    """

    # The search space. A list is a grid axis (grid) or a choice (random, optuna). The grid runs
    # in the order listed, the temperatures outermost, every batch size for each. With the
    # default scheduler (halving) the order changes only when trials run, not what is decided.
    # With --scheduler asha and one trial at a time, ASHA judges each trial at a rung against
    # those that reached it before, so the first trial always runs to the end: list your best
    # guess first.
    # The demo's: fixed temperatures (the axis is then exactly the temperature; learned ones
    # drift toward each other within a short trial), its guess 0.1 first.
    temperatures: tuple[float, ...] = (0.1, 0.03, 0.3)
    # (low, high): the initial temperature drawn log-uniformly (random and optuna search only).
    temperature_range: tuple[float, float] | None = None
    learn_temperature: tuple[bool, ...] = (False,)  # (True, False) sweeps both
    batch_sizes: tuple[int, ...] = (128, 64)  # global batch sizes
    # linear: lr = base_lr * batch / base_batch (Goyal et al.); sqrt: * sqrt(batch / base_batch),
    # gentler for Adam-type optimisers; swept: `lrs` is one more axis of the space.
    lr_rule: str = field(default="sqrt", metadata=choices("linear", "sqrt", "swept"))
    # Short trials want a brisk lr: the demo's 2e-3, here at batch 128 rather than 256.
    base_lr: float = 2e-3
    base_batch_size: int = 128
    lrs: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    # grid, random or optuna
    search: str = field(default="grid", metadata=choices("grid", "random", "optuna"))
    num_samples: int = 1  # trials drawn by random/optuna search; grid: repeats of the grid
    # Early stopping. halving: synchronous successive halving (pipeline.tune.scheduler): each
    # trial pauses at a rung until all have reached it, then the rung is judged as a set, so
    # the answer does not depend on the order of the lists (ASHA's does, with fewer slots than
    # trials); a kept trial resumes from its checkpoint. asha: Tune's ASHA (no pauses: better
    # when many trials run at once). none: every trial to the end.
    scheduler: str = field(default="halving", metadata=choices("halving", "asha", "none"))
    max_steps: int = 150  # each trial's budget (ASHA's max_t)
    # Rungs at 30 and 90 steps (grace_period * reduction_factor^k); a trial past the last one
    # runs to max_steps. On the demo top-1 is at chance (1/64) until about step 20, so an
    # earlier first rung would rank noise.
    grace_period: int = 30
    reduction_factor: int = 3  # the top third goes on at each rung
    # halving: a trial below the rung's cutoff is kept when within this many standard errors of
    # the probe (binomial on its images) of it: a gap smaller than the probe's noise is not
    # evidence. 0: the plain top third.
    keep_within_se: float = 1.0
    # Seconds between rewrites of report.html and the hparams runs while trials report (also
    # rewritten at once when a trial pauses or ends); a render holds the driver a second or two.
    report_every_s: float = 10.0
    # The Tune function only waits on its trainer, yet holds a slot in the cluster.
    driver_cpus_per_trial: float = 0.05
    # Kept free per trial for its Ray Data read and decode tasks, so the next trial's workers
    # do not wait on them. The demo's 64 px decode needs one 0.25-CPU task at a time.
    data_cpus_per_trial: float = 0.25
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs and GPUs fit


@dataclass(frozen=True)
class PipelineConfig:
    preset: str = "demo"
    demo: DemoConfig = field(default_factory=DemoConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# A sweep's trials train with the preset's train section and these changes (its axes and
# max_steps then set the rest): short trials want a short warmup and frequent probes, since
# ASHA ranks trials on them (a trial checkpoints at every probe: see trial_train_config).
_DEMO_TRIALS = {
    # The demo's trials are faster on one worker: on a CPU a second one only adds the
    # all-reduce and its own start-up. One thread, which on 2 cores runs a step in about half
    # the time of two (those share the cores with Ray Data's decode tasks).
    "num_workers": 1,
    "cpus_per_worker": 1.0,
    "warmup_steps": 10,  # the preset's 50 would be most of a 150-step budget
    "zeroshot_every_steps": 30,
    "zeroshot_images_per_class": 16,  # the demo's whole val folder: ~1.5 s a probe on a CPU
}


# The demo's schedule (issue 17): the sweep's winner, temperature 0.1 at batch 128, trained
# 8 epochs. On the demo's 64 classes a batch of 256 holds ~4 captions of each class, false
# negatives at a sharp temperature; 128 at 0.1 (learned from there) gave top-1 99.0%, held-out
# 95.8% after 10 epochs where 256 at 0.07 gave 91.6% and 85.8%. 8 epochs keep the run within
# 10 minutes on 2 cores (README).
_DEMO_TRAIN = {"global_batch_size": 128, "init_temperature": 0.1, "epochs": 8}


def _demo(sweep: bool = False) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **_DEMO_TRAIN))
    if sweep:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **_DEMO_TRIALS))
    return cfg


def _tiny(sweep: bool = False) -> PipelineConfig:
    # The same path as the demo on a few hundred pairs: about a minute, for tests.
    train = TrainConfig(
        global_batch_size=64,
        epochs=2,
        warmup_steps=2,
        checkpoint_every_steps=5,
        zeroshot_every_steps=5,
        zeroshot_images_per_class=1,
    )
    if sweep:
        train = dataclasses.replace(
            train,
            **_DEMO_TRIALS
            | {
                "warmup_steps": 2,
                "zeroshot_every_steps": 2,
                "zeroshot_images_per_class": 2,
            },
        )
    return PipelineConfig(
        preset="tiny",
        demo=DemoConfig(
            num_train=400, eval_images_per_class=2, val_images_per_class=1, num_retrieval=64
        ),
        prepare=PrepareConfig(rows_per_shard=150),
        train=train,
        eval=EvalConfig(batch_size=128),
        # Four short trials, so a test sees ASHA stop some within a minute or two.
        sweep=SweepConfig(
            temperatures=(0.03, 0.5),
            batch_sizes=(32, 64),
            base_lr=2e-3,
            base_batch_size=64,
            max_steps=8,
            grace_period=2,
            reduction_factor=2,
        ),
    )


def _datacomp_small(sweep: bool = False) -> PipelineConfig:
    # DataComp small scale: ViT-B-32 at 224 px, global batch 4096, lr 5e-4, warmup 500.
    train = TrainConfig(
        model="ViT-B-32",
        num_workers=8,
        use_gpu=True,
        global_batch_size=4096,
        max_steps=3_125,  # 12.8M samples seen, however many epochs the pool allows
        lr=5e-4,
        weight_decay=0.2,
        warmup_steps=500,
        checkpoint_every_steps=500,
        zeroshot_every_steps=500,
        cpus_per_worker=8,  # decoding 224 px JPEGs for an H100/A100 takes many cores
    )
    if sweep:
        # Every trial on all 8 GPU workers; a tenth of the schedule each.
        train = dataclasses.replace(
            train,
            warmup_steps=100,
            zeroshot_every_steps=125,
            zeroshot_images_per_class=16,
        )
    return PipelineConfig(
        preset="datacomp-small",
        prepare=PrepareConfig(
            rows_per_shard=10_000,
            download=DownloadConfig(image_size=224, concurrency=16, thread_count=64),
            # Web crawls repeat the same photo under many URLs and sizes.
            filters=FilterConfig(near_duplicate_distance=2),
            tokenize=TokenizeConfig(model="ViT-B-32"),
        ),
        train=train,
        eval=EvalConfig(concurrency=4),
        # ASHA cuts at 250 steps.
        sweep=SweepConfig(
            temperatures=(0.07, 0.03, 0.1),  # CLIP's initial temperature first
            learn_temperature=(True,),  # as CLIP trains: the sweep is over its initial value
            batch_sizes=(2048, 4096),
            base_lr=5e-4,
            base_batch_size=4096,
            max_steps=750,
            grace_period=250,
            data_cpus_per_trial=4,
        ),
    )


PRESETS = {
    "demo": _demo,
    "tiny": _tiny,
    "datacomp-small": _datacomp_small,
}


def get_preset(name: str, sweep: bool = False) -> PipelineConfig:
    """The named preset; with `sweep`, its train section is the base of a sweep's trials."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name](sweep)


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
