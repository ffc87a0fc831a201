"""Zero-shot classification and retrieval of a CLIP model.

Standalone: --model M --dataset D [--retrieval P] [--output results.json], where M is an
exported model directory (RUN/model, local-dir:PATH) or an open_clip model name / JSON config
with --pretrained PATH, and D an image folder (one sub-folder per class) or a Parquet file of
image bytes and labels. Prints a Markdown table; --output writes every figure as JSON.

Run directory (no --model/--dataset/--retrieval): the eval stage of a pipeline run, RUN/model
on --eval-dataset or the demo's eval set -> RUN/eval/results.json and TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from common import ERRORS, STARTED, fail, init_ray, job_parser, run_spec, set_log_level

from pipeline import storage
from pipeline.config import get_preset
from pipeline.rundir import write_json_atomic

STANDALONE = ("model", "pretrained", "dataset", "retrieval", "output")


def parser() -> argparse.ArgumentParser:
    p = job_parser(__doc__, (), inputs=("eval_dataset",))
    for action in p._actions:
        if action.dest == "address":
            action.help = (
                "Ray cluster address (default: RAY_ADDRESS, or a Ray already running here, else "
                "a new local one); 'local' always starts a private local Ray"
            )
    p.add_argument(
        "--model",
        default=None,
        help="model to evaluate: an exported model directory (RUN/model, or local-dir:PATH), "
        "or an open_clip model name / JSON config with --pretrained (default with "
        "--run-dir: RUN/model)",
    )
    p.add_argument("--pretrained", default=None, help="checkpoint file for a --model name")
    p.add_argument(
        "--dataset",
        default=None,
        help="image folder (one sub-folder per class; optional classnames.txt/.json, "
        "templates.txt, splits.json) or a .parquet file of image bytes and labels",
    )
    p.add_argument(
        "--retrieval",
        default=None,
        help="Parquet of images and captions (a caption, or a list of them, per row) for "
        "image<->text recall@1/5/10",
    )
    p.add_argument("--output", default=None, help="write all results here as JSON")
    p.add_argument(
        "--classnames",
        default=None,
        help="'imagenet' (open_clip's 1000 names; synset-id folders may be any subset), a file "
        "with one name per line in sorted folder order, or JSON: a list or {folder: name} "
        "(default: DATASET/classnames.txt or .json, else folder names with _ as spaces)",
    )
    p.add_argument(
        "--templates",
        default=None,
        help="'openai' (80), 'simple' (7) or a file, one prompt per line with {} for the class "
        "(default: DATASET/templates.txt, else openai)",
    )
    p.add_argument("--image-col", default="image", help="image bytes column of Parquet input")
    p.add_argument("--label-col", default="label", help="label column (int or string) of --dataset")
    p.add_argument("--caption-col", default="caption", help="caption column of --retrieval")
    p.add_argument("--batch-size", type=int, default=None, help="images per inference batch")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="most embedding actors, each loading the model once (default: one per GPU, else "
        "half the cluster's CPUs, at most 8)",
    )
    p.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per embedding actor (default: when the cluster has GPUs)",
    )
    return p


# The eval flags and the EvalConfig fields they set, in run-dir mode as in standalone mode.
EVAL_FLAGS = {
    "classnames": "--classnames",
    "templates": "--templates",
    "batch_size": "--batch-size",
}


def eval_overrides(cfg, args: argparse.Namespace):
    """--classnames / --templates / --batch-size onto an EvalConfig (standalone mode)."""
    changes = {k: getattr(args, k) for k in EVAL_FLAGS}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("batch_size", 1) < 1:
        raise ValueError("--batch-size must be at least 1")
    return dataclasses.replace(cfg, **changes)


def run_dir_spec(args: argparse.Namespace):
    """The spec of the eval stage of a run: the preset's eval section with the eval flags."""
    from pipeline.spec import Inputs, Options, build_spec

    eval_overrides(get_preset(args.preset).eval, args)  # checks --batch-size
    flags = {
        f"eval.{k}": (getattr(args, k), flag)
        for k, flag in EVAL_FLAGS.items()
        if getattr(args, k) is not None
    }
    return build_spec(
        preset=args.preset,
        run_dir=args.run_dir,
        stages=("evaluate",),
        config_file=args.config,
        flags=flags,
        inputs=Inputs(eval_dataset=args.eval_dataset),
        options=Options(force=args.force, dry_run=args.dry_run),
    )


def run_dir_mode(args: argparse.Namespace) -> None:
    run_spec(run_dir_spec(args), args.address, started=STARTED)


def standalone(args: argparse.Namespace) -> dict:
    """Check every input, then start Ray, evaluate, write --output and print the table."""
    import open_clip

    from pipeline import evaluate as ev

    for flag in ("eval_dataset", "force", "dry_run"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is for --run-dir runs; use --dataset")
    if args.model is None and args.run_dir is None:
        raise ValueError("pass --model (an exported model directory or an open_clip name)")
    if args.dataset is None and args.retrieval is None:
        raise ValueError("pass --dataset (an image folder or labelled Parquet) or --retrieval")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    model = args.model if args.model is not None else storage.join(args.run_dir, "model")
    ref = ev.resolve_model(model, args.pretrained)
    cfg = eval_overrides(get_preset(args.preset).eval, args)
    data = None
    if args.dataset is not None:
        data = ev.load_dataset(
            args.dataset, cfg.classnames, cfg.templates, args.image_col, args.label_col
        )
    retrieval = None
    if args.retrieval is not None:
        retrieval = ev.check_retrieval(args.retrieval, args.image_col, args.caption_col)
    output = storage.normalize(args.output) if args.output else None
    if output is not None:
        if storage.isdir(output):
            raise ValueError(f"--output {output} is a directory; name a .json file")
        if storage.is_uri(output):
            storage.check_writable(storage.parent(output))  # before Ray starts, not after
    loaded = ev.load_model(ref)  # here, so weights that do not fit fail before Ray starts

    import ray

    init_ray(args.address)
    resources = ray.cluster_resources()
    if args.use_gpu and not resources.get("GPU"):
        raise ValueError("--use-gpu: the Ray cluster has no GPUs")
    use_gpu, concurrency = ev.embedding_resources(resources, args.use_gpu, args.concurrency)
    cfg = dataclasses.replace(cfg, concurrency=concurrency)

    start = time.perf_counter()
    results: dict = {}
    if data is not None:
        results.update(ev.evaluate_zero_shot(ref, data, cfg, use_gpu, loaded=loaded, log=print))
    if retrieval is not None:
        results.update(
            ev.evaluate_retrieval(
                ref, retrieval, cfg, use_gpu, loaded, args.image_col, args.caption_col, log=print
            )
        )
    if data is not None:
        results.update(ev.clip_benchmark_keys(results, ref.model, ref.pretrained))
    results.update(
        model=ref.model,
        pretrained=ref.pretrained,
        dataset=str(data.path if isinstance(data, ev.ParquetSet) else data.root) if data else None,
        retrieval_dataset=str(retrieval) if retrieval else None,
        classnames=args.classnames,
        templates=args.templates,
        use_gpu=use_gpu,
        concurrency=concurrency,
        batch_size=cfg.batch_size,
        seconds=round(time.perf_counter() - start, 2),
        open_clip_version=open_clip.__version__,
    )
    if output is not None:
        write_json_atomic(output, results)  # a local file or an object, written whole
    skipped = results.get("skipped_images", 0) + results.get("retrieval_skipped_images", 0)
    if skipped:
        examples = results.get("skipped_examples", [])[:3]
        print(
            f"warning: {skipped} unreadable images skipped{': ' if examples else ''}"
            f"{', '.join(examples)}",
            file=sys.stderr,
        )
    print(ev.format_markdown(results), end="")
    if output is not None:
        print(f"\nresults: {output}")
    return results


def main() -> None:
    args = parser().parse_args()
    set_log_level(args.log_level)
    try:
        if any(getattr(args, k) is not None for k in STANDALONE):
            standalone(args)
        else:
            run_dir_mode(args)
    except ERRORS as err:
        fail(err)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
