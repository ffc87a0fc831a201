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
    force: bool = False
    log: Any = print
    _urls: Any = dataclasses.field(default=None, init=False, repr=False)
    _forced: set[str] = dataclasses.field(default_factory=set, init=False, repr=False)

    def __post_init__(self):
        self.run.root.mkdir(parents=True, exist_ok=True)

    def check_inputs(self) -> None:
        """Fail fast, before Ray starts, on what the user can fix: the URL list, the eval set."""
        from pipeline.evaluate import load_image_folder
        from pipeline.prepare import read_url_list

        if self.input_path is not None:
            p = self.cfg.prepare
            self._urls = read_url_list(self.input_path, p.url_col, p.caption_col)
        if self.eval_dataset is not None:
            load_image_folder(self.eval_dataset, self.cfg.eval.classnames, self.cfg.eval.templates)

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
        from pipeline.prepare import format_funnel, read_url_list, run_prepare

        h = self._prepare_hash()
        if self._skip("prepare", h):
            return json.loads(self.run.stats_path.read_text())
        with self._url_list() as (path, cfg):
            p = cfg.prepare
            urls = self._urls if self._urls is not None and path == self.input_path else None
            if urls is None:
                urls = read_url_list(path, p.url_col, p.caption_col)
            self.log(f"[prepare] {len(urls)} rows from {path}")
            stats = run_prepare(urls, self.run, p)
        self.log(format_funnel(stats))
        self.run.mark_done("prepare", h, samples=stats["samples"], rejects=stats["rejects"])
        return stats

    def _train_hash(self) -> str:
        upstream = (self.run.stage("prepare") or {}).get("config_hash", "external")
        return _chain(config_hash(self.cfg.train), upstream)

    def train(self) -> dict[str, Any]:
        from pipeline.train import run_training

        h = self._train_hash()
        if self._skip("train", h):
            return self.run.stage("train")["metrics"]
        num_samples = count_samples(self.run.shards)
        marker = self.run.train / ".config_hash"
        if self.force and self.run.train.exists():
            shutil.rmtree(self.run.train)
        if marker.exists() and marker.read_text() != h:
            raise StageConfigMismatch(
                f"{self.run.train} holds an unfinished training run with another configuration; "
                "rerun with --force to discard it, or choose another --run-dir"
            )
        self.run.train.mkdir(parents=True, exist_ok=True)
        marker.write_text(h)
        self.log(f"[train] {num_samples} samples, {self.cfg.train.num_workers} workers")
        _, metrics = run_training(self.cfg.train, self.run.shards, num_samples, self.run.root)
        metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.run.mark_done("train", h, metrics=metrics, model=str(self.run.model))
        return metrics

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
        upstream = (self.run.stage("train") or {}).get("config_hash", "external")
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
        step = (self.run.stage("train") or {}).get("metrics", {}).get("step", 0)
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
            "train": {k: train.get(k) for k in ("step", "loss", "samples_per_second")},
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
