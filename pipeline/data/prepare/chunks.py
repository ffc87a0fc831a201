"""Shards as units of resume: each covers a fixed range of input rows and is done once its
marker exists.

Shard N holds the survivors of input rows [N*k, (N+1)*k), its rejects the rest of them.
Files are written under temporary names and renamed; the marker
`data/progress/part-NNNNN.json` is written last, so a shard or rejects file without a marker
is the leftover of an interrupted attempt and is deleted, never taken for finished. A retry
that rewrites a finished shard first writes both new files, then a journal naming them, then
renames: a crash at any point rolls forward or leaves the old pair.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.faults import commit_point
from pipeline.rundir import RunDir, StageConfigMismatch, write_json_atomic
from pipeline.train.ingest import CHUNK_ROWS


def name(index: int) -> str:
    return f"part-{index:05d}"


def _counts(samples: list[dict], rejects: list[dict], rows: int, seconds: dict) -> dict:
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
        # Seeds the duplicate checks when a later run resumes after this shard.
        "hashes": [[s["sha256"], s.get("phash")] for s in samples],
    }


class Progress:
    """The data/ folder of a run: shards, rejects and one marker per finished shard."""

    def __init__(self, run: RunDir, fingerprint: str, fresh: bool = False):
        self.shards, self.rejects = Path(run.shards), Path(run.rejects)
        self.dir = Path(run.progress)
        stamp = self.dir / "fingerprint"
        if fresh:
            for d in (self.shards, self.rejects, self.dir):
                shutil.rmtree(d, ignore_errors=True)
        if stamp.exists() and stamp.read_text() != fingerprint:
            raise StageConfigMismatch(
                f"{run.data} holds an unfinished prepare run of another URL list or "
                "configuration; rerun with --force to discard it, or choose another --run-dir"
            )
        if not stamp.exists():
            # Nothing of ours to resume: outputs of an older layout or a discarded run go.
            for d in (self.shards, self.rejects, self.dir):
                shutil.rmtree(d, ignore_errors=True)
            self.dir.mkdir(parents=True)
            tmp = self.dir / ".fingerprint.tmp"
            tmp.write_text(fingerprint)
            os.replace(tmp, stamp)
        self.shards.mkdir(parents=True, exist_ok=True)
        self.rejects.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _marker(self, index: int) -> Path:
        return self.dir / f"{name(index)}.json"

    def _recover(self) -> None:
        for journal in sorted(self.dir.glob("part-*.retry.json")):
            plan = json.loads(journal.read_text())
            # Every step may have been done already by a recovery that crashed after it:
            # each one checks, so a crash between any two of them rolls forward again.
            for tmp, final in plan["renames"]:
                if Path(tmp).exists():
                    os.replace(tmp, final)
                    commit_point("retry.rename")
            for final in plan["deletes"]:
                if Path(final).exists():
                    Path(final).unlink()
                    commit_point("retry.delete")
            index = int(journal.name.split(".")[0].split("-")[1])
            new_marker = journal.with_name(f".{journal.name}.marker")
            if new_marker.exists():  # else moved before a crash: the marker is the new one
                os.replace(new_marker, self._marker(index))
                commit_point("retry.marker")
            journal.unlink()
            commit_point("retry.done")
        done = {p.stem for p in self.dir.glob("part-?????.json")}
        for folder in (self.shards, self.rejects, self.dir):
            for p in folder.iterdir():
                if p.name.startswith("."):  # temporary files of an interrupted write
                    p.unlink()
                elif folder is not self.dir and p.stem not in done:
                    p.unlink()  # written before a crash, its marker never was: redone

    def done(self) -> dict[int, dict[str, Any]]:
        return {
            int(p.stem.split("-")[1]): json.loads(p.read_text())
            for p in sorted(self.dir.glob("part-?????.json"))
        }

    def _write(self, folder: Path, index: int, rows: list[dict], sch: pa.Schema, tag: str):
        """Writes rows to a temporary file; returns (tmp, final) or None for no rows."""
        final = folder / f"{name(index)}.parquet"
        if not rows:
            return None
        tmp = folder / f".{final.name}.{tag}"
        table = pa.Table.from_pylist([{c: r.get(c) for c in sch.names} for r in rows], schema=sch)
        # Row groups of ingest's chunk size: training reads a chunk without its neighbours.
        pq.write_table(table, tmp, row_group_size=CHUNK_ROWS)
        return str(tmp), str(final)

    def commit(self, index, samples, rejects, rows, seconds, sample_schema, reject_schema):
        """A first pass over the shard's rows: files, then the marker."""
        marker = _counts(samples, rejects, rows, seconds)
        for folder, rows_, sch, point in (
            (self.shards, samples, sample_schema, "prepare.shard"),
            (self.rejects, rejects, reject_schema, "prepare.rejects"),
        ):
            pair = self._write(folder, index, rows_, sch, "tmp")
            if pair:
                os.replace(*pair)
                commit_point(point)
        write_json_atomic(self._marker(index), marker)
        commit_point("prepare.marker")
        return marker

    def rewrite(self, index, samples, rejects, rows, seconds, sample_schema, reject_schema):
        """Replaces a finished shard's pair of files (a retry), atomically as a pair."""
        marker = _counts(samples, rejects, rows, seconds)
        renames, deletes = [], []
        for folder, rows_, sch in (
            (self.shards, samples, sample_schema),
            (self.rejects, rejects, reject_schema),
        ):
            pair = self._write(folder, index, rows_, sch, "retry")
            if pair:
                renames.append(pair)
            else:  # no rows left there: the old file goes
                deletes.append(str(folder / f"{name(index)}.parquet"))
        commit_point("retry.files")
        journal = self.dir / f"{name(index)}.retry.json"
        write_json_atomic(journal.with_name(f".{journal.name}.marker"), marker)
        commit_point("retry.journal_marker")
        # The commit point: from here on, a crash is rolled forward by _recover().
        write_json_atomic(journal, {"renames": renames, "deletes": deletes})
        commit_point("retry.journal")
        self._recover()
        return marker
