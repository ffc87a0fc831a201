"""The run spec: preset -> config file -> flags, resolved and validated once, then frozen.

A job builds one `RunSpec` at its front door and hands it to the stages; nothing patches it
later. Every field of every stage config is addressed by its dotted path
(``prepare.download.image_size``); a config file (YAML or JSON) and the flags both set fields by
path, each value checked against the field's type and choices. The resolved spec is saved as
RUN/config.json, and a stage's identity in the manifest is its part of the spec plus
fingerprints of what it consumed.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import inspect
import json
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, get_preset

DEMO_NETWORK = "127.0.0.1/32"  # the demo server's address, allowed explicitly
# The sections of PipelineConfig a file or flag may set (the preset is chosen by --preset).
SECTIONS = ("demo", "prepare", "train", "eval", "sweep")
# The training fields a sweep sets for every trial, and the sweep field that sets each.
SWEPT = {
    "train.init_temperature": "sweep.temperatures (or sweep.temperature_range)",
    "train.learn_temperature": "sweep.learn_temperature",
    "train.global_batch_size": "sweep.batch_sizes",
    "train.lr": "sweep.lr_rule with sweep.base_lr (or sweep.lrs)",
    "train.seed": "sweep.seeds",
    "train.max_steps": "sweep.max_steps",
    "train.checkpoint_every_steps": "train.zeroshot_every_steps (trials checkpoint at probes)",
}


class SpecError(ValueError):
    """A value the user gave that the spec cannot take; the message names field and source."""


@dataclass(frozen=True)
class Inputs:
    """What the run reads besides its config (None: the built-in demo corpus's)."""

    url_list: str | None = None
    eval_dataset: str | None = None
    val_dataset: str | None = None
    # WebDataset tars (or another run's Parquet shards) the train stage imports as its shards.
    shards: str | None = None
    # The URL list's content (or the demo corpus's config): prepare's identity includes it.
    url_list_fingerprint: str | None = None


@dataclass(frozen=True)
class Options:
    """How this command runs, not what it computes: never part of a stage's identity."""

    force: bool = False  # redo the job's stages even if finished
    retry_failed: bool = False  # prepare: fetch again the rows rejected for transient reasons
    sweep: bool = False  # a Tune sweep takes the place of the train stage
    dry_run: bool = False


@dataclass(frozen=True)
class RunSpec:
    config: PipelineConfig
    inputs: Inputs
    run_dir: str
    stages: tuple[str, ...]
    options: Options = field(default_factory=Options)
    # (dotted path, where it was set: a flag or a config file) for each field not the preset's.
    set_by: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["set_by"] = dict(self.set_by)
        return out


# -- the fields ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldInfo:
    path: str  # e.g. prepare.download.image_size
    type: Any  # the resolved annotation, e.g. int, str | None, tuple[str, ...]
    default: Any
    choices: tuple[str, ...] | None
    help: str


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """The comments beside and above each field in the class's source: its help text."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"\s{4}(\w+): [^=]+=", line)
        if match:
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[match.group(1)] = " ".join([*above, inline]).strip()
        above = []
    return out


def fields(cls: type = PipelineConfig, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf field under `cls`, by dotted path (the sections of a PipelineConfig)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not prefix and f.name not in SECTIONS:
            continue
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory):
            yield from fields(f.default_factory, path + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield FieldInfo(
            path, hints[f.name], default, f.metadata.get("choices"), _comments(cls).get(f.name, "")
        )


@functools.cache
def field_map() -> dict[str, FieldInfo]:
    return {f.path: f for f in fields()}


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if _is_optional(tp):
        return f"{type_name(_non_none(tp))} or null"
    if _is_int_or_text(tp):
        return "int or text"
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _is_int_or_text(tp: Any) -> bool:
    """`int | str`: a count or a word (train.num_workers: 2 or auto)."""
    return isinstance(tp, types.UnionType) and set(typing.get_args(tp)) == {int, str}


def _non_none(tp: Any) -> Any:
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


def coerce(value: Any, tp: Any) -> Any:
    """`value` (from JSON or YAML) as a value of type `tp`; ValueError says what was expected."""
    if _is_optional(tp):
        return None if value is None else coerce(value, _non_none(tp))
    if _is_int_or_text(tp):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected an integer or text, got {value!r}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a {type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"expected {len(args)} values ({type_name(tp)}), got {value!r}")
        return tuple(coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise ValueError(f"unsupported field type {tp}")


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_text(text: str, tp: Any) -> Any:
    """A command-line value as type `tp`: lists comma-separated, null/none for no value."""
    if _is_optional(tp):
        return (
            None
            if text.strip().lower() in ("", "none", "null")
            else parse_text(text, _non_none(tp))
        )
    if _is_int_or_text(tp):
        return int(text) if text.strip().lstrip("-").isdigit() else text.strip()
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in re.split(r"[,:]" if args[-1] is not Ellipsis else ",", text)]
        parts = [p for p in parts if p]
        kinds = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(parts):
            raise ValueError(f"expected {type_name(tp)}, got {text!r}")
        return tuple(parse_text(p, k) for p, k in zip(parts, kinds, strict=True))
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in TRUE:
            return True
        if lowered in FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


def _check_choices(info: FieldInfo, value: Any) -> None:
    if info.choices is not None and value not in info.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(info.choices)}")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf value}."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def replace_path(cfg: Any, path: str, value: Any) -> Any:
    """A copy of the frozen dataclass `cfg` with the field at dotted `path` set to `value`."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})


def get_path(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


# -- config files ---------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file of fields, nested ({train: {lr: ...}}) or dotted ({train.lr: ...})."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"--config: {str(path)!r} is not a file")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError(
            f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return flatten(data)


def file_overrides(path: str | Path) -> dict[str, Any]:
    """The config file's fields, type- and choice-checked: {dotted path: value}."""
    known = field_map()
    out = {}
    for key, value in read_config_file(path).items():
        info = known.get(key)
        if info is None:
            hint = _closest(key, known)
            raise SpecError(f"{path}: unknown field {key!r}{hint}")
        try:
            value = coerce(value, info.type)
            _check_choices(info, value)
        except ValueError as err:
            raise SpecError(f"{path}: field {key!r}: {err}") from None
        out[key] = value
    return out


def _closest(key: str, known: dict[str, Any]) -> str:
    import difflib

    near = difflib.get_close_matches(key, list(known), n=1)
    if not near:
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {near[0]!r}?)" if near else ""


# -- building the spec ---------------------------------------------------------------------
def resolve_config(
    preset: str,
    *,
    sweep: bool = False,
    config_file: str | None = None,
    flags: dict[str, tuple[Any, str]] | None = None,
) -> tuple[PipelineConfig, dict[str, str]]:
    """preset -> config file -> flags ({path: (value, flag name)}); returns (config, set_by)."""
    cfg = get_preset(preset, sweep=sweep)
    set_by: dict[str, str] = {}
    layers: list[tuple[dict[str, Any], Any]] = []
    if config_file is not None:
        layers.append((file_overrides(config_file), config_file))
    if flags:
        layers.append(
            ({p: v for p, (v, _) in flags.items()}, {p: f for p, (_, f) in flags.items()})
        )
    known = field_map()
    for values, source in layers:
        for path, value in values.items():
            where = source[path] if isinstance(source, dict) else str(source)
            try:
                _check_choices(known[path], value)
            except ValueError as err:
                raise SpecError(f"{where}: {err}") from None
            cfg = replace_path(cfg, path, value)
            set_by[path] = where
    return _normalise(cfg, set_by), set_by


def _normalise(cfg: PipelineConfig, set_by: dict[str, str]) -> PipelineConfig:
    """What a value means, fixed once: absolute paths, and the tokenizer of the trained model."""
    train_model = cfg.train.model
    if train_model.endswith(".json"):
        # Workers may run elsewhere than this process's directory: a config file goes absolute.
        train_model = str(Path(train_model).expanduser().resolve())
        cfg = replace_path(cfg, "train.model", train_model)
    if "train.model" in set_by and "prepare.tokenize.model" not in set_by:
        # The tokenizer must be the trained model's: one setting names both.
        cfg = replace_path(cfg, "prepare.tokenize.model", train_model)
    decontaminate = cfg.prepare.filters.decontaminate
    if decontaminate and "://" not in decontaminate:
        # Absolute: the run's config (and its identity) must not depend on the current directory.
        cfg = replace_path(
            cfg, "prepare.filters.decontaminate", str(Path(decontaminate).expanduser().resolve())
        )
    return cfg


def _absolute(path: str | None) -> str | None:
    """Local paths absolute, URIs (s3://, gs://) in one spelling: see storage.normalize."""
    if path is None:
        return path
    if glob.has_magic(path) and "://" in path:
        return path  # a URL list's glob pattern, expanded by its reader
    return storage.normalize(path)


def build_spec(
    *,
    preset: str = "demo",
    run_dir: str | None = None,
    stages: tuple[str, ...],
    config_file: str | None = None,
    flags: dict[str, tuple[Any, str]] | None = None,
    inputs: Inputs | None = None,
    options: Options | None = None,
) -> RunSpec:
    """The one construction of a run's configuration; `validate` then checks it against disk."""
    options = options or Options()
    inputs = inputs or Inputs()
    cfg, set_by = resolve_config(preset, sweep=options.sweep, config_file=config_file, flags=flags)
    if options.sweep:
        for path, where in set_by.items():
            if path in SWEPT:
                raise SpecError(
                    f"{where} sets {path}, which the sweep sets for every trial: use {SWEPT[path]}"
                )
    cfg = _demo_network(cfg, inputs, stages)
    if options.sweep:
        stages = tuple("sweep" if s == "train" else s for s in stages)
    inputs = dataclasses.replace(
        inputs,
        url_list=_absolute(inputs.url_list),
        eval_dataset=_absolute(inputs.eval_dataset),
        val_dataset=_absolute(inputs.val_dataset),
        shards=_absolute(inputs.shards),
    )
    return RunSpec(
        config=cfg,
        inputs=inputs,
        run_dir=storage.normalize(run_dir or f"runs/{preset}"),
        stages=stages,
        options=options,
        set_by=tuple(sorted(set_by.items())),
    )


def _demo_network(cfg: PipelineConfig, inputs: Inputs, stages: tuple[str, ...]) -> PipelineConfig:
    if inputs.url_list is None and "prepare" in stages:
        # The demo corpus is served on loopback: its address is allowed, and only it.
        networks = cfg.prepare.download.allowed_networks
        cfg = replace_path(
            cfg,
            "prepare.download.allowed_networks",
            tuple(dict.fromkeys((*networks, DEMO_NETWORK))),
        )
    return cfg


def spec_of(
    cfg: PipelineConfig,
    run_dir: str | Path,
    stages: tuple[str, ...],
    *,
    url_list: str | None = None,
    eval_dataset: str | None = None,
    val_dataset: str | None = None,
    **options: Any,
) -> RunSpec:
    """A validated spec from a config built in code (library use, tests): no file, no flags."""
    inputs = Inputs(
        url_list=_absolute(url_list),
        eval_dataset=_absolute(eval_dataset),
        val_dataset=_absolute(val_dataset),
    )
    spec = RunSpec(
        config=_demo_network(cfg, inputs, stages),
        inputs=inputs,
        run_dir=storage.normalize(run_dir),
        stages=stages,
        options=Options(**options),
    )
    return validate(spec)


# -- identities and fingerprints ------------------------------------------------------------------
def digest(obj: Any) -> str:
    payload = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'path: old -> new' for every leaf that differs between two nested dicts."""
    a, b = flatten(old), flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if json.dumps(x, default=str) != json.dumps(y, default=str):
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            lines.append(f"{key}: {show(x)} -> {show(y)}")
    return lines


def _check_shards_input(source: str, shards: str) -> None:
    """--shards names tars or Parquet shards, and the run's shards are no prepare's output."""
    from pipeline.data.webdataset import IMPORT_MARKER, IMPORT_STARTED, find_shards

    try:
        find_shards(source)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--shards: {err}") from None
    imported = any(
        storage.exists(storage.join(shards, name)) for name in (IMPORT_MARKER, IMPORT_STARTED)
    )
    if storage.list_files(shards, ".parquet") and not imported:
        raise SpecError(
            f"--shards: {shards} already holds prepared shards, which an import would replace; "
            "choose another --run-dir"
        )


def check_locations(spec: RunSpec) -> None:
    """The run dir can be written and the URIs read, before anything starts: a missing bucket,
    missing credentials, a scheme without its package or a read-only location is one
    StorageError naming the path and what is missing. Nothing is left behind (the write probe
    is removed; a dry run only looks)."""
    run_dir = spec.run_dir
    if storage.is_uri(run_dir):
        if spec.options.dry_run:
            scheme, rest = run_dir.split("://", 1)
            storage.check_readable(f"{scheme}://{rest.split('/')[0]}")  # the bucket: no write
        else:
            storage.check_writable(run_dir)
    else:
        base = run_dir  # the nearest folder that exists: the run dir is created inside it
        while not os.path.exists(base) and os.path.dirname(base) != base:
            base = os.path.dirname(base)
        if os.path.isdir(base):
            try:
                with tempfile.TemporaryFile(dir=base):
                    pass
            except OSError as e:
                raise storage.StorageError(
                    f"{run_dir}: cannot write there ({base} is read-only: {e.strerror})"
                ) from None
    cfg, inputs = spec.config, spec.inputs
    for path in (
        inputs.url_list,
        inputs.eval_dataset,
        inputs.val_dataset,
        cfg.prepare.filters.decontaminate,
    ):
        if path is not None and storage.is_uri(path) and not glob.has_magic(path):
            storage.check_readable(path)


def validate(spec: RunSpec) -> RunSpec:
    """Check the spec against what is on disk, before Ray starts; returns it with the URL
    list's fingerprint resolved. Errors name the flag or field to fix."""
    import ipaddress

    cfg, inputs, stages = spec.config, spec.inputs, spec.stages
    p = cfg.prepare
    check_locations(spec)
    for n in p.download.allowed_networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError as err:
            raise SpecError(f"--allowed-networks: {n!r} is not a CIDR network ({err})") from None
    distance = p.filters.near_duplicate_distance
    if distance is not None and not 0 <= distance <= 15:
        raise SpecError(f"--near-duplicate-distance: {distance} is not within 0..15")
    if p.max_failure_rate is not None and not 0 <= p.max_failure_rate <= 1:
        raise SpecError(f"--max-failure-rate: {p.max_failure_rate} is not within 0..1")
    if p.rows_per_shard < 1 or p.download.image_size < 1:
        raise SpecError("prepare.rows_per_shard and prepare.download.image_size must be >= 1")
    if "prepare" in stages:
        if inputs.url_list is not None:
            from pipeline.data.prepare.inputs import check_url_list

            # Metadata and first lines only: a list of millions of rows is read by the workers.
            fingerprint = check_url_list(
                inputs.url_list, p.url_col, p.caption_col, p.save_additional_columns
            )
        else:
            fingerprint = "demo:" + digest(dataclasses.asdict(cfg.demo))
        spec = dataclasses.replace(
            spec, inputs=dataclasses.replace(inputs, url_list_fingerprint=fingerprint)
        )
        if p.filters.decontaminate is not None:
            from pipeline.data.filters import IMAGE_SUFFIXES

            folder = p.filters.decontaminate
            if not storage.isdir(folder):
                raise FileNotFoundError(f"--decontaminate: {folder!r} is not a folder")
            files = storage.find_files(folder)
            if not any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f, _ in files):
                raise ValueError(f"--decontaminate: no images under {folder!r}")
    if "train" in stages or "sweep" in stages:
        from pipeline.train.loop import check_config

        check_config(cfg.train)
    if inputs.shards is not None:
        _check_shards_input(inputs.shards, storage.join(spec.run_dir, "data", "shards"))
    if "sweep" in stages:
        from pipeline.tune.sweep import check_sweep

        if inputs.val_dataset is None and inputs.url_list is not None:
            raise SpecError("a sweep ranks trials on a held-out image folder: pass --val-dataset")
        check_sweep(cfg.sweep, cfg.train)
        if "prepare" not in stages:
            from pipeline.pretrain import count_samples

            shards = storage.join(spec.run_dir, "data", "shards")
            check_sweep(cfg.sweep, cfg.train, count_samples(shards))
            demo_val = storage.join(spec.run_dir, "demo", "val")
            if inputs.val_dataset is None and not storage.isdir(demo_val):
                raise FileNotFoundError(f"no validation folder in {demo_val}: pass --val-dataset")
    from pipeline.evaluate import load_image_folder

    if "evaluate" in stages:
        if inputs.eval_dataset is not None:
            load_image_folder(inputs.eval_dataset, cfg.eval.classnames, cfg.eval.templates)
        elif inputs.url_list is not None:
            raise SpecError("no eval dataset: pass --eval-dataset (an image folder, one per class)")
    if inputs.val_dataset is not None:
        from pipeline.evaluate.datasets import check_images

        try:
            # Decoded now, as the probe will: a bad file fails here, not rank 0 mid-training.
            check_images(load_image_folder(inputs.val_dataset))
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"--val-dataset: {err}") from None
    return spec
