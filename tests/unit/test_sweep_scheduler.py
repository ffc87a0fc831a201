"""Synchronous successive halving: its rule, its order independence, its record (no Ray cluster).

The scheduler is driven by `replay`, which plays Tune's part over trials whose reports are
known in advance (as deterministic trials' are), one or more at a time in a given order.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from pipeline.tune.report import format_leaderboard, read_sweep, write_report
from pipeline.tune.scheduler import SuccessiveHalving, judge, probe_se, replay, rungs
from tests.unit.test_sweep_report import sweep_dir, write_trial  # noqa: F401

# A deterministic tiny space: 2 temperatures x 3 batch sizes, top-1 at steps 2..8 on 64 images.
CURVES = {
    (0.03, 32): [0.30, 0.42, 0.50, 0.55],
    (0.03, 64): [0.28, 0.45, 0.52, 0.61],  # behind at step 2, the best at the end
    (0.03, 128): [0.17, 0.20, 0.30, 0.35],  # 3 points under rung 2's cutoff: within its error
    (0.5, 32): [0.20, 0.25, 0.28, 0.30],
    (0.5, 64): [0.10, 0.14, 0.20, 0.22],
    (0.5, 128): [0.05, 0.06, 0.08, 0.10],
}
PROBE = 64


def reports(curve):
    return [
        {"step": 2 * (i + 1), "zeroshot_top1": v, "zeroshot_images": PROBE}
        for i, v in enumerate(curve)
    ]


def halving(concurrency=1, se_multiple=1.0, **kw):
    return SuccessiveHalving(
        metric="zeroshot_top1", max_t=8, grace_period=2, reduction_factor=2,
        se_multiple=se_multiple, expected_trials=len(CURVES), concurrency=concurrency, **kw,
    )  # fmt: skip


def outcome(result):
    """What a sweep decided: each rung's promotions, the finishers, the steps spent."""
    promotions = {
        r: sorted(t for t, d in decisions.items() if d["promoted"])
        for r, decisions in result["decisions"].items()
    }
    return promotions, sorted(result["finished"]), result["steps"]


def test_rungs_and_the_probe_error():
    assert rungs(30, 3, 150) == [30, 90]
    assert rungs(2, 2, 8) == [2, 4]
    assert rungs(250, 3, 750) == [250]
    assert probe_se(0.2, 1024) == pytest.approx(math.sqrt(0.2 * 0.8 / 1024))
    assert probe_se(0.5, 0) == 0.0


def test_judge_keeps_the_top_share_and_whoever_is_within_the_probe_error():
    values = {"a": 0.30, "b": 0.28, "c": 0.25, "d": 0.10, "e": 0.20, "f": 0.05}
    # Top third of 6 = 2: cutoff 0.28; its standard error on 64 images is 5.6 points.
    decisions = judge(values, reduction_factor=3, se_multiple=1.0, probe_size=64)
    se = math.sqrt(0.28 * 0.72 / 64)
    assert decisions["c"]["bar"] == pytest.approx(0.28 - se)
    assert {t for t, d in decisions.items() if d["promoted"]} == {"a", "b", "c"}
    assert decisions["d"] == {
        "value": 0.10, "cutoff": 0.28, "se": pytest.approx(se), "bar": pytest.approx(0.28 - se),
        "promoted": False,
    }  # fmt: skip
    # Without the margin: the plain top third.
    plain = judge(values, reduction_factor=3, se_multiple=0.0, probe_size=64)
    assert {t for t, d in plain.items() if d["promoted"]} == {"a", "b"}
    # The same set in any order of insertion: the same decisions.
    for order in itertools.permutations(values):
        assert judge({t: values[t] for t in order}, 3, 1.0, 64) == decisions


@pytest.mark.parametrize("concurrency", [1, 2])
def test_every_order_of_the_lists_gives_the_same_promotions(concurrency):
    temperatures, batches = (0.03, 0.5), (32, 64, 128)
    outcomes = []
    for temps, bs in itertools.product(
        itertools.permutations(temperatures), itertools.permutations(batches)
    ):
        order = [(f"{t}/{b}", reports(CURVES[(t, b)])) for t in temps for b in bs]
        outcomes.append(outcome(replay(halving(concurrency), order)))
    assert len(outcomes) == 12
    assert all(o == outcomes[0] for o in outcomes), outcomes
    promotions, finished, steps = outcomes[0]
    # Rung 2 keeps the top half (cutoff 0.20) and 0.03/128, 3 points behind on a probe whose
    # error there is 5 points; rung 4 keeps the top half of those 4 (0.5/32 and 0.03/128 are
    # 17 and 22 points behind).
    assert promotions == {
        2: ["0.03/128", "0.03/32", "0.03/64", "0.5/32"],
        4: ["0.03/32", "0.03/64"],
    }
    assert finished == ["0.03/32", "0.03/64"]  # the grid's best (0.03/64) among them
    assert steps == 6 * 2 + 4 * 2 + 2 * 4


def test_no_trial_passes_a_rung_before_every_trial_has_reached_it():
    order = [(f"{t}/{b}", reports(c)) for (t, b), c in CURVES.items()]
    seen = []
    scheduler = halving()
    judged = scheduler.on_trial_result

    def watch(controller, trial, result):
        seen.append((trial.trial_id, result["step"]))
        return judged(controller, trial, result)

    scheduler.on_trial_result = watch
    replay(scheduler, order)
    first_past = {r: min(i for i, (_, s) in enumerate(seen) if s > r) for r in scheduler.rungs}
    for rung, index in first_past.items():
        at_rung = [i for i, (_, s) in enumerate(seen) if s == rung]
        assert len(at_rung) >= 2 and max(at_rung) < index


def dirname(trial):
    return trial.trial_id.replace("/", "_")


def test_a_resumed_sweep_reads_rung_values_and_decisions_from_the_histories(tmp_path):
    # The first run: the driver writes each trial's reports (as TrialHistory) and the
    # scheduler its events into the same files.
    order = [(f"{t}/{b}", reports(c)) for (t, b), c in CURVES.items()]
    first = halving(sweep_dir=str(tmp_path), trial_dirname=dirname)
    for trial_id, rows in order:
        (tmp_path / trial_id.replace("/", "_")).mkdir()
        with (tmp_path / trial_id.replace("/", "_") / "history.jsonl").open("w") as f:
            for row in rows[:2]:  # the reports up to rung 4, as far as the first run went
                f.write(json.dumps(row) + "\n")
    done = replay(first, order)
    # A new scheduler (a restored Tuner's) sees the same trials added back: it knows rung 2's
    # decisions and does not judge rung 2 again without the trials it stopped there.
    second = halving(sweep_dir=str(tmp_path), trial_dirname=dirname)

    class Restored:
        def __init__(self, trial_id, status):
            self.trial_id, self.status, self.last_result = trial_id, status, {}

    for trial_id, _ in order:
        ended = trial_id not in done["decisions"][4] or trial_id in done["finished"]
        second.on_trial_add(None, Restored(trial_id, "TERMINATED" if ended else "PENDING"))
    assert {t: d["promoted"] for t, d in second.decisions[2].items()} == {
        t: d["promoted"] for t, d in done["decisions"][2].items()
    }
    assert second.records[2] == first.records[2] and second.probe_size == PROBE


def test_report_shows_pauses_and_each_stopped_trials_bar(sweep_dir):  # noqa: F811
    d = write_trial(sweep_dir, "h_00000", {"temperature": 0.3, "learn_temperature": False,
                    "batch_size": 64, "lr": 1e-3, "seed": 0}, [0.12], "complete")  # fmt: skip
    with (d / "history.jsonl").open("a") as f:
        for event in (
            {"event": "paused", "rung": 2, "step": 2},
            {"event": "stopped", "rung": 2, "step": 2, "value": 0.12, "cutoff": 0.3,
             "se": 0.05, "bar": 0.25, "promoted": False},
        ):  # fmt: skip
            f.write(json.dumps(event) + "\n")
    waiting = write_trial(sweep_dir, "h_00001", {"temperature": 0.3, "learn_temperature": False,
                          "batch_size": 128, "lr": 1e-3, "seed": 0}, [0.4], None)  # fmt: skip
    with (waiting / "history.jsonl").open("a") as f:
        f.write(json.dumps({"event": "paused", "rung": 2, "step": 2}) + "\n")
    _, trials = read_sweep(sweep_dir)
    by_id = {t["trial_id"]: t for t in trials}
    assert by_id["h_00000"]["status"] == "stopped"
    assert by_id["h_00000"]["stopped_at"] == {
        "rung": 2, "value": 0.12, "cutoff": 0.3, "se": 0.05, "bar": 0.25,
    }  # fmt: skip
    assert by_id["h_00001"]["status"] == "paused"
    text = format_leaderboard(trials)
    assert "1 paused at a rung" in text.splitlines()[0]
    assert "@2: 12.0% < 25.0%" in text
    write_report(sweep_dir)
    page = (sweep_dir / "report.html").read_text()
    assert "<h2>Rung decisions</h2>" in page
    row = "<td>h_00000</td><td>2</td><td>12.0%</td><td>30.0%</td><td>5.0%</td><td>25.0%</td>"
    assert row + "<td>stopped</td>" in page
