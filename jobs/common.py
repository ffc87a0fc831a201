"""The jobs' front door: flags generated from the config fields -> one RunSpec -> the stages.

Every field of the stages a job runs is a flag under its dotted path
(``--prepare.download.image_size 256``); the fields people set daily also have the short names
img2dataset and open_clip users know (``--image-size``, ``--weight-decay``), and the training
and sweep fields their own names (``--lr``, ``--grace-period``). A flag not given keeps the
value of the preset, or of ``--config FILE`` (YAML or JSON) when that sets it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

# The job's wall clock starts here, before the heavy imports: the summary's total includes them.
STARTED = time.monotonic()

# `python jobs/x.py` from a checkout that was not pip-installed (e.g. a Ray job's working dir).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import pretrain, storage  # noqa: E402
from pipeline.config import PRESETS  # noqa: E402
from pipeline.lock import hold_run_dir  # noqa: E402
from pipeline.rundir import RunDir, StageConfigMismatch, write_json_atomic  # noqa: E402
from pipeline.spec import (  # noqa: E402
    Inputs,
    Options,
    RunSpec,
    build_spec,
    fields,
    parse_text,
    type_name,
    validate,
)

# Short names of fields, after img2dataset's and open_clip's flags, and the names earlier
# versions of these jobs used. Fields of the train and sweep sections also get their own name.
ALIASES = {
    "image-size": "prepare.download.image_size",
    "resize-mode": "prepare.download.resize_mode",
    "resize-only-if-bigger": "prepare.download.resize_only_if_bigger",
    "encode-format": "prepare.download.encode_format",
    "encode-quality": "prepare.download.encode_quality",
    "thread-count": "prepare.download.thread_count",
    "timeout": "prepare.download.timeout",
    "retries": "prepare.download.retries",
    "user-agent-token": "prepare.download.user_agent_token",
    "allowed-networks": "prepare.download.allowed_networks",
    "rows-per-shard": "prepare.rows_per_shard",
    "max-failure-rate": "prepare.max_failure_rate",
    "url-col": "prepare.url_col",
    "caption-col": "prepare.caption_col",
    "save-additional-columns": "prepare.save_additional_columns",
    "min-image-size": "prepare.filters.min_image_side",
    "max-aspect-ratio": "prepare.filters.max_aspect_ratio",
    "caption-blocklist": "prepare.filters.caption_blocklist",
    "decontaminate": "prepare.filters.decontaminate",
    "near-duplicate-distance": "prepare.filters.near_duplicate_distance",
    # jobs/sweep.py's earlier names
    "zeroshot-every": "train.zeroshot_every_steps",
    "workers-per-trial": "train.num_workers",
    "cpus-per-trial-worker": "train.cpus_per_worker",
    "max-concurrent": "sweep.max_concurrent_trials",
    "report-every": "sweep.report_every_s",
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def add_spec_args(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One flag per field of `sections` (dotted paths, e.g. "prepare.download"), with its
    short names; the first section listed wins a short name two sections share."""
    taken = {o for a in parser._actions for o in a.option_strings}
    infos = [f for s in sections for f in fields() if f.path.startswith(s + ".")]
    infos = list({f.path: f for f in infos}.values())
    paths = {f.path for f in infos}
    short: dict[str, list[str]] = {}
    for name, path in ALIASES.items():
        if path in paths:
            short.setdefault(path, []).append(name)
    for f in infos:
        head, _, leaf = f.path.rpartition(".")
        if head in ("train", "sweep"):
            name = _kebab(leaf)
            owner = next((p for p, ns in short.items() if name in ns), f.path)
            if owner == f.path and f"--{name}" not in taken:
                short.setdefault(f.path, []).insert(0, name)
    if "train.model" in paths:
        short.setdefault("train.model", []).append("model")
    elif "prepare.tokenize.model" in paths:
        short.setdefault("prepare.tokenize.model", []).append("model")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in infos:
        section = f.path.split(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} (default: the preset's, or --config FILE's)"
            )
        names = [f"--{n}" for n in short.get(f.path, []) if f"--{n}" not in taken]
        names.append(f"--{f.path}")
        taken.update(names)
        text = f.help + (" " if f.help else "") + f"[{f.path}; demo: {f.default!r}]"
        text = text.replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.path, "default": argparse.SUPPRESS, "help": text}
        if f.type is bool:
            parser_group = groups[section]
            parser_group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.choices:
            kwargs["choices"] = f.choices
        kwargs["type"] = _parser(f.type)
        kwargs["metavar"] = None if f.choices else _metavar(f.type)
        groups[section].add_argument(*names, **kwargs)
    if "train.learn_temperature" in paths and "--fixed-temperature" not in taken:
        groups["train"].add_argument(
            "--fixed-temperature",
            dest="train.learn_temperature",
            action="store_const",
            const=False,
            default=argparse.SUPPRESS,
            help="the same as --no-learn-temperature",
        )


def _metavar(tp: Any) -> str:
    name = type_name(tp).removesuffix(" or null")
    if name.startswith("list of "):
        return {"bool": "BOOL", "int": "N", "float": "X"}.get(name[8:], "TEXT") + ",..."
    if name == "[float, float]":
        return "LOW:HIGH"
    names = {"int": "N", "float": "X", "str": "TEXT", "int or text": "N|auto"}
    return names.get(name, name.upper())


def _parser(tp: Any):
    def parse(text: str) -> Any:
        return parse_text(text, tp)

    parse.__name__ = type_name(tp)  # argparse's "invalid <name> value" message
    return parse


def job_parser(description: str, sections: tuple[str, ...], *, inputs: tuple[str, ...] = ()):
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/PRESET)")
    parser.add_argument(
        "--preset",
        default="demo",
        help=f"named configuration: {', '.join(sorted(PRESETS))} (default: demo)",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file of fields, nested or dotted (train: {lr: 1e-3}); applied over "
        "the preset, under the flags",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved spec, the stages that would run or be skipped and why, the "
        "step count and resources, and exit without starting Ray",
    )
    parser.add_argument("--force", action="store_true", help="redo stages already finished")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=LOG_LEVELS,
        help="how much of Ray's own logging shows (default: warning; info shows Ray's internal "
        "notices too)",
    )
    if "url_list" in inputs:
        parser.add_argument(
            "--input",
            default=None,
            help="URL list (Parquet, CSV, TSV, JSON lines; a file or folder, local or fsspec "
            "URL); default: the built-in demo corpus",
        )
        parser.add_argument(
            "--retry-failed",
            action="store_true",
            help="fetch again only the rows rejected for transient reasons (timeouts, 5xx, "
            "429, connection errors); the recovered move from rejects to shards",
        )
    if "val_dataset" in inputs:
        parser.add_argument(
            "--val-dataset",
            default=None,
            help="small labelled image folder probed zero-shot during training, which a sweep "
            "ranks trials on (default: the demo's val folder)",
        )
    if "eval_dataset" in inputs:
        parser.add_argument(
            "--eval-dataset",
            default=None,
            help="image folder (one sub-folder per class, optional classnames.txt / "
            "templates.txt); default: the demo's eval folder",
        )
    if "shards" in inputs:
        parser.add_argument(
            "--shards",
            default=None,
            metavar="DIR_OR_URI",
            help="train on these instead of prepare's shards: WebDataset tars (jpg + txt per "
            "sample, as img2dataset and jobs/export_wds.py write) or another run's Parquet "
            "shards, a file or folder, local or fsspec URL; imported into RUN/data/shards with "
            "tokens for --model",
        )
    add_spec_args(parser, sections)
    return parser


def field_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """{dotted path: (value, the flag that set it)} for every field flag given."""
    out = {}
    for action in parser._actions:
        if "." in action.dest and hasattr(args, action.dest) and action.dest not in out:
            out[action.dest] = (getattr(args, action.dest), action.option_strings[0])
    return out


def spec_from_args(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    stages: tuple[str, ...],
    sweep: bool = False,
) -> RunSpec:
    return build_spec(
        preset=args.preset,
        run_dir=args.run_dir,
        stages=stages,
        config_file=args.config,
        flags=field_flags(parser, args),
        inputs=Inputs(
            url_list=getattr(args, "input", None),
            eval_dataset=getattr(args, "eval_dataset", None),
            val_dataset=getattr(args, "val_dataset", None),
            shards=getattr(args, "shards", None),
        ),
        options=Options(
            force=args.force,
            retry_failed=getattr(args, "retry_failed", False),
            sweep=sweep,
            dry_run=args.dry_run,
        ),
    )


def set_log_level(level: str) -> None:
    """Ray's console logging at `level`, here and on the training workers: at the default,
    warning, its internal notices stay out of a healthy run's console (they stay in Ray's
    session logs)."""
    from pipeline.console import set_ray_console_level

    set_ray_console_level(level)


def run_spec(
    spec: RunSpec, address: str | None, after: Any = None, started: float | None = None
) -> RunSpec:
    """The one place a job opens its run dir and runs its stages: validate the spec, then
    (unless a dry run) save it as RUN/config.json, start Ray, run the stages, summarise.

    started: time.monotonic() when the job began (default: now), for the summary's seconds."""
    started = time.monotonic() if started is None else started
    spec = validate(spec)
    run = RunDir.at(spec.run_dir)
    rows = pretrain.plan(spec, run)
    if spec.options.dry_run:
        print(pretrain.format_plan(spec, rows))
        return spec
    refused = [row["why"] for row in rows if row["action"] == "refused"]
    if refused:  # before Ray starts and before anything is written
        raise StageConfigMismatch(refused[0])
    storage.makedirs(run.root)
    with hold_run_dir(run.root):  # one job per run dir: a second is refused, naming the holder
        write_json_atomic(run.config_path, spec.to_dict())
        # Seconds of each part of this command, in the summary (setup: imports and checks).
        seconds = {"setup": time.monotonic() - started}
        mark = time.monotonic()
        init_ray(address)
        seconds["ray_start"] = time.monotonic() - mark
        for stage in spec.stages:
            mark = time.monotonic()
            getattr(pretrain, stage)(spec, run)
            seconds[pretrain.STAGE_KEYS.get(stage, stage)] = time.monotonic() - mark
        summary = pretrain.summary(spec, run, seconds, time.monotonic() - started)
        print(pretrain.format_summary(summary))
        if after is not None:
            after(spec, run)
    return spec


def fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


ERRORS = (ValueError, FileNotFoundError, StageConfigMismatch, storage.StorageError)


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
    description: str,
    stages: tuple[str, ...],
    sections: tuple[str, ...],
    inputs: tuple[str, ...] = (),
    sweep: bool = False,
) -> None:
    """Parse flags, build and check the spec before Ray starts, run `stages`, print the summary.

    sweep: offer --sweep, which runs the sweep stage in place of train.
    Bad input ends with one line naming the problem and exit status 2.
    """
    parser = job_parser(description, sections, inputs=inputs)
    if sweep:
        parser.add_argument(
            "--sweep",
            action="store_true",
            help="instead of one training run, a Tune sweep over the spec's sweep section; its "
            "best trial becomes RUN/model",
        )
    args = parser.parse_args()
    set_log_level(args.log_level)
    try:
        spec = spec_from_args(parser, args, stages, sweep=getattr(args, "sweep", False))
        run_spec(spec, args.address, started=STARTED)
    except ERRORS as err:
        fail(err)
