"""The run directory of DESIGN.md and its manifest of finished stages."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.faults import commit_point


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class StageConfigMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        root = Path(path).expanduser().resolve()
        for p in (root, *root.parents):
            if p.exists() and not p.is_dir():
                raise ValueError(f"run directory {root}: {p} is a file, not a folder")
        return cls(root)

    # Paths fixed by DESIGN.md.
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def demo(self) -> Path:
        return self.root / "demo"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    @property
    def rejects(self) -> Path:
        return self.root / "data" / "rejects"

    @property
    def stats_path(self) -> Path:
        return self.root / "data" / "stats.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    @property
    def eval_results_path(self) -> Path:
        return self.root / "eval" / "results.json"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text())

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(name)

    def is_done(self, name: str, config_hash: str) -> bool:
        """True if `name` finished with this config; refuses to mix outputs of another config."""
        entry = self.stage(name)
        if entry is None:
            return False
        if entry["config_hash"] != config_hash:
            raise StageConfigMismatch(
                f"stage {name!r} in {self.root} was finished with another configuration "
                f"(hash {entry['config_hash']}, now {config_hash}); rerun with --force to redo it, "
                "or choose another --run-dir"
            )
        return True

    def mark_done(self, name: str, config_hash: str, **counts: Any) -> None:
        manifest = self.manifest()
        manifest["stages"][name] = {
            "config_hash": config_hash,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **counts,
        }
        write_json_atomic(self.manifest_path, manifest)
        commit_point("manifest")

    def forget(self, *names: str) -> None:
        """Drop stages from the manifest so they (and what depends on them) run again."""
        manifest = self.manifest()
        for name in names:
            manifest["stages"].pop(name, None)
        write_json_atomic(self.manifest_path, manifest)
        commit_point("manifest")
