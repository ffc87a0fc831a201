"""The run directory of DESIGN.md and its manifest of finished stages.

The root is a local path or a URI (`s3://bucket/run`): every path below is a str built with
storage.join, and every read and write goes through pipeline.storage, so the same run dir works
on a laptop's disk and in a bucket that the nodes of a cluster share.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.faults import commit_point


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON whole: a crash leaves the old file or object or the new one, never half."""
    storage.write_json(path, obj)


class StageConfigMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class RunDir:
    root: str  # storage.normalize'd: an absolute local path or a URI without a trailing slash

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        root = storage.normalize(path)
        if not storage.is_uri(root):
            probe = root
            while True:
                if os.path.exists(probe) and not os.path.isdir(probe):
                    raise ValueError(f"run directory {root}: {probe} is a file, not a folder")
                up = os.path.dirname(probe)
                if up == probe:
                    break
                probe = up
        return cls(root)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # Paths fixed by DESIGN.md.
    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

    @property
    def config_path(self) -> str:
        return self.path("config.json")

    @property
    def demo(self) -> str:
        return self.path("demo")

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def shards(self) -> str:
        return self.path("data", "shards")

    @property
    def rejects(self) -> str:
        return self.path("data", "rejects")

    @property
    def progress(self) -> str:
        return self.path("data", "progress")

    @property
    def stats_path(self) -> str:
        return self.path("data", "stats.json")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def model(self) -> str:
        return self.path("model")

    @property
    def sweep(self) -> str:
        return self.path("sweep")

    @property
    def eval_results_path(self) -> str:
        return self.path("eval", "results.json")

    @property
    def summary_path(self) -> str:
        return self.path("summary.json")

    def manifest(self) -> dict[str, Any]:
        try:
            return storage.read_json(self.manifest_path)
        except FileNotFoundError:
            return {"stages": {}}

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
        # The manifest is the stage's marker: written whole, after everything it names.
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
