"""The stages of a run, each a function of (spec, run dir): demo → prepare → train or sweep
→ eval → summary.

A stage's identity is its part of the spec plus fingerprints of what it consumed (the URL
list's content, the shards, the validation and eval folders, the model's weights), recorded in
RUN/manifest.json. `begin` decides, in one place, whether a stage runs: a finished stage with
the same identity is skipped; one whose own configuration changed is refused, naming every
field that differs, unless forced; one whose inputs changed (new shards, a new model) runs
again, saying which input changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from typing import Any

from pipeline import storage
from pipeline.rundir import RunDir, StageConfigMismatch, write_json_atomic
from pipeline.spec import RunSpec, diff, digest

ORDER = ("prepare", "train", "sweep", "evaluate")
IDENTITY_FILE = ".identity.json"
# The stage that writes each input a later stage consumes, named when that input changed.
UPSTREAM = {
    "shards": "prepare",
    "model": "train or sweep",
}  # in a resumable stage's folder: whose run it holds


def count_samples(shards: str) -> int:
    files = storage.list_files(shards, ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {shards}: run jobs/prepare_data.py first")
    return sum(storage.parquet_rows(f) for f in files)


# -- fingerprints ---------------------------------------------------------------------------
def shards_fingerprint(shards: str) -> str | None:
    """The shards' names, sizes and row counts: prepare rewriting any shard changes it."""
    files = storage.list_files(shards, ".parquet")
    if not files:
        return None
    parts = [(storage.name(f), storage.size(f), storage.parquet_rows(f)) for f in files]
    return digest(parts)


def folder_fingerprint(path: str | None) -> str | None:
    """A folder's (or file's) relative paths and sizes: an image set swapped or edited."""
    if path is None:
        return None
    files = storage.find_files(path)  # "/"-joined: a folder copied to a bucket keeps it
    if not files:
        return None
    if not storage.isdir(path):
        return digest(list(files[0]))  # a single file
    return digest([list(f) for f in files])


def model_fingerprint(model_dir: str) -> str | None:
    """The exported weights' content: a new model (a retrain, a sweep's winner) changes it."""
    files = storage.list_files(model_dir, ".safetensors") + [
        storage.join(model_dir, "open_clip_config.json")
    ]
    files = [f for f in files if storage.exists(f)]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(storage.read_bytes(f))
    return h.hexdigest()[:16]


def _listing(lines: list[str], most: int = 12) -> str:
    """The differing fields, all of them unless a whole section moved (then the first few)."""
    shown = "; ".join(lines[:most])
    return shown + (f"; and {len(lines) - most} more" if len(lines) > most else "")


# -- bookkeeping ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decision:
    run: bool
    why: str
    fresh: bool = False  # discard the stage's earlier outputs first


def decide(run: RunDir, name: str, identity: dict[str, Any], force: bool) -> Decision:
    """Whether stage `name` runs; raises StageConfigMismatch naming each changed setting."""
    entry = run.stage(name)
    if force:
        return Decision(True, "forced (--force)", fresh=True)
    if entry is None:
        return Decision(True, "not finished yet")
    old = entry.get("identity")
    if old is None:
        raise StageConfigMismatch(
            f"stage {name!r} in {run.root} was finished by an older version of the pipeline "
            "(no identity recorded); rerun with --force to redo it, or choose another --run-dir"
        )
    changed = diff(old["config"], identity["config"])
    if changed:
        raise StageConfigMismatch(
            f"stage {name!r} in {run.root} was finished with another configuration: "
            + _listing(changed)
            + ". Rerun with --force to redo it, or choose another --run-dir"
        )
    inputs = [
        f"inputs.{line}".replace(":", f" (from {UPSTREAM[key]}):", 1)
        if key in UPSTREAM
        else f"inputs.{line}"
        for line in diff(old["inputs"], identity["inputs"])
        for key in [line.split(":", 1)[0]]
    ]
    if inputs:
        return Decision(True, "its input changed since it ran: " + _listing(inputs), fresh=True)
    return Decision(False, f"already finished in {run.root} (use --force to redo)")


def begin(
    spec: RunSpec,
    run: RunDir,
    name: str,
    identity: dict[str, Any],
    log: Any,
    folder: str | None = None,
) -> Decision:
    """Decide, log, and prepare for a stage: forget a stage that reruns, claim its folder."""
    decision = decide(run, name, identity, spec.options.force)
    if not decision.run:
        log(f"[{name}] {decision.why}")
        return decision
    if decision.fresh:
        if run.stage(name) is not None and not spec.options.force:
            log(f"[{name}] {decision.why}: running it again")
        run.forget(name)
    if folder is not None:
        claim(folder, identity, fresh=decision.fresh, what=name)
    return decision


def claim(folder: str, identity: dict[str, Any], fresh: bool, what: str) -> None:
    """Take `folder` for a stage of this identity: an unfinished run of another identity there
    is refused (resuming it would mix two), unless `fresh` discards it."""
    marker = storage.join(folder, IDENTITY_FILE)
    if fresh:
        storage.remove(folder, recursive=True)
    if storage.exists(marker):
        changed = diff(storage.read_json(marker), identity)
        if changed:
            raise StageConfigMismatch(
                f"{folder} holds an unfinished {what} of another configuration ("
                + _listing(changed)
                + "); rerun with --force to discard it, or choose another --run-dir"
            )
    write_json_atomic(marker, identity)


def finish(run: RunDir, name: str, identity: dict[str, Any], **counts: Any) -> None:
    run.mark_done(name, digest(identity), identity=identity, **counts)


# -- identities -----------------------------------------------------------------------------
def _asdict(obj: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def demo_identity(spec: RunSpec) -> dict[str, Any]:
    return {"config": {"demo": _asdict(spec.config.demo)}, "inputs": {}}


def prepare_identity(spec: RunSpec) -> dict[str, Any]:
    return {
        "config": {"prepare": _asdict(spec.config.prepare)},
        "inputs": {"url_list": spec.inputs.url_list_fingerprint},
    }


def val_path(spec: RunSpec, run: RunDir) -> str | None:
    """The small labelled folder probed during training (and ranked on by sweeps)."""
    if spec.inputs.val_dataset is not None:
        return storage.normalize(spec.inputs.val_dataset)
    demo_val = storage.join(run.demo, "val")
    if spec.inputs.url_list is None and storage.isdir(demo_val):
        return demo_val
    return None


def train_identity(spec: RunSpec, run: RunDir) -> dict[str, Any]:
    return {
        "config": {"train": _asdict(spec.config.train)},
        "inputs": {
            "shards": shards_fingerprint(run.shards),
            "val_dataset": folder_fingerprint(val_path(spec, run)),
        },
    }


def sweep_identity(spec: RunSpec, run: RunDir) -> dict[str, Any]:
    ident = train_identity(spec, run)
    ident["config"]["sweep"] = _asdict(spec.config.sweep)
    return ident


def eval_paths(spec: RunSpec, run: RunDir) -> tuple[str, str | None]:
    if spec.inputs.eval_dataset is not None:
        return storage.normalize(spec.inputs.eval_dataset), None
    if spec.inputs.url_list is None:
        return storage.join(run.demo, "eval"), storage.join(run.demo, "retrieval.parquet")
    raise ValueError("no eval dataset: pass --eval-dataset (an image folder, one per class)")


def eval_identity(spec: RunSpec, run: RunDir) -> dict[str, Any]:
    dataset, retrieval = eval_paths(spec, run)
    return {
        "config": {"eval": _asdict(spec.config.eval)},
        "inputs": {
            "eval_dataset": folder_fingerprint(dataset),
            "retrieval": folder_fingerprint(retrieval),
            "model": model_fingerprint(run.model),
        },
    }


# -- stages ---------------------------------------------------------------------------------
def demo(spec: RunSpec, run: RunDir, log: Any = print) -> dict[str, Any]:
    from pipeline.demo import build_demo_corpus

    ident = demo_identity(spec)
    if not begin(spec, run, "demo", ident, log).run:
        return storage.read_json(storage.join(run.demo, "corpus.json"))
    log(f"Building the demo corpus in {run.demo} ...")
    with storage.local_output(run.demo) as demo_dir:  # built here, then uploaded whole
        corpus = build_demo_corpus(demo_dir, spec.config.demo)
    finish(run, "demo", ident)
    return corpus


def prepare(spec: RunSpec, run: RunDir, log: Any = print) -> dict[str, Any]:
    from pipeline.data.prepare import format_funnel

    ident = prepare_identity(spec)
    entry = run.stage("prepare")
    # A retry reopens a finished stage of this very identity (decide refuses another one).
    retry = (
        spec.options.retry_failed
        and entry is not None
        and not spec.options.force
        and not decide(run, "prepare", ident, False).run
    )
    decision = (
        Decision(True, "--retry-failed") if retry else begin(spec, run, "prepare", ident, log)
    )
    if not decision.run:
        return storage.read_json(run.stats_path)
    if spec.inputs.url_list is not None:
        stats = _run_prepare(spec, run, spec.inputs.url_list, None, decision, log)
    else:
        from pipeline.demo import URLS, serve_demo, write_url_list

        demo(spec, run, log)
        # The images are served from this machine, the demo's web (a local copy when the run
        # dir is a bucket); their URL list lives in the run dir, where the shard tasks on every
        # node read it (no node but this one sees this machine's disk).
        urls = storage.join(run.demo, URLS)
        with (
            storage.local_copy(run.demo) as demo_dir,
            serve_demo(storage.join(demo_dir, "www")) as base_url,
        ):
            log(f"Demo images served at {base_url} while they download")
            written = write_url_list(demo_dir, base_url)  # urls itself when the run dir is local
            if storage.is_uri(urls):
                storage.write_bytes(urls, written.read_bytes())
            # The demo's list names a new port each time: its fingerprint is its identity.
            stats = _run_prepare(spec, run, urls, digest(ident), decision, log)
    log(format_funnel(stats))
    finish(
        run,
        "prepare",
        ident,
        samples=stats["samples"],
        rejects=stats["rejects"],
        shards=shards_fingerprint(run.shards),
    )
    return stats


def _run_prepare(spec, run, path, fingerprint, decision, log):
    from pipeline.data.prepare import run_prepare
    from pipeline.data.prepare.run import plan

    # The list's files and row counts only: shard tasks read their own rows.
    urls = plan(path, spec.config.prepare)
    log(f"[prepare] {len(urls)} rows from {path}")
    total = -(-len(urls) // spec.config.prepare.rows_per_shard)
    with shard_ticker(run.progress, total, log):
        return run_prepare(
            urls,
            run,
            spec.config.prepare,
            fingerprint=fingerprint,
            retry_failed=spec.options.retry_failed,
            fresh=decision.fresh,
            log=log,
        )


def _is_marker(base: str) -> bool:
    """part-NNNNN.json: one finished shard's marker (not a retry journal)."""
    return base.startswith("part-") and base[5:-5].isdigit() and base.endswith(".json")


@contextlib.contextmanager
def shard_ticker(progress: str, total: int, log: Any, every_s: float = 15.0):
    """A console line every `every_s` seconds while shards finish: prepare's progress, counted
    from the markers its workers write (the driver only reads the folder)."""
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        last = -1
        while not stop.wait(every_s):
            done = sum(
                1 for f in storage.list_files(progress, ".json") if _is_marker(storage.name(f))
            )
            if done == last:
                continue
            last, elapsed = done, time.monotonic() - start
            eta = f", ETA {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""
            log(f"[prepare] {done}/{total} shards finished after {elapsed:.0f}s{eta}")

    thread = threading.Thread(target=tick, name="prepare-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def train(spec: RunSpec, run: RunDir, log: Any = print) -> dict[str, Any]:
    from pipeline.train.layout import AUTO, cluster_now, resolve_layout
    from pipeline.train.loop import run_training

    if spec.inputs.shards is not None:  # once: a rerun finds the import whole and skips it
        from pipeline.data.webdataset import import_shards

        import_shards(
            spec.inputs.shards, run.shards, spec.config.train.model,
            spec.config.prepare.rows_per_shard, log,
        )  # fmt: skip
    ident = train_identity(spec, run)
    if not begin(spec, run, "train", ident, log, folder=run.train).run:
        return run.stage("train")["metrics"]
    cfg = spec.config.train
    num_samples = count_samples(run.shards)
    # The spec keeps num_workers "auto"; the layout is derived here, where the cluster is known.
    layout = resolve_layout(cfg, cluster_now() if cfg.num_workers == AUTO else None)
    log(f"[train] {num_samples} samples, {layout.describe()}")
    if layout.auto:
        log(f"[train] workers: {layout.why}")
        _record_derived(spec, run, layout)
    fit_at = time.time()
    _, metrics = run_training(
        cfg, run.shards, num_samples, run.root, zeroshot_dataset=val_path(spec, run), layout=layout
    )
    seconds = train_seconds(metrics, fit_at, time.time())
    metrics = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not k.startswith("marks_")
    }
    write_run_card(spec, run, ident, metrics, cfg.global_batch_size)
    finish(
        run,
        "train",
        ident,
        metrics=metrics,
        model=str(run.model),
        layout=dataclasses.asdict(layout),
        seconds=seconds,
    )
    return metrics


TRAIN_PARTS = ("workers_start", "model_and_data_plan", "first_batch", "steps", "checkpoint_export")


def train_seconds(metrics: dict[str, Any], fit_at: float, done_at: float) -> dict[str, float]:
    """The train stage's wall time split at the last worker start's marks (epoch seconds; the
    driver's clock against rank 0's, which agree on one machine): empty without them."""
    marks = [metrics.get(f"marks_{k}_at") for k in ("loop", "ready", "first_batch", "end")]
    if any(m is None for m in marks):
        return {}
    points = [fit_at, *marks, done_at]
    pairs = zip(TRAIN_PARTS, points[:-1], points[1:], strict=True)
    return {n: round(max(0.0, b - a), 1) for n, a, b in pairs}


def _record_derived(spec: RunSpec, run: RunDir, layout: Any) -> None:
    """RUN/config.json keeps the spec's "auto" and says, beside it, what it resolved to."""
    derived = {"train.num_workers": {"auto": dataclasses.asdict(layout)}}
    write_json_atomic(run.config_path, {**spec.to_dict(), "derived": derived})


def sweep(spec: RunSpec, run: RunDir, log: Any = print) -> dict[str, Any]:
    """Tune trials over the shared shards; the best one exported to RUN/model. Resumable."""
    from pipeline.tune.sweep import export_winner, run_sweep

    val = val_path(spec, run)
    if val is None:
        raise FileNotFoundError(
            f"no validation folder in {storage.join(run.demo, 'val')}: pass --val-dataset"
        )
    ident = sweep_identity(spec, run)
    if not begin(spec, run, "sweep", ident, log, folder=run.sweep).run:
        return run.stage("sweep")["winner"]
    report = run_sweep(
        spec.config.train,
        spec.config.sweep,
        run.shards,
        count_samples(run.shards),
        run.sweep,
        val,
        log=log,
    )
    winner = report["winner"]
    export_winner(run.sweep, winner, run.model)
    counts = {k: report[k] for k in ("trials", "stopped_early", "steps_total", "winner")}
    metrics = {"step": winner["steps"], "zeroshot_top1": winner["final_top1"]}
    write_run_card(spec, run, ident, metrics, winner["hparams"]["batch_size"], winner=winner)
    finish(
        run, "sweep", ident, **counts, report=report["html"], metrics=metrics, model=str(run.model)
    )
    return winner


def eval_resources(spec: RunSpec, cluster: dict[str, float] | None = None):
    """(eval config with its actor count, use_gpu): a GPU per embedding actor when the cluster
    has GPUs, or when training asked for them (an autoscaling cluster may have let its GPU
    nodes go; the actors' requests bring one back). Not part of the eval's identity: the
    figures agree on either device up to float rounding."""
    from pipeline.evaluate import embedding_resources

    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    cfg = spec.config.eval
    use_gpu, concurrency = embedding_resources(
        cluster, True if spec.config.train.use_gpu else None, cfg.concurrency
    )
    return dataclasses.replace(cfg, concurrency=concurrency), use_gpu


def evaluate(spec: RunSpec, run: RunDir, log: Any = print) -> dict[str, Any]:
    from pipeline.evaluate import (
        clip_benchmark_keys,
        evaluate_retrieval,
        evaluate_zero_shot,
        format_markdown,
        write_tensorboard,
    )

    if not storage.exists(storage.join(run.model, "open_clip_config.json")):
        raise FileNotFoundError(f"no exported model in {run.model}: run jobs/train.py first")
    dataset, retrieval = eval_paths(spec, run)
    ident = eval_identity(spec, run)
    if not begin(spec, run, "eval", ident, log).run:
        return storage.read_json(run.eval_results_path)
    cfg, use_gpu = eval_resources(spec)
    log(f"[eval] {cfg.concurrency} embedding actors" + (", 1 GPU each" if use_gpu else ", on CPUs"))
    results = evaluate_zero_shot(run.model, dataset, cfg, use_gpu, log=log)
    if retrieval is not None and storage.exists(retrieval):
        results.update(evaluate_retrieval(run.model, retrieval, cfg, use_gpu, log=log))
    results["dataset"] = dataset
    results.update(clip_benchmark_keys(results, model=str(run.model), pretrained=None))
    write_json_atomic(run.eval_results_path, results)
    model_stage = run.stage("sweep") if _model_from_sweep(run) else run.stage("train")
    # At the last training step, so runs compare on one axis in TensorBoard.
    step = (model_stage or {}).get("metrics", {}).get("step", 0)
    with storage.local_output(run.path("eval", "tensorboard")) as tensorboard:
        write_tensorboard(results, tensorboard, step=int(step))
    _add_eval_to_run_card(run, results)
    log(format_markdown(results))
    finish(run, "eval", ident, top1=results["top1"])
    return results


def _model_from_sweep(run: RunDir) -> bool:
    card = storage.join(run.model, "run_card.json")
    return storage.exists(card) and storage.read_json(card).get("stage") == "sweep"


# -- the run card ---------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import open_clip
    import ray
    import torch

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "ray": ray.__version__}


def write_run_card(
    spec: RunSpec,
    run: RunDir,
    identity: dict[str, Any],
    metrics: dict[str, Any],
    global_batch_size: int,
    winner: dict[str, Any] | None = None,
) -> None:
    """RUN/model/run_card.json: what the exported model is, for whoever loads it later."""
    step = int(metrics.get("step", 0))
    logit_scale = metrics.get("logit_scale")
    card = {
        "stage": "sweep" if winner else "train",
        "spec": spec.to_dict(),
        "shards_fingerprint": identity["inputs"]["shards"],
        "val_dataset_fingerprint": identity["inputs"]["val_dataset"],
        "final_step": step,
        "samples_seen": step * int(global_batch_size),
        "temperature": 1 / logit_scale if logit_scale else None,
        "metrics": metrics,
        "versions": _versions(),
        "eval": None,
    }
    if winner is not None:
        card["sweep_winner"] = {
            k: winner.get(k) for k in ("trial_id", "hparams", "steps", "final_top1")
        }
        card["temperature"] = winner.get("final_temperature", card["temperature"])
    write_json_atomic(storage.join(run.model, "run_card.json"), card)


def _add_eval_to_run_card(run: RunDir, results: dict[str, Any]) -> None:
    path = storage.join(run.model, "run_card.json")
    if not storage.exists(path):
        return
    card = storage.read_json(path)
    card["eval"] = {k: v for k, v in results.items() if isinstance(v, int | float | str | dict)}
    write_json_atomic(path, card)


# -- summary --------------------------------------------------------------------------------
# The summary's name of a stage's seconds (the job's stage "evaluate" is its "eval" section).
STAGE_KEYS = {"evaluate": "eval"}


def summary(
    spec: RunSpec,
    run: RunDir,
    stage_seconds: dict[str, float] | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The headline figures, also written to RUN/summary.json. `stage_seconds`: this
    command's wall seconds per part (setup, ray_start, each stage), `wall_seconds` its total."""
    stages = run.manifest()["stages"]
    stats = storage.read_json(run.stats_path) if storage.exists(run.stats_path) else {}
    results = (
        storage.read_json(run.eval_results_path) if storage.exists(run.eval_results_path) else {}
    )
    train = stages.get("train", {}).get("metrics", {})
    summary = {
        "preset": spec.config.preset,
        "run_dir": str(run.root),
        "stages_finished": sorted(stages),
        "data": {k: stats.get(k) for k in ("rows_in", "samples", "rejects", "images_per_second")},
        "train": {
            k: train.get(k)
            for k in (
                "step",
                "loss",
                "samples_per_second",
                "data_wait_fraction",
                "zeroshot_top1",
            )
        },
        "eval": {
            k: v for k, v in results.items() if isinstance(v, int | float) and k != "num_images"
        },
        "paths": {
            "config": run.config_path,
            "manifest": str(run.manifest_path),
            "shards": str(run.shards),
            "rejects": str(run.rejects),
            "stats": str(run.stats_path),
            "train": str(run.train),
            "tensorboard": storage.join(run.train, "tensorboard"),
            "model": str(run.model),
            "eval_results": str(run.eval_results_path),
            "summary": str(run.summary_path),
        },
    }
    layout = stages.get("train", {}).get("layout")
    if layout:
        summary["train"]["workers"] = layout["num_workers"]
        summary["train"]["threads_per_worker"] = layout["threads"]
    if stage_seconds is not None:
        summary["stage_seconds"] = {k: round(v, 1) for k, v in stage_seconds.items()}
        summary["wall_seconds"] = round(wall_seconds or sum(stage_seconds.values()), 1)
        entry = stages.get("train", {})
        if entry.get("seconds") and _finished_since(entry, summary["wall_seconds"]):
            summary["train_seconds"] = entry["seconds"]  # this command trained
    if "sweep" in stages:
        sweep = stages["sweep"]
        summary["sweep"] = {
            k: sweep.get(k) for k in ("trials", "stopped_early", "steps_total", "winner")
        }
        summary["paths"]["sweep_report"] = sweep.get("report")
        if "train" not in stages:  # the model came from the sweep: point at its dashboards
            del summary["paths"]["train"]
            summary["paths"]["tensorboard"] = str(run.sweep)
    write_json_atomic(run.summary_path, summary)
    return summary


def _finished_since(entry: dict[str, Any], seconds: float) -> bool:
    """Whether a manifest entry was finished within the last `seconds`."""
    import datetime

    at = datetime.datetime.strptime(entry["finished_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return at >= time.time() - seconds - 1


def _clock(seconds: float) -> str:
    """12.3 -> "12s", 754 -> "12m34s"."""
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_summary(summary: dict[str, Any]) -> str:
    d, t, e, p = summary["data"], summary["train"], summary["eval"], summary["paths"]

    def pct(key: str) -> str:
        return f"{100 * e[key]:.1f}%" if e.get(key) is not None else "n/a"

    lines = [f"== Summary ({summary['preset']}) =="]
    if d.get("rows_in") is not None:
        lines.append(
            f"data : {d['rows_in']} URLs -> {d['samples']} samples, {d['rejects']} rejected "
            f"({d['images_per_second']} rows/s)"
        )
    if t.get("step") is not None:
        lines.append(
            f"train: {t['step']} steps, final loss {t['loss']:.3f}, "
            f"{t['samples_per_second']:.0f} samples/s"
            + (
                f", data wait {100 * t['data_wait_fraction']:.1f}%"
                if t.get("data_wait_fraction") is not None
                else ""
            )
            + (
                f", val zero-shot top1 {100 * t['zeroshot_top1']:.1f}%"
                if t.get("zeroshot_top1") is not None
                else ""
            )
        )
    if summary.get("sweep"):
        s, w = summary["sweep"], summary["sweep"]["winner"]
        knobs = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["hparams"].items()
        )
        lines.append(
            f"sweep: {s['trials']} trials, {s['stopped_early']} stopped early, "
            f"{s['steps_total']} steps; winner {w['trial_id']} ({knobs}): val top1 "
            f"{100 * w['final_top1']:.1f}% at step {w['steps']}"
        )
    if e:
        lines.append(
            f"eval : top1 {pct('top1')} (seen {pct('seen_top1')}, held-out {pct('heldout_top1')}),"
            f" top5 {pct('top5')}"
        )
    if summary.get("stage_seconds"):
        parts = ", ".join(f"{k} {_clock(v)}" for k, v in summary["stage_seconds"].items())
        lines.append(f"time : {_clock(summary['wall_seconds'])} in all ({parts})")
        if summary.get("train_seconds"):
            split = summary["train_seconds"]  # in the order they happen (JSON sorts the keys)
            parts = ", ".join(f"{k} {split[k]:.0f}s" for k in TRAIN_PARTS if k in split)
            lines.append(f"       train: {parts}")
    lines.append("outputs:")
    lines.extend(
        f"  {name:<12} {path}"
        + ("" if name == "summary" or (path and storage.exists(path)) else "  (not yet)")
        for name, path in p.items()
    )
    lines.append(f"TensorBoard: tensorboard --logdir {p['tensorboard']} --host 127.0.0.1")
    return "\n".join(lines)


# -- dry run --------------------------------------------------------------------------------
def plan(spec: RunSpec, run: RunDir) -> list[dict[str, Any]]:
    """What the job would do, stage by stage (run, skip or refuse, and why), without Ray."""
    rows: list[dict[str, Any]] = []
    upstream_runs: str | None = None  # the first stage of this job that will run
    for name in spec.stages:
        row: dict[str, Any] = {"stage": name}
        try:
            row.update(_plan_stage(spec, run, name, upstream_runs))
        except (StageConfigMismatch, ValueError, FileNotFoundError) as err:
            row.update(action="refused", why=str(err))
        if row["action"] == "run" and upstream_runs is None:
            upstream_runs = name
        rows.append(row)
    return rows


def _plan_stage(spec: RunSpec, run: RunDir, name: str, upstream: str | None) -> dict[str, Any]:
    cfg = spec.config
    if name == "prepare":
        d = decide(run, "prepare", prepare_identity(spec), spec.options.force)
        if not d.run and spec.options.retry_failed:
            d = Decision(True, "--retry-failed: fetch the transient failures again")
        from pipeline.data.prepare.run import TASK_CPUS

        p = cfg.prepare
        return {
            "action": "run" if d.run else "skip",
            "why": d.why,
            "resources": f"a task per {p.rows_per_shard}-row shard, {TASK_CPUS:g} CPU and "
            f"{p.download.thread_count} threads each",
        }
    if name in ("train", "sweep"):
        from pipeline.tune.sweep import trial_resources

        t = cfg.train
        if name == "train":
            layout = _dry_run_layout(t)
            if layout is None:
                workers = "num_workers auto: decided from the cluster once Ray starts"
            elif layout.auto:
                workers = f"num_workers auto -> {layout.describe()} if Ray starts on this machine"
            else:
                workers = layout.describe()
            out = {
                "steps": _train_steps(spec, run, layout.num_workers if layout else 1),
                "resources": f"{workers}, data tasks {t.data_cpus_per_task:g} CPU each",
            }
        else:
            need = trial_resources(cfg.sweep, t)
            out = {
                "steps": f"{_trials(spec)} trials, at most {cfg.sweep.max_steps} steps each",
                "resources": f"{need['CPU']:g} CPU + {need['GPU']:g} GPU per running trial",
            }
        importer = "the --shards import" if spec.inputs.shards else "prepare"
        if shards_fingerprint(run.shards) is None:
            return {
                "action": "run",
                "why": f"after {upstream or importer} writes the shards",
                **out,
            }
        ident = train_identity(spec, run) if name == "train" else sweep_identity(spec, run)
        d = decide(run, name, ident, spec.options.force)
        why = d.why
        if not d.run and upstream:
            why = f"{d.why}, unless {upstream} changes its inputs"
        return {"action": "run" if d.run else "skip", "why": why, **out}
    if name == "evaluate":
        e = cfg.eval
        out = {"resources": f"{e.concurrency} embedding actors, batch {e.batch_size}"}
        if model_fingerprint(run.model) is None:
            source = "sweep" if "sweep" in spec.stages else "train"
            return {"action": "run", "why": f"after {source} exports RUN/model", **out}
        d = decide(run, "eval", eval_identity(spec, run), spec.options.force)
        why = d.why if d.run or not upstream else f"{d.why}, unless {upstream} changes the model"
        return {"action": "run" if d.run else "skip", "why": why, **out}
    raise ValueError(f"unknown stage {name!r}")


def _dry_run_layout(t: Any) -> Any:
    """The training layout without Ray: "auto" as this machine would resolve it (None where
    it cannot: e.g. --use-gpu on a machine without one, which the cluster may well have)."""
    from pipeline.train.layout import AUTO, resolve_layout, this_machine

    if t.num_workers != AUTO:
        return resolve_layout(t, None)
    try:
        return resolve_layout(t, this_machine())
    except ValueError:
        return None


def _train_steps(spec: RunSpec, run: RunDir, workers: int) -> str:
    t = spec.config.train
    if shards_fingerprint(run.shards) is not None:
        from pipeline.train.ingest import list_chunks
        from pipeline.train.loop import training_schedule

        chunks = list_chunks(run.shards, workers)
        steps = sum(training_schedule(t, chunks, workers))
        return f"{steps} steps of {t.global_batch_size} samples"
    if t.max_steps:
        return f"{t.max_steps} steps of {t.global_batch_size} samples"
    return f"{t.epochs} epochs of the shards (steps known once they exist)"


def _trials(spec: RunSpec) -> int:
    s = spec.config.sweep
    if s.search != "grid":
        return s.num_samples
    n = len(s.temperatures) * len(s.learn_temperature) * len(s.batch_sizes) * len(s.seeds)
    return n * (len(s.lrs) if s.lr_rule == "swept" else 1) * s.num_samples


def format_plan(spec: RunSpec, rows: list[dict[str, Any]]) -> str:
    lines = ["== Resolved spec ==", json.dumps(spec.to_dict(), indent=2, default=str), ""]
    lines.append(f"== Plan for {spec.run_dir} (dry run: nothing started, nothing written) ==")
    for row in rows:
        lines.append(f"{row['stage']:<9} {row['action'].upper():<8} {row['why']}")
        for key in ("steps", "resources"):
            if row.get(key):
                lines.append(f"{'':<18} {key}: {row[key]}")
    return "\n".join(lines)
