"""Shared command-line flags of the jobs: flags → config → a Pipeline on a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import sys
from pathlib import Path

# `python jobs/x.py` from a checkout that was not pip-installed (e.g. a Ray job's working dir).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PRESETS, PipelineConfig, get_preset  # noqa: E402
from pipeline.lock import hold_run_dir  # noqa: E402
from pipeline.pretrain import Pipeline, format_summary  # noqa: E402
from pipeline.rundir import RunDir, StageConfigMismatch  # noqa: E402
from pipeline.train.modeling import resolve_model_name  # noqa: E402


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/PRESET)")
    parser.add_argument(
        "--preset", default="demo", help=f"named configuration: {', '.join(sorted(PRESETS))}"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="open_clip model name or JSON config to tokenize for and train (default: the "
        "preset's; the demo's is pipeline/models/clip-demo-tiny.json)",
    )
    parser.add_argument("--force", action="store_true", help="redo stages already finished")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)"
    )
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        default=None,
        help="URL list (Parquet, CSV, TSV, JSON lines; a file or folder, local or fsspec URL); "
        "default: the built-in demo corpus",
    )
    parser.add_argument("--url-col", default="url", help="URL column of --input")
    parser.add_argument("--caption-col", default="caption", help="caption column of --input")
    parser.add_argument(
        "--allowed-networks",
        default="",
        help="comma-separated CIDR networks that downloads may reach although private, loopback "
        "or reserved (e.g. 10.0.0.0/8); the demo allows 127.0.0.1/32 itself",
    )
    parser.add_argument(
        "--save-additional-columns",
        default="",
        help="comma-separated columns of --input kept in shards and rejects, after the standard "
        "columns (e.g. uid,license)",
    )
    parser.add_argument(
        "--decontaminate",
        default=None,
        metavar="EVAL_DIR",
        help="drop training images that are near-duplicates (perceptual hash) of any image under "
        "this folder, e.g. the eval set",
    )
    parser.add_argument(
        "--near-duplicate-distance",
        type=int,
        default=None,
        help="drop images within this Hamming distance (0-15, 64-bit pHash) of an earlier kept "
        "one (default: the preset's; off in demo and tiny)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="fetch again only the rows rejected for transient reasons (timeouts, 5xx, 429, "
        "connection errors); the recovered move from rejects to shards",
    )


# Training flags: each overrides one TrainConfig field of the preset (None keeps the preset's).
TRAIN_FLAGS = {
    "num_workers": (int, "Ray Train workers (one GPU each with --use-gpu)"),
    "cpus_per_worker": (float, "CPUs each worker reserves"),
    "global_batch_size": (int, "samples per step over all workers"),
    "epochs": (int, "passes over the shards"),
    "max_steps": (int, "train exactly this many steps instead (0: epochs decide)"),
    "lr": (float, "peak learning rate (cosine schedule after warmup)"),
    "warmup_steps": (int, "linear warmup steps"),
    "loss": (str, "clip (open_clip's ClipLoss) or siglip"),
    "init_temperature": (float, "initial softmax temperature (logit scale 1/T)"),
    "accum_freq": (int, "micro-batches per worker batch (feature-cache accumulation)"),
    "grad_clip_norm": (float, "clip the gradient norm here (0: no clipping)"),
    "precision": (str, "auto (bf16 autocast on GPU), bf16 or fp32"),
    "checkpoint_every_steps": (int, "checkpoint (and report) every N steps"),
    "zeroshot_every_steps": (int, "zero-shot probe on --val-dataset every N steps (0: off)"),
    "max_failures": (int, "worker failures survived by restoring the last checkpoint"),
    "seed": (int, "initial weights and data order"),
}


def add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (default: the preset's)")
    for name, (kind, text) in TRAIN_FLAGS.items():
        # SUPPRESS: a flag not given leaves no attribute, so the preset's value stays.
        group.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=text
        )
    for flag, text in (
        ("--use-gpu", "one GPU a worker (NCCL); default: the preset's"),
        ("--fixed-temperature", "keep the temperature at --init-temperature, do not learn it"),
        ("--grad-checkpointing", "recompute transformer activations in backward: less memory"),
    ):
        group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    group.add_argument(
        "--val-dataset",
        default=argparse.SUPPRESS,
        help="small labelled image folder probed zero-shot during training (default: the "
        "demo's val folder)",
    )


def _train_overrides(cfg: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    changes = {n: getattr(args, n) for n in TRAIN_FLAGS if getattr(args, n, None) is not None}
    for flag, field, value in (
        ("use_gpu", "use_gpu", True),
        ("fixed_temperature", "learn_temperature", False),
        ("grad_checkpointing", "grad_checkpointing", True),
    ):
        if getattr(args, flag, None):
            changes[field] = value
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-dataset",
        default=None,
        help="image folder (one sub-folder per class, optional classnames.txt / templates.txt); "
        "default: the demo's eval folder",
    )


def _networks(text: str) -> tuple[str, ...]:
    networks = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError as err:
            raise ValueError(f"--allowed-networks: {n!r} is not a CIDR network ({err})") from None
    return networks


def build_config(args: argparse.Namespace) -> PipelineConfig:
    cfg = get_preset(args.preset)
    if args.model is not None:
        # Workers may run elsewhere than this process's directory: a config file goes absolute.
        model = str(Path(args.model).resolve()) if args.model.endswith(".json") else args.model
        resolve_model_name(model)
        # The tokenizer must be the trained model's: one flag sets both.
        cfg = dataclasses.replace(
            cfg,
            prepare=dataclasses.replace(
                cfg.prepare, tokenize=dataclasses.replace(cfg.prepare.tokenize, model=model)
            ),
            train=dataclasses.replace(cfg.train, model=model),
        )
    if getattr(args, "input", None) is not None:
        prepare = dataclasses.replace(
            cfg.prepare,
            url_col=args.url_col,
            caption_col=args.caption_col,
            download=dataclasses.replace(
                cfg.prepare.download, allowed_networks=_networks(args.allowed_networks)
            ),
        )
        cfg = dataclasses.replace(cfg, prepare=prepare)
    elif getattr(args, "allowed_networks", ""):
        download = dataclasses.replace(
            cfg.prepare.download, allowed_networks=_networks(args.allowed_networks)
        )
        cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, download=download))
    return _train_overrides(_data_filters(cfg, args), args)


def _data_filters(cfg: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    """--save-additional-columns, --decontaminate and --near-duplicate-distance."""
    prepare, filters = cfg.prepare, cfg.prepare.filters
    extra = tuple(c.strip() for c in getattr(args, "save_additional_columns", "").split(","))
    if any(extra):
        prepare = dataclasses.replace(prepare, save_additional_columns=tuple(c for c in extra if c))
    if getattr(args, "decontaminate", None):
        # Absolute: the run's config (and its hash) must not depend on the current directory.
        filters = dataclasses.replace(
            filters, decontaminate=str(Path(args.decontaminate).resolve())
        )
    distance = getattr(args, "near_duplicate_distance", None)
    if distance is not None:
        if not 0 <= distance <= 15:
            raise ValueError(f"--near-duplicate-distance: {distance} is not within 0..15")
        filters = dataclasses.replace(filters, near_duplicate_distance=distance)
    return dataclasses.replace(cfg, prepare=dataclasses.replace(prepare, filters=filters))


def build_pipeline(args: argparse.Namespace) -> Pipeline:
    cfg = build_config(args)
    run_dir = args.run_dir or os.path.join("runs", args.preset)
    return Pipeline(
        cfg=cfg,
        run=RunDir.at(run_dir),
        input_path=getattr(args, "input", None),
        eval_dataset=getattr(args, "eval_dataset", None),
        val_dataset=getattr(args, "val_dataset", None),
        force=args.force,
        retry_failed=getattr(args, "retry_failed", False),
    )


def init_ray(address: str | None) -> None:
    """Join the cluster (ray job submit sets RAY_ADDRESS), or start Ray on this machine.

    A cluster named explicitly (--address, RAY_ADDRESS) that does not answer fails within
    seconds with ValueError; one only remembered in Ray's temp folder (a local Ray that died
    without `ray stop` leaves its address there) is skipped, saying so, and Ray starts here.
    """
    import ray
    from ray._private.services import find_bootstrap_address, get_node_ip_address

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    named = address if address not in (None, "auto", "local") else None
    source = "--address"
    if named is None and address != "local" and os.environ.get("RAY_ADDRESS"):
        named, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if named is not None:
        problem = _unreachable(named)
        if problem:
            raise ValueError(
                f"the Ray cluster at {named} ({source}) does not answer: {problem}; start it, "
                "or leave out --address and RAY_ADDRESS to start Ray on this machine"
            )
        starts_here = False
    else:
        remembered = find_bootstrap_address(None)
        starts_here = address == "local" or remembered is None
        if not starts_here and _unreachable(remembered):
            print(
                f"note: the local Ray at {remembered} (remembered in Ray's temp folder) is not "
                "running; starting a new one",
                file=sys.stderr,
            )
            starts_here = True
    if starts_here:
        # Workers of a cluster started here must know its address: Ray Train's placement-group
        # cleaner (which frees a stopped sweep trial's CPUs) looks the cluster up, and with
        # another Ray running on the machine it cannot tell which one is its own and gives up.
        # Pick the GCS port, and export the address to the processes the new cluster spawns.
        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
        address = "local"
    ray.init(address=address, configure_logging=False)


def _unreachable(address: str, timeout: float = 3.0) -> str | None:
    """Why nothing answers at a host:port cluster address (None if something does).

    Client (ray://) and dashboard (http://) addresses are left to Ray."""
    if "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"{address!r} is not a host:port address"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(
    description: str, stages: tuple[str, ...], data: bool, eval_set: bool, sweep: bool = False
) -> None:
    """Parse flags, check inputs before Ray starts, run `stages`, print the summary.

    sweep: offer --sweep, which runs the sweep stage in place of train.
    Bad input ends with one line naming the problem and exit status 2.
    """
    parser = base_parser(description)
    if data:
        add_data_args(parser)
    if eval_set:
        add_eval_args(parser)
    if "train" in stages:
        add_train_args(parser)
    if sweep:
        parser.add_argument(
            "--sweep",
            action="store_true",
            help="instead of one training run, a Tune sweep (the preset's sweep section; "
            "jobs/sweep.py takes every knob) whose best trial becomes RUN/model",
        )
    args = parser.parse_args()
    try:
        pipeline = build_pipeline(args)
        pipeline.check_inputs()
        if getattr(args, "sweep", False):
            stages = tuple("sweep" if s == "train" else s for s in stages)
            pipeline.model_stage = "sweep"
            pipeline.check_sweep(prepared="prepare" not in stages)
        with hold_run_dir(pipeline.run.root):  # one job per run dir (issue 15)
            init_ray(args.address)
            for stage in stages:
                getattr(pipeline, stage)()
            print(format_summary(pipeline.summary()))
    except (ValueError, FileNotFoundError, StageConfigMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
