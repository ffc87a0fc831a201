"""Shared command-line flags of the jobs: flags → config → a Pipeline on a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
from pathlib import Path

# `python jobs/x.py` from a checkout that was not pip-installed (e.g. a Ray job's working dir).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PRESETS, PipelineConfig, get_preset  # noqa: E402
from pipeline.modeling import resolve_model_name  # noqa: E402
from pipeline.pretrain import Pipeline, format_summary  # noqa: E402
from pipeline.rundir import RunDir, StageConfigMismatch  # noqa: E402


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
    return cfg


def build_pipeline(args: argparse.Namespace) -> Pipeline:
    cfg = build_config(args)
    run_dir = args.run_dir or os.path.join("runs", args.preset)
    return Pipeline(
        cfg=cfg,
        run=RunDir.at(run_dir),
        input_path=getattr(args, "input", None),
        eval_dataset=getattr(args, "eval_dataset", None),
        force=args.force,
    )


def init_ray(address: str | None) -> None:
    """Join the cluster (ray job submit sets RAY_ADDRESS), or start Ray on this machine."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, configure_logging=False)


def run_job(description: str, stages: tuple[str, ...], data: bool, eval_set: bool) -> None:
    """Parse flags, check inputs before Ray starts, run `stages`, print the summary.

    Bad input ends with one line naming the problem and exit status 2.
    """
    parser = base_parser(description)
    if data:
        add_data_args(parser)
    if eval_set:
        add_eval_args(parser)
    args = parser.parse_args()
    try:
        pipeline = build_pipeline(args)
        pipeline.check_inputs()
        init_ray(args.address)
        for stage in stages:
            getattr(pipeline, stage)()
        print(format_summary(pipeline.summary()))
    except (ValueError, FileNotFoundError, StageConfigMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
