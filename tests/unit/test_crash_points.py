"""Crash anywhere, rerun, same result: every commit point of pipeline.faults is crashed at.

The shard commits and the --retry-failed journal run here without Ray, through the real
Progress (real Parquet files, renames and markers), driven the way run_prepare drives it:
by an exception in this process for every point, and by SIGKILL of a real process for the
retry journal's steps. The points at the end of the stage, of checkpointing and of the
sweep's bookkeeping run in tests/integration/test_crash_points_ray.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import faults, schema
from pipeline.data.prepare.chunks import Progress
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
ROWS = 4  # per shard
# Where each point is crashed at. A new commit point without a scenario fails
# test_every_commit_point_has_a_crash_test.
HERE = {
    "prepare.shard": "first",
    "prepare.rejects": "first",
    "prepare.marker": "first",
    "retry.files": "retry",
    "retry.journal_marker": "retry",
    "retry.journal": "retry",
    "retry.rename": "retry",
    "retry.delete": "retry",
    "retry.marker": "retry",
    "retry.done": "retry",
    "sweep.history": "test_crash_in_trial_bookkeeping_keeps_whole_records",
}
ELSEWHERE = {  # tests/integration/test_crash_points_ray.py
    "prepare.funnel": "test_crash_at_the_end_of_prepare_then_rerun",
    "prepare.stats": "test_crash_at_the_end_of_prepare_then_rerun",
    "manifest": "test_crash_at_the_end_of_prepare_then_rerun",
    "checkpoint.save": "test_crash_at_checkpoint_save_then_rerun",
}


pytestmark = pytest.mark.usefixtures("no_injected_crash")


def _row(c: int, i: int, fate: str) -> dict:
    url = f"http://example.com/{c}/{i}.jpg"
    row = {"key": schema.url_key(url), "url": url, "caption": f"thing {c}.{i}"}
    if fate == "sample":
        size = {k: 8 for k in ("width", "height", "original_width", "original_height")}
        return {**row, **size, "jpg": bytes([c, i]), "sha256": f"{c}-{i}", "tokens": [1, i]}
    return {**row, "stage": "download", "reason": fate, "error": fate}


# Shard 0: a permanent and a transient failure; shard 1: one transient; shard 2: all transient
# (no shards file on the first pass, no rejects file after the retry: the journal's delete).
FIRST_PASS = {
    0: ["sample", "http_404", "sample", "http_503"],
    1: ["sample", "sample", "timeout", "sample"],
    2: ["http_503", "http_503", "http_503", "http_503"],
}


def drive(root: str, retry: bool) -> None:
    """What run_prepare does with the shards: commit those not finished; on --retry-failed
    rewrite each finished shard whose transient failures now succeed."""
    progress = Progress(RunDir.at(root), "fingerprint")
    done = progress.done()
    for c, fates in FIRST_PASS.items():
        if c not in done:
            rows = [_row(c, i, f) for i, f in enumerate(fates)]
            samples = [r for r in rows if "jpg" in r]
            rejects = [r for r in rows if "jpg" not in r]
            progress.commit(c, samples, rejects, ROWS, {}, schema.SAMPLE, schema.REJECT)
    if not retry:
        return
    for c in sorted(progress.done()):
        files = [
            Path(folder) / f"part-{c:05d}.parquet" for folder in (progress.shards, progress.rejects)
        ]
        samples, rejects = (pq.read_table(f).to_pylist() if f.exists() else [] for f in files)
        again = [r for r in rejects if r["reason"] in ("http_503", "timeout")]
        if again:
            kept = [r for r in rejects if r not in again]
            fixed = [_row(c, int(r["url"].rsplit("/", 1)[1][:-4]), "sample") for r in again]
            samples = sorted(samples + fixed, key=lambda r: r["url"])
            progress.rewrite(c, samples, kept, ROWS, {}, schema.SAMPLE, schema.REJECT)


def state(root: Path) -> tuple[Counter, list[str]]:
    """Every row written, with its fate, counted; and every file name under data/."""
    rows: Counter = Counter()
    for folder in ("shards", "rejects"):
        for f in sorted((root / "data" / folder).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows[(r["url"], r.get("reason") or "sample", r["caption"])] += 1
    names = sorted(str(p.relative_to(root)) for p in (root / "data").rglob("*") if p.is_file())
    return rows, names


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("reference")
    drive(str(root / "first"), retry=False)
    drive(str(root / "retry"), retry=False)
    drive(str(root / "retry"), retry=True)
    return {"first": state(root / "first"), "retry": state(root / "retry")}


def test_every_commit_point_has_a_crash_test():
    assert set(HERE) | set(ELSEWHERE) == set(faults.COMMIT_POINTS)
    assert not set(HERE) & set(ELSEWHERE)


def test_every_listed_point_is_passed_somewhere():
    """Each name appears in a module that calls commit_point (an unlisted name raises)."""
    named = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        text = path.read_text()
        if path.name != "faults.py" and "commit_point(" in text:
            named |= set(re.findall(r'"([a-z_]+(?:\.[a-z_]+)?)"', text))
    assert set(faults.COMMIT_POINTS) <= named


def test_an_unlisted_point_is_refused():
    with pytest.raises(ValueError, match="COMMIT_POINTS"):
        faults.commit_point("prepare.somewhere_new")


# Each point crashed at its first and (where a run passes it twice) second passage.
SHARD_POINTS = [p for p in HERE if HERE[p] in ("first", "retry")]
CASES = [(p, n) for p in SHARD_POINTS for n in (1, 2) if not (p == "retry.delete" and n == 2)]


@pytest.mark.parametrize(("point", "nth"), CASES, ids=[f"{p}@{n}" for p, n in CASES])
def test_exception_at_each_commit_point_then_rerun(point, nth, tmp_path, monkeypatch, reference):
    retry = HERE[point] == "retry"
    root = tmp_path / "run"
    if retry:
        drive(str(root), retry=False)
    monkeypatch.setenv(faults.ENV, f"{point}@{nth}")
    with pytest.raises(faults.InjectedCrash):
        drive(str(root), retry=retry)
    monkeypatch.delenv(faults.ENV)
    drive(str(root), retry=retry)  # the same command again
    assert state(root) == reference[HERE[point]]
    if retry:  # and a further retry has nothing left to do
        drive(str(root), retry=True)
        assert state(root) == reference["retry"]


@pytest.mark.parametrize("point", SHARD_POINTS)
def test_sigkill_at_commit_points_then_rerun(point, tmp_path, reference):
    """A real process killed with SIGKILL: no exception handler, no finally, no flush runs."""
    retry = HERE[point] == "retry"
    root = tmp_path / "run"
    if retry:
        drive(str(root), retry=False)
    script = f"from tests.unit.test_crash_points import drive; drive({str(root)!r}, {retry})"
    env = {**os.environ, faults.ENV: f"{point}:kill"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=False)
    assert killed.returncode == -9
    drive(str(root), retry=retry)
    assert state(root) == reference[HERE[point]]


def test_crash_in_trial_bookkeeping_keeps_whole_records(tmp_path, monkeypatch):
    """The sweep driver's history.jsonl: a crash after a record leaves whole lines, and a
    record appended after a driver killed mid-line is not glued to the torn fragment."""
    import dataclasses
    from types import SimpleNamespace

    from pipeline.config import get_preset
    from pipeline.tune.report import HISTORY, read_trial
    from pipeline.tune.sweep import TrialHistory, trial_dirname

    params = {"global_batch_size": 32, "init_temperature": 0.07, "learn_temperature": True,
              "seed": 0, "lr": 1e-3}  # fmt: skip
    trial = SimpleNamespace(trial_id="t1", config=params)  # what the callback reads of a Trial
    history = TrialHistory(str(tmp_path), dataclasses.asdict(get_preset("tiny").sweep))
    path = tmp_path / trial_dirname(trial) / HISTORY
    monkeypatch.setenv(faults.ENV, "sweep.history@2")
    history.on_trial_start(0, [], trial)
    with pytest.raises(faults.InjectedCrash):
        history.on_trial_result(0, [], trial, {"step": 2, "zeroshot_top1": 0.5})
    monkeypatch.delenv(faults.ENV)
    assert [line[-1:] for line in path.read_text().split("\n")[:-1]] == ["}", "}"]
    with path.open("a") as f:  # what a driver killed inside write() leaves
        f.write('{"step": 4, "zeroshot_to')
    history.on_trial_result(0, [], trial, {"step": 4, "zeroshot_top1": 0.75})  # the resume
    history.on_trial_complete(0, [], trial)
    trial_record = read_trial(path, max_steps=4)
    assert trial_record["steps"] == 4 and trial_record["final_top1"] == 0.75
    assert trial_record["best_top1"] == 0.75 and trial_record["status"] == "completed"


def test_sigkill_at_a_manifest_update_then_rerun(tmp_path):
    """Killed right after the first of two stages was marked done: the manifest is whole and
    holds that stage; the same command again marks both."""
    root = tmp_path / "run"
    script = (
        f"from pipeline.rundir import RunDir; run = RunDir.at({str(root)!r}); "
        "[run.mark_done(s, 'h-' + s, samples=1) for s in ('prepare', 'train')]"
    )
    env = {**os.environ, faults.ENV: "manifest@1:kill"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=False)
    assert killed.returncode == -9
    run = RunDir.at(root)
    assert set(run.manifest()["stages"]) == {"prepare"}  # parsed: never half written
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
    stages = run.manifest()["stages"]
    assert {k: v["config_hash"] for k, v in stages.items()} == {"prepare": "h-prepare",
                                                                  "train": "h-train"}  # fmt: skip
