"""Synchronous successive halving: rung decisions that depend on the set of trials, not their order.

ASHA judges a trial at a rung against the trials that reached it before, so with fewer slots
than trials the answer depends on the order the values were listed in. Here a trial that
reaches a rung is paused (Tune stops its actor; Ray Train keeps its checkpoint) until every
trial of the sweep has reached the rung or ended. Then the rung is judged as a set: the top
1/reduction_factor are kept, and so is any trial within the probe's standard error of the last
of them, since a gap smaller than the probe's own noise is not evidence. The kept trials resume
from their checkpoints (TorchTrainer restores from the trial's storage), the rest are stopped.

`judge` is the whole rule and a pure function; `SuccessiveHalving` is the Tune scheduler that
applies it, and `RungAwareVariants` / `RungAwareLimiter` keep the search algorithms' limit on
trials at once from counting the paused ones (else a sweep of one slot would wait forever on
its first paused trial).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import storage
from pipeline.faults import commit_point

PROBE_SIZE = "zeroshot_images"  # the images a trial's probe measured top-1 on (its binomial n)


def rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The steps a trial is judged at: grace_period * reduction_factor^k, below max_t."""
    out, r = [], grace_period
    while r < max_t:
        out.append(r)
        r *= reduction_factor
    return out


def probe_se(top1: float, probe_size: int) -> float:
    """The binomial standard error of a top-1 measured on `probe_size` images."""
    if probe_size <= 0:
        return 0.0
    return math.sqrt(max(top1 * (1 - top1), 0.0) / probe_size)


def judge(
    values: dict[str, float], reduction_factor: int, se_multiple: float, probe_size: int
) -> dict[str, dict[str, Any]]:
    """Each trial's decision at a rung from the rung's values alone (so no order enters).

    The cutoff is the value of the ceil(n / reduction_factor)-th best trial; a trial is kept
    when it is at least the cutoff minus se_multiple standard errors of the probe there.
    """
    if not values:
        return {}
    keep = max(1, math.ceil(len(values) / reduction_factor))
    cutoff = sorted(values.values(), reverse=True)[keep - 1]
    se = probe_se(cutoff, probe_size)
    bar = cutoff - se_multiple * se
    return {
        tid: {"value": v, "cutoff": cutoff, "se": se, "bar": bar, "promoted": v >= bar}
        for tid, v in values.items()
    }


def append_history(sweep_dir: str | Path | None, trial_dir: str, record: dict[str, Any]) -> None:
    """One line in RUN/sweep/<trial>/history.jsonl (see pipeline.tune.sweep.TrialHistory)."""
    if sweep_dir is None:
        return
    from pipeline.tune.report import HISTORY

    record = {**record, "at": round(time.time(), 3)}  # the driver's clock, to order trials' lines
    line = json.dumps(record, default=str).encode() + b"\n"
    if storage.is_uri(sweep_dir):
        # An object cannot be appended to: the driver, its only writer, rewrites it whole
        # (histories are a few KB), so a reader sees the old lines or the old plus the new.
        path = storage.join(sweep_dir, trial_dir, HISTORY)
        old = storage.read_bytes(path) if storage.exists(path) else b""
        storage.write_bytes(path, old + line)
        commit_point("sweep.history")
        return
    path = Path(sweep_dir) / trial_dir / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        # A driver killed mid-line leaves a torn tail: the next record starts a line of its
        # own, or it would be glued to the fragment and lost with it.
        torn = f.tell() > 0 and not _ends_with_newline(path)
        f.write((b"\n" if torn else b"") + line)
    commit_point("sweep.history")


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class SuccessiveHalving(FIFOScheduler):
    """Pause each trial at each rung until all have reached it, then keep the best by `judge`.

    expected_trials: how many trials the sweep has (a rung is judged once each has reached it
    or ended); concurrency: trials run at once (promoted trials are resumed up to it).
    """

    _supports_buffered_results = False  # every report is seen, so none passes a rung unseen

    def __init__(
        self,
        *,
        metric: str,
        max_t: int,
        grace_period: int,
        reduction_factor: int,
        se_multiple: float,
        expected_trials: int,
        concurrency: int,
        time_attr: str = "step",
        sweep_dir: str | None = None,
        trial_dirname=None,
    ):
        super().__init__()
        self._metric, self._mode = metric, "max"
        self.time_attr, self.max_t = time_attr, max_t
        self.rungs = rungs(grace_period, reduction_factor, max_t)
        self.reduction_factor, self.se_multiple = reduction_factor, se_multiple
        self.expected_trials, self.concurrency = expected_trials, concurrency
        self.sweep_dir, self.trial_dirname = sweep_dir, trial_dirname
        self.trials: dict[str, Trial] = {}
        self.records: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.decisions: dict[int, dict[str, dict[str, Any]]] = {}
        self.probe_size = 0
        self.ended: set[str] = set()
        # Paused and not yet resumed: the search algorithms' concurrency limit skips these.
        self.waiting: set[str] = set()
        self.to_resume: list[str] = []

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return mode in (None, "max") and metric in (None, self._metric)

    # -- bookkeeping ----------------------------------------------------------------------
    def _event(self, trial: Trial, record: dict[str, Any]) -> None:
        if self.trial_dirname is not None:
            append_history(self.sweep_dir, self.trial_dirname(trial), record)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.trials[trial.trial_id] = trial
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # restored, already over
            self.ended.add(trial.trial_id)
        self._read_history(trial)

    def _read_history(self, trial: Trial) -> None:
        """A resumed sweep: the rung values this trial reported and the rung decisions taken
        before the driver died (a judged rung is not judged again without its stopped trials)."""
        if self.sweep_dir is None or self.trial_dirname is None:
            return
        from pipeline.tune.report import HISTORY

        path = storage.join(self.sweep_dir, self.trial_dirname(trial), HISTORY)
        if not storage.exists(path):
            return
        for line in storage.read_text(path).splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = record.get("step")
            if (
                record.get("event") in ("promoted", "stopped")
                and record.get("rung") in self.records
            ):
                decision = {k: record.get(k) for k in ("value", "cutoff", "se", "bar")}
                decision["promoted"] = record["event"] == "promoted"
                self.decisions.setdefault(record["rung"], {})[trial.trial_id] = decision
                continue
            if "event" in record or record.get(self._metric) is None or step not in self.records:
                continue
            self.records[step].setdefault(trial.trial_id, float(record[self._metric]))
            self.probe_size = max(self.probe_size, int(record.get(PROBE_SIZE) or 0))

    def _end(self, tune_controller, trial: Trial) -> None:
        self.ended.add(trial.trial_id)
        self.waiting.discard(trial.trial_id)
        if trial.trial_id in self.to_resume:
            self.to_resume.remove(trial.trial_id)
        self._judge_ready(tune_controller, current=None)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial)

    # -- the rule ---------------------------------------------------------------------------
    def _ready(self, rung: int) -> bool:
        if rung in self.decisions or len(self.trials) < self.expected_trials:
            return False
        return all(t in self.records[rung] or t in self.ended for t in self.trials)

    def _judge_ready(self, tune_controller, current: Trial | None) -> None:
        """Judge every rung whose trials are all in; stop the losers that are paused."""
        for rung in self.rungs:
            if not self._ready(rung):
                continue
            values = {t: v for t, v in self.records[rung].items() if t not in self.ended}
            self.decisions[rung] = judge(
                values, self.reduction_factor, self.se_multiple, self.probe_size
            )
            # Resumed best first, then by id: the same whatever order the trials came in.
            ranked = sorted(self.decisions[rung].items(), key=lambda kv: (-kv[1]["value"], kv[0]))
            for tid, decision in ranked:
                trial = self.trials[tid]
                self._event(trial, {"event": "promoted" if decision["promoted"] else "stopped",
                                    "rung": rung, "step": rung, **decision})  # fmt: skip
                if trial is current:
                    continue  # its own decision is returned by on_trial_result
                if not decision["promoted"]:
                    self.waiting.discard(tid)
                    if trial.status == Trial.PAUSED:
                        tune_controller.stop_trial(trial)
                elif tid in self.waiting and tid not in self.to_resume:
                    self.to_resume.append(tid)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        step, value = result.get(self.time_attr), result.get(self._metric)
        tid = trial.trial_id
        if step is None:
            return TrialScheduler.CONTINUE
        if value is not None:
            self.probe_size = max(self.probe_size, int(result.get(PROBE_SIZE) or 0))
            passed = [r for r in self.rungs if r <= step]
            if passed and tid not in self.records[passed[-1]]:
                self.records[passed[-1]][tid] = float(value)
        self._judge_ready(tune_controller, current=trial)
        for rung in self.rungs:
            decision = self.decisions.get(rung, {}).get(tid)
            if decision is not None and not decision["promoted"]:
                return TrialScheduler.STOP
            if rung not in self.decisions and tid in self.records[rung] and step < self.max_t:
                self.waiting.add(tid)
                self._event(trial, {"event": "paused", "rung": rung, "step": step})
                return TrialScheduler.PAUSE
        self.waiting.discard(tid)
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A promoted trial to resume, while fewer than `concurrency` trials run.

        New trials (PENDING) are started by Tune itself as the search algorithm makes them;
        a paused trial runs again only when returned here.
        """
        busy = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in tune_controller.get_trials())
        while self.to_resume and busy < self.concurrency:
            trial = self.trials[self.to_resume.pop(0)]
            if trial.status != Trial.PAUSED:
                continue
            self.waiting.discard(trial.trial_id)
            self._event(trial, {"event": "resumed", "step": trial.last_result.get("step")})
            return trial
        return None

    def debug_string(self) -> str:
        judged = ", ".join(
            f"rung {r}: {sum(d['promoted'] for d in self.decisions[r].values())}/"
            f"{len(self.decisions[r])} kept"
            for r in self.rungs
            if r in self.decisions
        )
        return f"SuccessiveHalving: {len(self.waiting)} paused; {judged or 'no rung judged yet'}"


class RungAwareVariants(BasicVariantGenerator):
    """Tune's grid/random generator whose limit on live trials leaves the paused ones out."""

    def __init__(self, scheduler: SuccessiveHalving, **kwargs):
        super().__init__(**kwargs)
        self._halving = scheduler

    def next_trial(self):
        limit = self.max_concurrent
        if limit and len(self._live_trials - self._halving.waiting) >= limit:
            return None
        self.max_concurrent = 0
        try:
            return super().next_trial()
        finally:
            self.max_concurrent = limit

    def get_state(self):
        state = super().get_state()
        if state:
            state.pop("_halving", None)
        return state

    def set_state(self, state):
        halving = self._halving  # the restored scheduler, not a copy from the saved state
        super().set_state(state)
        self._halving = halving


class RungAwareLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter (for optuna) whose count leaves the paused trials out."""

    def __init__(self, searcher, max_concurrent: int, scheduler: SuccessiveHalving):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self._halving = scheduler

    def suggest(self, trial_id: str):
        if len(self.live_trials - self._halving.waiting) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, self.searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion

    def get_state(self):
        # Without the scheduler: the limiter deep-copies its state, trials and all.
        halving = self.__dict__.pop("_halving")
        try:
            return super().get_state()
        finally:
            self._halving = halving

    def set_state(self, state):
        halving = self._halving
        super().set_state(state)
        self._halving = halving


# -- a replay, without Ray: the scheduler over known curves ---------------------------------------
class _ReplayTrial:
    """What a scheduler reads of a Tune Trial, for a trial whose reports are known in advance."""

    def __init__(self, trial_id: str, reports: list[dict[str, Any]]):
        self.trial_id, self.reports = trial_id, reports
        self.status, self.last_result, self.next = Trial.PENDING, {}, 0


class _ReplayController:
    def __init__(self, scheduler: SuccessiveHalving):
        self.scheduler, self.trials = scheduler, []

    def get_trials(self) -> list[_ReplayTrial]:
        return self.trials

    def stop_trial(self, trial: _ReplayTrial) -> None:  # as Tune's, for a paused trial
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)


def replay(
    scheduler: SuccessiveHalving, trials: list[tuple[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Run `scheduler` over trials whose reports are known (deterministic trials: a grid's).

    Trials start in the given order, at most `scheduler.concurrency` at a time (new ones while
    fewer unpaused trials are live, as RungAwareVariants allows), the running trial with the
    fewest steps reports next. Returns the steps spent (each trial's last reported step), each
    trial's last step, the ones that ran to the end, and the rung decisions.
    """
    controller, queue = _ReplayController(scheduler), list(trials)
    while True:
        live = [t for t in controller.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        while (
            queue and sum(t.trial_id not in scheduler.waiting for t in live) < scheduler.concurrency
        ):
            trial = _ReplayTrial(*queue.pop(0))
            controller.trials.append(trial)
            scheduler.on_trial_add(controller, trial)
            trial.status = Trial.RUNNING
            live.append(trial)
        while (chosen := scheduler.choose_trial_to_run(controller)) is not None:
            chosen.status = Trial.RUNNING
        running = [t for t in controller.trials if t.status == Trial.RUNNING]
        if not running:
            break
        trial = min(running, key=lambda t: t.last_result.get(scheduler.time_attr, 0))
        result = trial.reports[trial.next]
        trial.next += 1
        trial.last_result = result
        decision = scheduler.on_trial_result(controller, trial, result)
        if decision == TrialScheduler.PAUSE:
            trial.status = Trial.PAUSED
        elif decision == TrialScheduler.STOP or trial.next == len(trial.reports):
            trial.status = Trial.TERMINATED
            scheduler.on_trial_complete(controller, trial, result)
    steps = {t.trial_id: t.last_result.get(scheduler.time_attr, 0) for t in controller.trials}
    return {
        "steps": sum(steps.values()),
        "trial_steps": steps,
        "finished": [t for t, s in steps.items() if s >= scheduler.max_t],
        "decisions": scheduler.decisions,
    }
