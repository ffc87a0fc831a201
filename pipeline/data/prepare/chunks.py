"""Shards as units of resume: each covers a fixed range of input rows and is done once its
marker exists.

Shard N holds the survivors of input rows [N*k, (N+1)*k), its rejects the rest of them.
Each file is committed whole (pipeline.storage: a local temporary name renamed, or one object
upload) and the marker `data/progress/part-NNNNN.json` is written last, so a shard or rejects
file without a marker is the leftover of an interrupted attempt and is deleted, never taken
for finished. The worker that processed a shard writes all three itself (Layout.commit runs in
a Ray task); the driver only reads markers. A retry that rewrites a finished shard first writes
both new files, then a journal naming them, then moves them: a crash at any point rolls
forward or leaves the old pair.

Every path here is a `str` (a local path or a URI): the same code runs on a bucket.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from pipeline import storage
from pipeline.faults import commit_point
from pipeline.rundir import StageConfigMismatch
from pipeline.train.ingest import CHUNK_ROWS


def name(index: int) -> str:
    return f"part-{index:05d}"


def index_of(path: str) -> int | None:
    """N of a `part-NNNNN.<ext>` path, None for any other name."""
    stem = storage.name(path).split(".")[0]
    if len(stem) == 10 and stem.startswith("part-") and stem[5:].isdigit():
        return int(stem[5:])
    return None


def counts(samples: list[dict], rejects: list[dict], rows: int, seconds: dict) -> dict:
    """A shard's marker: what its rows became, counted from the rows themselves."""
    drops: dict[str, Counter[str]] = {}
    domains: dict[str, Counter[str]] = {}
    for r in rejects:
        drops.setdefault(r["stage"], Counter())[r["reason"]] += 1
        if r["stage"] == "download":
            try:
                host = urlsplit(r["url"]).hostname or "(no host)"
            except ValueError:
                host = "(bad url)"
            domains.setdefault(host, Counter())[r["reason"]] += 1
    if len(samples) + len(rejects) != rows:
        raise RuntimeError(f"shard lost rows: {len(samples)} + {len(rejects)} != {rows}")
    return {
        "rows": rows,
        "samples": len(samples),
        "rejects": len(rejects),
        "drops": {s: dict(c) for s, c in drops.items()},
        "domains": {d: dict(c) for d, c in domains.items()},
        "seconds": {s: round(v, 4) for s, v in seconds.items()},
    }


def table_of(rows: list[dict], sch: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in sch.names} for r in rows], schema=sch)


def write_rows(path: str, rows: list[dict], sch: pa.Schema) -> None:
    # Row groups of ingest's chunk size: training reads a chunk without its neighbours.
    storage.write_parquet(table_of(rows, sch), path, row_group_size=CHUNK_ROWS)


def _move(src: str, dst: str) -> None:
    """A rename on a disk; a copy and a delete on an object store (the journal covers both)."""
    fs, inner = storage.filesystem(src)
    fs.mv(inner, storage.filesystem(dst)[1])


def forget_listings(path: str) -> None:
    """Drop this process's cached directory listings (s3fs keeps them): other processes
    write in the run directory, and a stale listing hides their files from exists()."""
    fs, _ = storage.filesystem(path)
    fs.invalidate_cache()


def _all_names(folder: str) -> list[str]:
    """Every file in `folder`, hidden ones (temporaries of an interrupted write) included."""
    fs, inner = storage.filesystem(folder)
    try:
        return [storage.name(e) for e in fs.ls(inner, detail=False)]
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class Layout:
    """The data/ folder of a run as plain strings: shipped to the tasks that write in it."""

    root: str
    shards: str
    rejects: str

    @classmethod
    def of(cls, run: Any) -> Layout:
        return cls(os.fspath(run.root), os.fspath(run.shards), os.fspath(run.rejects))

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, "data", *parts)

    @property
    def dir(self) -> str:  # markers
        return self._at("progress")

    @property
    def staged(self) -> str:  # shards waiting for the dedup step
        return self._at("staged")

    @property
    def staged_rejects(self) -> str:
        return self._at("staged", "rejects")

    @property
    def hashes(self) -> str:
        return self._at("hashes")

    @property
    def drops(self) -> str:
        return self._at("drops")

    def file(self, folder: str, index: int, ext: str = "parquet") -> str:
        return storage.join(folder, f"{name(index)}.{ext}")

    def marker(self, index: int) -> str:
        return self.file(self.dir, index, "json")

    def staged_marker(self, index: int) -> str:
        return self.file(self.staged, index, "json")

    def commit(self, index, samples, rejects, rows, seconds, sample_schema, reject_schema, **info):
        """A first pass over the shard's rows: files, then the marker (with `info`)."""
        marker = {**counts(samples, rejects, rows, seconds), **info}
        for folder, rows_, sch, point in (
            (self.shards, samples, sample_schema, "prepare.shard"),
            (self.rejects, rejects, reject_schema, "prepare.rejects"),
        ):
            if rows_:
                write_rows(self.file(folder, index), rows_, sch)
                commit_point(point)
        storage.write_json(self.marker(index), marker)
        commit_point("prepare.marker")
        return marker

    def rewrite(self, index, samples, rejects, rows, seconds, sample_schema, reject_schema, **info):
        """Replaces a finished shard's pair of files (a retry), atomically as a pair."""
        marker = {**counts(samples, rejects, rows, seconds), **info}
        renames, deletes = [], []
        for folder, rows_, sch in (
            (self.shards, samples, sample_schema),
            (self.rejects, rejects, reject_schema),
        ):
            final = self.file(folder, index)
            if rows_:
                tmp = storage.join(folder, f".{name(index)}.parquet.retry")
                write_rows(tmp, rows_, sch)
                renames.append([tmp, final])
            else:  # no rows left there: the old file goes
                deletes.append(final)
        commit_point("retry.files")
        journal = storage.join(self.dir, f"{name(index)}.retry.json")
        storage.write_json(storage.join(self.dir, f".{name(index)}.retry.json.marker"), marker)
        commit_point("retry.journal_marker")
        # The commit point: from here on, a crash is rolled forward by roll_forward().
        storage.write_json(journal, {"renames": renames, "deletes": deletes})
        commit_point("retry.journal")
        self.roll_forward(journal)
        return marker

    def roll_forward(self, journal: str) -> None:
        """Finish a retry's rewrite; every step checks, so a crash between any two of them
        rolls forward again."""
        plan = storage.read_json(journal)
        for tmp, final in plan["renames"]:
            if storage.exists(tmp):
                _move(tmp, final)
                commit_point("retry.rename")
        for final in plan["deletes"]:
            if storage.exists(final):
                storage.remove(final)
                commit_point("retry.delete")
        index = index_of(journal)
        new_marker = storage.join(self.dir, f".{storage.name(journal)}.marker")
        if storage.exists(new_marker):  # else moved before a crash: the marker is the new one
            _move(new_marker, self.marker(index))
            commit_point("retry.marker")
        storage.remove(journal)
        commit_point("retry.done")


class Progress(Layout):
    """The driver's view of data/: the fingerprint stamp, recovery, the finished markers."""

    def __init__(self, run: Any, fingerprint: str, fresh: bool = False):
        layout = Layout.of(run)
        super().__init__(layout.root, layout.shards, layout.rejects)
        self.folders = (self.shards, self.rejects, self.dir, self.staged, self.hashes, self.drops)
        stamp = storage.join(self.dir, "fingerprint")
        if fresh:
            for d in self.folders:
                storage.remove(d, recursive=True)
        if storage.exists(stamp) and storage.read_text(stamp) != fingerprint:
            raise StageConfigMismatch(
                f"{storage.join(self.root, 'data')} holds an unfinished prepare run of another "
                "URL list or configuration; rerun with --force to discard it, or choose another "
                "--run-dir"
            )
        if not storage.exists(stamp):
            # Nothing of ours to resume: outputs of an older layout or a discarded run go.
            for d in self.folders:
                storage.remove(d, recursive=True)
            storage.write_text(stamp, fingerprint)
        for d in self.folders:
            storage.makedirs(d)
        self._recover()

    def _recover(self) -> None:
        for journal in storage.list_files(self.dir, ".retry.json"):
            self.roll_forward(journal)
        done = {storage.name(p).split(".")[0] for p in self.markers()}
        staged = {storage.name(p).split(".")[0] for p in storage.list_files(self.staged, ".json")}
        for folder, kept in (
            (self.shards, done),
            (self.rejects, done),
            (self.dir, None),
            # Staged files count once their staged marker exists (the dedup step reads them).
            (self.staged, staged),
            (self.staged_rejects, staged),
            (self.hashes, staged | done),
        ):
            for base in _all_names(folder):
                path = storage.join(folder, base)
                if base.startswith("."):  # temporary files of an interrupted write
                    storage.remove(path)
                elif kept is not None and base.split(".")[0] not in kept and "." in base:
                    storage.remove(path)  # written before a crash, its marker never was: redone

    def markers(self) -> list[str]:
        forget_listings(self.dir)
        return [p for p in storage.list_files(self.dir, ".json") if index_of(p) is not None]

    def done(self) -> dict[int, dict[str, Any]]:
        return {index_of(p): storage.read_json(p) for p in self.markers()}

    def staged_done(self) -> dict[int, dict[str, Any]]:
        forget_listings(self.staged)
        return {
            index_of(p): storage.read_json(p)
            for p in storage.list_files(self.staged, ".json")
            if index_of(p) is not None
        }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
