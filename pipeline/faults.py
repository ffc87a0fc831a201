"""The commit points of the pipeline, in one place, and a hook that crashes at one of them.

A commit point is a step after which a crash leaves the run directory in a new state: a shard
renamed into place, a marker written, a journal step, the stats, the manifest, a checkpoint,
a sweep's trial record. Every such step calls ``commit_point(name)`` right after it is done,
and the crash-point tests (tests/unit/test_crash_points.py) walk over COMMIT_POINTS: each
one is crashed at, by an exception and for some by SIGKILL of a real process, and the rerun
of the same command must give what an uninterrupted run gives. A new step joins the tuple,
or the test that checks every call names a listed point fails.

CLIP_PIPELINE_CRASH_AT=POINT[@N][:kill] crashes the N-th time (default: the first) this
process passes POINT: with InjectedCrash, or with SIGKILL when ``:kill`` follows.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CLIP_PIPELINE_CRASH_AT"

COMMIT_POINTS = (
    # prepare, first pass of a shard (pipeline.data.prepare.chunks.Progress.commit)
    "prepare.shard",  # the shard's Parquet file renamed into place
    "prepare.rejects",  # its rejects file renamed into place
    "prepare.marker",  # its marker written: the shard is finished
    # the end of the stage (pipeline.data.prepare.run.run_prepare, pipeline.rundir)
    "prepare.funnel",  # funnel.png written
    "prepare.stats",  # stats.json written
    "manifest",  # manifest.json rewritten (a stage marked done or forgotten)
    # --retry-failed rewriting a finished shard (Progress.rewrite and its recovery)
    "retry.files",  # the new pair written under temporary names
    "retry.journal_marker",  # the new marker written beside the journal
    "retry.journal",  # the journal written: from here the rewrite rolls forward
    "retry.rename",  # one file of the new pair renamed into place
    "retry.delete",  # an old file with no rows left removed
    "retry.marker",  # the new marker moved into place
    "retry.done",  # the journal removed
    # training and sweeps
    "checkpoint.save",  # a checkpoint file written, before Ray Train takes it
    "sweep.history",  # a trial's bookkeeping line appended to its history.jsonl
)


def worker_env() -> dict | None:
    """A runtime_env that carries a requested crash to Ray workers (None when none is)."""
    spec = os.environ.get(ENV)
    return {"env_vars": {ENV: spec}} if spec else None


class InjectedCrash(RuntimeError):
    """The crash a test asked for at a commit point."""


_hits: Counter[str] = Counter()


def reset() -> None:
    """Forget how often each point was passed (tests crash one process several times)."""
    _hits.clear()


def commit_point(name: str) -> None:
    """Crash here if CLIP_PIPELINE_CRASH_AT names this point (a no-op otherwise)."""
    if name not in COMMIT_POINTS:
        raise ValueError(f"{name!r} is not in pipeline.faults.COMMIT_POINTS")
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, how = spec.partition(":")
    point, _, nth = target.partition("@")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] != int(nth or 1):
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedCrash(f"crash injected at commit point {name!r} ({ENV}={spec})")
