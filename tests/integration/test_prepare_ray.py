"""pipeline.data.prepare on a local Ray against the demo corpus served on 127.0.0.1.

The corpus knows what each row is (url_paths.parquet: kind, label; corpus.json: bad_counts),
so every output row is checked against that ground truth, not against the pipeline itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import pretrain, schema
from pipeline.config import DemoConfig, DownloadConfig, PipelineConfig, PrepareConfig
from pipeline.data.prepare import read_url_list, run_prepare
from pipeline.demo import build_demo_corpus, serve_demo, write_url_list
from pipeline.demo import server as demo_server
from pipeline.rundir import RunDir, StageConfigMismatch
from pipeline.spec import spec_of
from pipeline.train.modeling import resolve_model_name

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.1/32",)
ROWS_PER_SHARD = 64  # ~280 samples: five shards, the last one partial
# Each bad kind of the demo corpus, and the (stage, reason) the pipeline must give it.
EXPECTED = {
    "missing": ("download", "http_404"),
    "server_error": ("download", "http_500"),
    "not_image": ("download", "not_an_image"),
    "truncated": ("download", "truncated_image"),
    "too_small": ("filter", "too_small"),
    "duplicate_url": ("input", "duplicate_url"),
    "duplicate_image": ("filter", "duplicate_image"),
}


def prepare_config(allowed_networks=LOOPBACK, **changes) -> PrepareConfig:
    # Small batches and shards: several tasks finishing in any order, so order really matters.
    download = DownloadConfig(allowed_networks=allowed_networks, batch_size=32, thread_count=8)
    return PrepareConfig(**{"rows_per_shard": ROWS_PER_SHARD, "download": download, **changes})


def read_rows(folder: str | Path) -> list[dict]:
    return [r for f in sorted(Path(folder).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


class _Requests:
    """Counts the GET requests the demo server answers (it runs in this process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.paths: list[str] = []

    def reset(self) -> None:
        with self.lock:
            self.paths.clear()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo corpus, served for the whole module: (demo_dir, corpus, urls_path, requests)."""
    demo_dir = tmp_path_factory.mktemp("demo")
    corpus = build_demo_corpus(
        demo_dir, DemoConfig(num_train=300, eval_images_per_class=1, num_retrieval=8)
    )
    requests = _Requests()
    original = demo_server._Handler.do_GET

    def counting_do_get(handler):
        with requests.lock:
            requests.paths.append(handler.path)
        original(handler)

    demo_server._Handler.do_GET = counting_do_get
    try:
        with serve_demo(demo_dir / "www") as base_url:
            yield demo_dir, corpus, write_url_list(demo_dir, base_url), requests
    finally:
        demo_server._Handler.do_GET = original


@pytest.fixture(scope="module")
def truth(served):
    """The input rows with their ground truth: url, caption, kind, label, path."""
    demo_dir, _, urls_path, _ = served
    urls = pq.read_table(urls_path).to_pylist()
    meta = pq.read_table(demo_dir / "url_paths.parquet").to_pylist()
    assert len(urls) == len(meta)
    for u, m in zip(urls, meta, strict=True):
        assert u["url"].endswith(m["path"]) and u["caption"] == m["caption"]
        u.update(kind=m["kind"], label=m["label"], path=m["path"])
    return urls


@pytest.fixture(scope="module")
def prepared(ray_local, served, tmp_path_factory):
    _, _, urls_path, requests = served
    requests.reset()
    run = RunDir.at(tmp_path_factory.mktemp("run"))
    cfg = prepare_config()
    stats = run_prepare(read_url_list(str(urls_path)), run, cfg)
    shard_files = sorted(Path(run.shards).glob("*.parquet"))
    reject_files = sorted(Path(run.rejects).glob("*.parquet"))
    return {
        "run": run,
        "cfg": cfg,
        "stats": stats,
        "shard_files": shard_files,
        "reject_files": reject_files,
        "samples": read_rows(run.shards),
        "rejects": read_rows(run.rejects),
        "requests": list(requests.paths),
    }


def test_every_row_ends_in_exactly_one_place(truth, prepared):
    samples, rejects = prepared["samples"], prepared["rejects"]
    assert len(samples) + len(rejects) == len(truth)
    pairs_in = Counter((r["url"], r["caption"]) for r in truth)
    pairs_out = Counter((r["url"], r["caption"]) for r in samples + rejects)
    assert pairs_out == pairs_in
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys)
    for r in samples + rejects:
        assert r["key"] == schema.url_key(r["url"])


def test_good_rows_are_the_samples_in_input_order(served, truth, prepared):
    _, corpus, _, _ = served
    good = [(r["url"], r["caption"]) for r in truth if r["kind"] == "good"]
    assert len(good) == corpus["num_good"]
    # First occurrence wins deterministically: shards keep the input order.
    assert [(s["url"], s["caption"]) for s in prepared["samples"]] == good


def test_each_bad_kind_is_rejected_with_its_reason(served, truth, prepared):
    _, corpus, _, _ = served
    expected = Counter(
        (r["url"], r["caption"], *EXPECTED[r["kind"]]) for r in truth if r["kind"] != "good"
    )
    got = Counter((r["url"], r["caption"], r["stage"], r["reason"]) for r in prepared["rejects"])
    assert got == expected
    by_reason = Counter(r["reason"] for r in prepared["rejects"])
    assert by_reason == {EXPECTED[k][1]: n for k, n in corpus["bad_counts"].items()}
    for r in prepared["rejects"]:
        assert r["error"], r  # every drop says why
    # Duplicates are rejected, and the original they repeat is the one kept.
    demo_dir = served[0]
    path_of = {r["url"]: r["path"] for r in truth}
    sample_urls = {s["url"] for s in prepared["samples"]}
    sample_hashes = {s["sha256"] for s in prepared["samples"]}
    for r in prepared["rejects"]:
        if r["reason"] == "duplicate_url":
            assert r["url"] in sample_urls
        elif r["reason"] == "duplicate_image":
            data = (demo_dir / "www" / path_of[r["url"]].lstrip("/")).read_bytes()
            assert hashlib.sha256(data).hexdigest() in sample_hashes


def test_stats_match_the_parquet_contents(prepared):
    stats, run = prepared["stats"], prepared["run"]
    assert json.loads(Path(run.stats_path).read_text()) == stats
    samples, rejects = prepared["samples"], prepared["rejects"]
    assert stats["rows_in"] == len(samples) + len(rejects)
    assert stats["samples"] == len(samples)
    assert stats["rejects"] == len(rejects)
    assert stats["shards"] == len(prepared["shard_files"])
    alive = stats["rows_in"]
    for stage in ("input", "download", "filter", "tokenize"):
        s = stats["stages"][stage]
        drops = Counter(r["reason"] for r in rejects if r["stage"] == stage)
        assert s["drops"] == dict(drops), stage
        assert s["rows_in"] == alive
        assert s["rows_out"] == alive - sum(drops.values())
        alive = s["rows_out"]
    assert alive == len(samples)
    assert stats["stages"]["download"]["seconds"] > 0


def test_shards_layout_and_schema(truth, prepared):
    # Shard N holds the survivors of input rows [N*k, (N+1)*k): the unit of resume.
    files, run = prepared["shard_files"], prepared["run"]
    position = {}
    for i, r in enumerate(truth):
        position.setdefault(r["url"], i)
    n_chunks = math.ceil(len(truth) / ROWS_PER_SHARD)
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(n_chunks)]
    for i, f in enumerate(files):
        rows = pq.read_table(f, columns=["url"]).to_pylist()
        assert 0 < len(rows) <= ROWS_PER_SHARD
        assert {position[r["url"]] // ROWS_PER_SHARD for r in rows} == {i}, f
    for f in files:
        assert pq.read_schema(f).equals(schema.SAMPLE), f
    for f in prepared["reject_files"]:
        assert pq.read_schema(f).equals(schema.REJECT), f
    # Nothing but the finished shards, and one marker per shard: no temp files left behind.
    assert sorted(p.name for p in Path(run.shards).iterdir()) == [f.name for f in files]
    markers = sorted(p.name for p in (Path(run.root) / "data" / "progress").glob("part-*"))
    assert markers == [f"part-{i:05d}.json" for i in range(n_chunks)]
    assert (Path(run.root) / "data" / "funnel.png").stat().st_size > 10_000
    assert prepared["stats"]["paths"]["funnel_png"] == str(Path(run.root) / "data" / "funnel.png")


def test_images_are_resized_and_describe_the_served_file(served, truth, prepared):
    demo_dir = served[0]
    size = prepared["cfg"].download.image_size
    path_of = {r["url"]: r["path"] for r in truth}
    for s in prepared["samples"]:
        served_bytes = (demo_dir / "www" / path_of[s["url"]].lstrip("/")).read_bytes()
        with Image.open(io.BytesIO(served_bytes)) as original:
            assert (s["original_width"], s["original_height"]) == original.size
        assert s["sha256"] == hashlib.sha256(served_bytes).hexdigest()
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG"
            im.load()  # decodes fully
            assert im.size == (size, size) == (s["width"], s["height"])


def test_tokens_equal_open_clip(prepared):
    tokenizer = open_clip.get_tokenizer(resolve_model_name(prepared["cfg"].tokenize.model))
    samples = prepared["samples"]
    expected = tokenizer([s["caption"] for s in samples]).numpy()
    got = np.array([s["tokens"] for s in samples])
    np.testing.assert_array_equal(got, expected)


def test_server_saw_one_request_per_distinct_url(truth, prepared):
    # duplicate_url rows are dropped before download; only transient failures (500s) retry.
    retries = prepared["cfg"].download.retries
    assert retries >= 1
    paths = Counter(prepared["requests"])
    assert set(paths) == {r["path"] for r in truth}
    for path, n in paths.items():
        assert n == (1 + retries if path.startswith("/status/500/") else 1), path


@pytest.fixture(scope="module")
def refused(ray_local, served, tmp_path_factory):
    """Pipeline.prepare on the whole list with no network allowed: (cfg, run, stats, requests)."""
    _, _, urls_path, requests = served
    requests.reset()
    cfg = dataclasses.replace(PipelineConfig(), prepare=prepare_config(allowed_networks=()))
    run = RunDir.at(tmp_path_factory.mktemp("refused"))
    spec = spec_of(cfg, run.root, ("prepare",), url_list=str(urls_path))
    stats = pretrain.prepare(spec, run, log=lambda *_: None)
    return {"cfg": cfg, "run": run, "stats": stats, "requests": list(requests.paths)}


def test_without_allowed_networks_nothing_is_fetched(truth, refused):
    run, stats = refused["run"], refused["stats"]
    assert refused["requests"] == []
    rejects = read_rows(run.rejects)
    assert len(rejects) == len(truth)
    assert list(Path(run.shards).glob("*.parquet")) == []
    assert stats["samples"] == 0 and stats["shards"] == 0
    n_dup = sum(r["kind"] == "duplicate_url" for r in truth)
    reasons = Counter((r["stage"], r["reason"]) for r in rejects)
    assert reasons == {
        ("input", "duplicate_url"): n_dup,
        ("download", "refused_address"): len(truth) - n_dup,
    }
    assert all("127.0.0.1" in r["error"] for r in rejects if r["reason"] == "refused_address")
    assert stats["stages"]["download"]["drops"] == {"refused_address": len(truth) - n_dup}
    assert stats["stages"]["filter"]["rows_in"] == 0


def test_pipeline_prepare_skips_when_done_and_refuses_another_config(served, refused, monkeypatch):
    urls_path, cfg, run, stats = served[2], refused["cfg"], refused["run"], refused["stats"]
    entry = run.stage("prepare")
    assert (entry["samples"], entry["rejects"]) == (stats["samples"], stats["rejects"])
    assert json.loads(Path(run.stats_path).read_text()) == stats
    outputs = sorted(Path(run.rejects).glob("*.parquet"))
    assert outputs
    mtimes = {f: f.stat().st_mtime_ns for f in outputs}
    log: list[str] = []

    def prepare(config: PipelineConfig, url_list=urls_path):
        spec = spec_of(config, run.root, ("prepare",), url_list=str(url_list))
        return pretrain.prepare(spec, run, log=log.append)

    # Rerun: nothing is prepared again, the stats come back from disk.
    def must_not_run(*args, **kwargs):
        raise AssertionError("prepare ran again")

    monkeypatch.setattr("pipeline.data.prepare.run_prepare", must_not_run)
    assert prepare(cfg) == stats
    assert any("[prepare] already finished" in line for line in log)
    # Another stage's config is not part of prepare's fingerprint.
    other_train = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=99))
    assert prepare(other_train) == stats

    # Another prepare config (here: a nested field) is refused, and nothing written is touched.
    changed = dataclasses.replace(
        cfg,
        prepare=dataclasses.replace(
            cfg.prepare, filters=dataclasses.replace(cfg.prepare.filters, min_caption_words=3)
        ),
    )
    with pytest.raises(StageConfigMismatch, match="'prepare'") as refused_change:
        prepare(changed)
    # The refusal names the field that changed, with its old and new value.
    assert "filters.min_caption_words: 2 -> 3" in str(refused_change.value)
    # The same content under another name is the same input: skipped again.
    other_list = Path(urls_path).with_name("copy.parquet")
    other_list.write_bytes(Path(urls_path).read_bytes())
    assert prepare(cfg, other_list) == stats
    # Another list's content is another input: prepare would run again, afresh, saying why.
    edited = Path(urls_path).with_name("edited.parquet")
    frame = pd.read_parquet(urls_path)
    frame.iloc[:-1].to_parquet(edited)
    decision = pretrain.decide(
        run,
        "prepare",
        pretrain.prepare_identity(spec_of(cfg, run.root, ("prepare",), url_list=str(edited))),
        False,
    )
    assert decision.run and decision.fresh and "url_list" in decision.why
    assert {f: f.stat().st_mtime_ns for f in sorted(Path(run.rejects).glob("*.parquet"))} == mtimes
    assert run.stage("prepare") == entry
    assert json.loads(Path(run.stats_path).read_text()) == stats
