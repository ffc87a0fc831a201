"""Workers writing their own shards give what the driver-side implementation gave.

data/prepare_golden.json was captured from the previous implementation (rows streamed to the
driver in input order, checked and written there) on the demo corpus and on the hostile list:
each row's fate (sample, or reject with stage and reason, by URL with the server's address
taken out) and stats.json without timings. The same inputs through today's prepare must give
exactly that: the same keys in shards, the same reasons, the same funnel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data.prepare import run_prepare
from pipeline.data.prepare.run import plan
from pipeline.rundir import RunDir
from tests.integration import test_hostile_prepare as hostile
from tests.integration.test_hostile_prepare import servers  # noqa: F401
from tests.integration.test_prepare_ray import prepare_config, served  # noqa: F401

pytestmark = pytest.mark.integration

GOLDEN = json.loads((Path(__file__).parent / "data" / "prepare_golden.json").read_text())


def outcome(run: RunDir, strip) -> dict:
    rows: dict[str, list] = {}
    for kind, folder in (("sample", run.shards), ("reject", run.rejects)):
        for f in sorted(Path(folder).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                fate = [kind, r.get("stage"), r.get("reason"), r["caption"]]
                rows.setdefault(strip(r["url"]), []).append(fate)
    stats = json.loads(Path(run.stats_path).read_text())
    for s in stats["stages"].values():
        s.pop("seconds")
    skip = ("wall_seconds", "images_per_second", "rows_this_run", "paths")
    return {"rows": rows, "stats": {k: v for k, v in stats.items() if k not in skip}}


def _same(got: dict, want: dict) -> None:
    assert got["stats"] == want["stats"]
    assert set(got["rows"]) == set(want["rows"])
    for url, fates in want["rows"].items():
        assert sorted(got["rows"][url]) == sorted(fates), url


def test_demo_corpus_as_before(ray_local, served, tmp_path):  # noqa: F811
    _, _, urls_path, _ = served
    base = pq.read_table(urls_path)["url"][0].as_py()
    base = base[: base.index("/", len("http://"))]
    run = RunDir.at(tmp_path / "run")
    # The planned list: each shard task reads its own rows of the file.
    run_prepare(plan(str(urls_path), prepare_config()), run, prepare_config())
    _same(outcome(run, lambda u: (u or "").replace(base, "BASE")), GOLDEN["demo"])


def test_hostile_list_as_before(ray_local, servers, tmp_path):  # noqa: F811
    main, tripwire = servers
    base = f"http://127.0.0.1:{main.server_address[1]}"
    tport = str(tripwire.server_address[1])
    hostile._write_csv(tmp_path / "urls.csv", hostile._cases(base, int(tport)))
    run = RunDir.at(tmp_path / "run")
    run_prepare(str(tmp_path / "urls.csv"), run, hostile.CFG)
    strip = lambda u: (u or "").replace(base, "BASE").replace(tport, "TPORT")  # noqa: E731
    _same(outcome(run, strip), GOLDEN["hostile"])
    assert tripwire.connections == 0
