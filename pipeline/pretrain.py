"""The whole path on a run directory: demo corpus → prepare → train + export → eval → summary.

Each stage is skipped when the manifest says it finished with the same
configuration (and the same upstream stages); a stage whose configuration
changed is refused unless forced, so nothing written is silently mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import PipelineConfig, config_hash
from pipeline.rundir import RunDir, StageConfigMismatch, write_json_atomic

DEMO_NETWORK = "127.0.0.1/32"  # the demo server's address, allowed explicitly


def _chain(*parts: str) -> str:
    """A stage's hash covers its own config and its upstream stages' hashes."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def count_samples(shards: Path) -> int:
    files = sorted(shards.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {shards}: run jobs/prepare_data.py first")
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


@dataclasses.dataclass
class Pipeline:
    """Runs stages of one run directory; the jobs are thin wrappers around its methods."""

    cfg: PipelineConfig
    run: RunDir
    input_path: str | None = None  # None: the built-in demo corpus
    eval_dataset: str | None = None  # None: the demo's eval folder
    val_dataset: str | None = None  # zero-shot probes while training; None: the demo's val folder
    force: bool = False
    retry_failed: bool = False  # prepare: fetch again the rows rejected for transient reasons
    model_stage: str = "train"  # the stage whose model RUN/model holds: train, or sweep's winner
    log: Any = print
    _urls: Any = dataclasses.field(default=None, init=False, repr=False)
    _forced: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)

    def __post_init__(self):
        self.run.root.mkdir(parents=True, exist_ok=True)

    def check_inputs(self) -> None:
        """Fail fast, before Ray starts, on what the user can fix: the URL list, the eval set."""
        from pipeline.data.prepare import read_url_list
        from pipeline.evaluate import load_image_folder
        from pipeline.evaluate.datasets import check_images

        p = self.cfg.prepare
        if self.input_path is not None:
            self._urls = read_url_list(
                self.input_path, p.url_col, p.caption_col, p.save_additional_columns
            )
        if p.filters.decontaminate is not None:
            from pipeline.data.filters import IMAGE_SUFFIXES

            folder = Path(p.filters.decontaminate)
            if not folder.is_dir():
                raise FileNotFoundError(f"--decontaminate: {str(folder)!r} is not a folder")
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.rglob("*")):
                raise ValueError(f"--decontaminate: no images under {str(folder)!r}")
        if self.eval_dataset is not None:
            load_image_folder(self.eval_dataset, self.cfg.eval.classnames, self.cfg.eval.templates)
        if self.val_dataset is not None:
            try:
                check_images(load_image_folder(self.val_dataset))  # decoded, as the probe will
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"--val-dataset: {err}") from None
        from pipeline.train.loop import check_config

        check_config(self.cfg.train)

    # -- demo corpus -------------------------------------------------------------------------
    def demo(self) -> dict[str, Any]:
        from pipeline.demo import build_demo_corpus

        h = config_hash(self.cfg.demo)
        if self._skip("demo", h):
            return json.loads((self.run.demo / "corpus.json").read_text())
        self.log(f"Building the demo corpus in {self.run.demo} ...")
        corpus = build_demo_corpus(self.run.demo, self.cfg.demo)
        self.run.mark_done("demo", h)
        return corpus

    @contextlib.contextmanager
    def _url_list(self) -> Iterator[tuple[str, PipelineConfig]]:
        """The URL list to prepare and the config for it (the demo allows its own server)."""
        if self.input_path is not None:
            yield self.input_path, self.cfg
            return
        from pipeline.demo import serve_demo, write_url_list

        self.demo()
        download = self.cfg.prepare.download
        networks = tuple(dict.fromkeys((*download.allowed_networks, DEMO_NETWORK)))
        cfg = dataclasses.replace(
            self.cfg,
            prepare=dataclasses.replace(
                self.cfg.prepare,
                download=dataclasses.replace(download, allowed_networks=networks),
            ),
        )
        with serve_demo(self.run.demo / "www") as base_url:
            self.log(f"Demo images served at {base_url} while they download")
            yield str(write_url_list(self.run.demo, base_url)), cfg

    # -- stages ------------------------------------------------------------------------------
    def _skip(self, stage: str, h: str) -> bool:
        if self.force and stage not in self._forced:
            self._forced.add(stage)
            self.run.forget(stage)
            return False
        if self.run.is_done(stage, h):
            self.log(f"[{stage}] already finished in {self.run.root} (use --force to redo)")
            return True
        return False

    def _prepare_hash(self) -> str:
        source = f"demo:{config_hash(self.cfg.demo)}"
        if self.input_path is not None:
            # The same list named by another relative path is the same input.
            is_local = "://" not in self.input_path
            source = str(Path(self.input_path).resolve()) if is_local else self.input_path
        return _chain(config_hash(self.cfg.prepare), source)

    def prepare(self) -> dict[str, Any]:
        from pipeline.data.prepare import format_funnel, read_url_list, run_prepare

        h = self._prepare_hash()
        # A retry reopens a finished stage (of this very config: is_done refuses another one).
        retry = self.retry_failed and self.run.is_done("prepare", h) and not self.force
        if not retry and self._skip("prepare", h):
            return json.loads(self.run.stats_path.read_text())
        with self._url_list() as (path, cfg):
            p = cfg.prepare
            urls = self._urls if self._urls is not None and path == self.input_path else None
            if urls is None:
                urls = read_url_list(path, p.url_col, p.caption_col, p.save_additional_columns)
            self.log(f"[prepare] {len(urls)} rows from {path}")
            stats = run_prepare(
                urls,
                self.run,
                p,
                # The demo's list names a new port each time: its fingerprint is its config.
                fingerprint=None if self.input_path is not None else h,
                retry_failed=self.retry_failed,
                fresh=self.force,
                log=self.log,
            )
        self.log(format_funnel(stats))
        self.run.mark_done("prepare", h, samples=stats["samples"], rejects=stats["rejects"])
        return stats

    def _train_hash(self) -> str:
        upstream = (self.run.stage("prepare") or {}).get("config_hash", "external")
        return _chain(config_hash(self.cfg.train), upstream)

    def _claim(self, folder: Path, h: str, what: str) -> None:
        """Take `folder` for a stage with config hash `h`: an unfinished run there with another
        configuration is refused (resuming it would mix two configurations), unless forced."""
        marker = folder / ".config_hash"
        if self.force and folder.exists():
            shutil.rmtree(folder)
        if marker.exists() and marker.read_text() != h:
            raise StageConfigMismatch(
                f"{folder} holds an unfinished {what} with another configuration; "
                "rerun with --force to discard it, or choose another --run-dir"
            )
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(h)

    def train(self) -> dict[str, Any]:
        from pipeline.train.loop import run_training

        h = self._train_hash()
        if self._skip("train", h):
            return self.run.stage("train")["metrics"]
        num_samples = count_samples(self.run.shards)
        self._claim(self.run.train, h, "training run")
        self.log(f"[train] {num_samples} samples, {self.cfg.train.num_workers} workers")
        _, metrics = run_training(
            self.cfg.train,
            self.run.shards,
            num_samples,
            self.run.root,
            zeroshot_dataset=self.val_path(),
        )
        metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.mark_done("train", h, metrics=metrics, model=str(self.run.model))
        return metrics

    def val_path(self) -> Path | None:
        """The small labelled folder probed during training (and ranked on by sweeps)."""
        if self.val_dataset is not None:
            return Path(self.val_dataset)
        if self.input_path is None and (self.run.demo / "val").is_dir():
            return self.run.demo / "val"
        return None

    def check_sweep(self, prepared: bool = True) -> None:
        """Fail before Ray starts on what a sweep needs: a search space, a val folder, shards."""
        from pipeline.tune.sweep import check_sweep

        check_sweep(self.cfg.sweep, self.cfg.train)
        if self.val_dataset is None and self.input_path is not None:
            raise ValueError("a sweep ranks trials on a held-out image folder: pass --val-dataset")
        if prepared:
            if self.val_path() is None:
                raise FileNotFoundError(
                    f"no validation folder in {self.run.demo / 'val'}: pass --val-dataset"
                )
            check_sweep(self.cfg.sweep, self.cfg.train, count_samples(self.run.shards))

    def sweep(self) -> dict[str, Any]:
        """Tune trials over the shared shards; the best one exported to RUN/model. Resumable."""
        from pipeline.tune.sweep import export_winner, run_sweep

        self.model_stage = "sweep"
        self.check_sweep()
        val = self.val_path().resolve()
        upstream = (self.run.stage("prepare") or {}).get("config_hash", "external")
        h = _chain(config_hash(self.cfg.sweep), config_hash(self.cfg.train), str(val), upstream)
        if self._skip("sweep", h):
            return self.run.stage("sweep")["winner"]
        self._claim(self.run.sweep, h, "sweep")
        shards = self.run.shards
        num_samples = count_samples(shards)
        report = run_sweep(
            self.cfg.train, self.cfg.sweep, shards, num_samples, self.run.sweep, val, log=self.log
        )
        winner = report["winner"]
        export_winner(self.run.sweep, winner, self.run.model)
        self.run.forget("eval")  # it scored the model the winner replaces
        counts = {k: report[k] for k in ("trials", "stopped_early", "steps_total", "winner")}
        metrics = {"step": winner["steps"], "zeroshot_top1": winner["final_top1"]}
        self.run.mark_done(
            "sweep", h, **counts, report=report["html"], metrics=metrics, model=str(self.run.model)
        )
        return winner

    def _eval_paths(self) -> tuple[Path, Path | None]:
        if self.eval_dataset is not None:
            return Path(self.eval_dataset), None
        if self.input_path is None:
            return self.run.demo / "eval", self.run.demo / "retrieval.parquet"
        raise ValueError("no eval dataset: pass --eval-dataset (an image folder, one per class)")

    def evaluate(self) -> dict[str, Any]:
        from pipeline.evaluate import (
            evaluate_retrieval,
            evaluate_zero_shot,
            format_markdown,
            write_tensorboard,
        )

        dataset, retrieval = self._eval_paths()
        upstream = (self.run.stage(self.model_stage) or {}).get("config_hash", "external")
        h = _chain(config_hash(self.cfg.eval), str(dataset.resolve()), upstream)
        if self._skip("eval", h):
            return json.loads(self.run.eval_results_path.read_text())
        if not (self.run.model / "open_clip_config.json").exists():
            raise FileNotFoundError(
                f"no exported model in {self.run.model}: run jobs/train.py first"
            )
        results = evaluate_zero_shot(self.run.model, dataset, self.cfg.eval)
        if retrieval is not None and retrieval.exists():
            results.update(evaluate_retrieval(self.run.model, retrieval, self.cfg.eval))
        results["dataset"] = str(dataset)
        write_json_atomic(self.run.eval_results_path, results)
        # At the last training step, so runs compare on one axis in TensorBoard.
        step = (self.run.stage(self.model_stage) or {}).get("metrics", {}).get("step", 0)
        write_tensorboard(results, self.run.root / "eval" / "tensorboard", step=int(step))
        self.log(format_markdown(results))
        self.run.mark_done("eval", h, top1=results["top1"])
        return results

    # -- summary -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        run = self.run
        stages = run.manifest()["stages"]
        stats = json.loads(run.stats_path.read_text()) if run.stats_path.exists() else {}
        results = (
            json.loads(run.eval_results_path.read_text()) if run.eval_results_path.exists() else {}
        )
        train = stages.get("train", {}).get("metrics", {})
        summary = {
            "preset": self.cfg.preset,
            "run_dir": str(run.root),
            "stages_finished": sorted(stages),
            "data": {
                k: stats.get(k) for k in ("rows_in", "samples", "rejects", "images_per_second")
            },
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
                "manifest": str(run.manifest_path),
                "shards": str(run.shards),
                "rejects": str(run.rejects),
                "stats": str(run.stats_path),
                "train": str(run.train),
                "tensorboard": str(run.train / "tensorboard"),
                "model": str(run.model),
                "eval_results": str(run.eval_results_path),
                "summary": str(run.summary_path),
            },
        }
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
            f"sweep: {s['trials']} trials, {s['stopped_early']} stopped early by ASHA, "
            f"{s['steps_total']} steps; winner {w['trial_id']} ({knobs}): val top1 "
            f"{100 * w['final_top1']:.1f}% at step {w['steps']}"
        )
    if e:
        lines.append(
            f"eval : top1 {pct('top1')} (seen {pct('seen_top1')}, held-out {pct('heldout_top1')}),"
            f" top5 {pct('top5')}"
        )
    lines.append("outputs:")
    lines.extend(
        f"  {name:<12} {path}" + ("" if Path(path).exists() or name == "summary" else "  (not yet)")
        for name, path in p.items()
    )
    lines.append(f"TensorBoard: tensorboard --logdir {p['tensorboard']} --host 127.0.0.1")
    return "\n".join(lines)
