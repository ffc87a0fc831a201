"""pipeline.config (presets, from_dict, config_hash) and pipeline.rundir (manifest, atomic JSON)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.config import (
    PRESETS,
    DownloadConfig,
    FilterConfig,
    PipelineConfig,
    PrepareConfig,
    config_hash,
    from_dict,
    get_preset,
)
from pipeline.rundir import RunDir, StageConfigMismatch, write_json_atomic

REQUIRED_PRESETS = ("demo", "tiny", "datacomp-small")


def _walk(obj, path=""):
    """(dotted path, value) of every leaf of a nested dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{path}{f.name}.")
        else:
            yield f"{path}{f.name}", value


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_preset_exists_and_is_a_frozen_pipeline_config(name):
    cfg = get_preset(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.preset == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.preset = "other"  # type: ignore[misc]
    # Each call builds a fresh, equal object: presets are not shared mutable state.
    assert get_preset(name) == cfg


def test_presets_differ_where_they_should():
    demo, tiny, small = (get_preset(n) for n in REQUIRED_PRESETS)
    assert tiny.demo.num_train < demo.demo.num_train
    assert small.prepare.download.image_size == 224
    assert small.train.model == small.prepare.tokenize.model == "ViT-B-32"
    # Tokens must come from the model that is trained on them, in every preset.
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.train.model == cfg.prepare.tokenize.model, name


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError) as info:
        get_preset("tiny-ish")
    message = str(info.value)
    assert "'tiny-ish'" in message
    for name in REQUIRED_PRESETS:
        assert name in message


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_from_dict_round_trips_every_preset(name):
    cfg = get_preset(name)
    # JSON is what really crosses process boundaries: tuples arrive as lists.
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert isinstance(data["prepare"]["download"]["disallowed_header_directives"], list)
    rebuilt = from_dict(PipelineConfig, data)
    assert rebuilt == cfg
    assert config_hash(rebuilt) == config_hash(cfg)
    for path, value in _walk(rebuilt):
        assert not isinstance(value, list), f"{path} came back as a list"
    assert isinstance(rebuilt.prepare.download, DownloadConfig)
    assert isinstance(rebuilt.prepare.download.disallowed_header_directives, tuple)


def test_from_dict_keeps_defaults_for_missing_keys_and_converts_nested_lists():
    cfg = from_dict(
        PrepareConfig,
        {"rows_per_shard": 7, "download": {"allowed_networks": ["127.0.0.1/32", "10.0.0.0/8"]}},
    )
    assert cfg.rows_per_shard == 7
    assert cfg.download.allowed_networks == ("127.0.0.1/32", "10.0.0.0/8")
    assert cfg.download.image_size == DownloadConfig().image_size
    assert cfg.filters == FilterConfig()
    assert hash(cfg)  # frozen and made of hashable parts only


def test_config_hash_is_stable_and_sensitive_to_nested_fields():
    a, b = PipelineConfig(), PipelineConfig()
    assert a is not b
    h = config_hash(a)
    assert h == config_hash(b)
    assert len(h) == 16 and int(h, 16) >= 0
    changed = dataclasses.replace(
        a,
        prepare=dataclasses.replace(
            a.prepare, filters=dataclasses.replace(a.prepare.filters, min_caption_words=3)
        ),
    )
    assert config_hash(changed) != h
    also = dataclasses.replace(
        a,
        prepare=dataclasses.replace(
            a.prepare,
            download=dataclasses.replace(a.prepare.download, allowed_networks=("127.0.0.1/32",)),
        ),
    )
    assert len({h, config_hash(changed), config_hash(also)}) == 3
    # Distinct presets never share a fingerprint.
    assert len({config_hash(get_preset(n)) for n in PRESETS}) == len(PRESETS)


def test_config_hash_is_the_same_in_a_fresh_interpreter():
    """Stable across processes (no PYTHONHASHSEED or id() leaking into the payload)."""
    import subprocess
    import sys

    code = (
        "from pipeline.config import get_preset, config_hash;"
        "print(config_hash(get_preset('datacomp-small')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert out.stdout.strip() == config_hash(get_preset("datacomp-small"))


def test_manifest_round_trip(tmp_path):
    run = RunDir.at(tmp_path / "run")
    assert run.manifest() == {"stages": {}}
    assert run.is_done("prepare", "abc") is False
    assert not Path(run.manifest_path).exists()  # reading never creates the file

    run.mark_done("prepare", "abc", samples=12, rejects=3)
    run.mark_done("train", "def")
    assert run.is_done("prepare", "abc") is True
    entry = run.stage("prepare")
    assert entry["config_hash"] == "abc"
    assert (entry["samples"], entry["rejects"]) == (12, 3)
    assert "finished_at" in entry
    # Another RunDir on the same folder sees the same state: it lives on disk.
    again = RunDir.at(str(tmp_path / "run" / "." / ""))
    assert again == run
    assert again.is_done("train", "def")

    run.mark_done("prepare", "abc2", samples=1)
    assert run.stage("prepare")["samples"] == 1
    assert "rejects" not in run.stage("prepare")  # replaced, not merged

    run.forget("prepare", "never-ran")
    assert run.stage("prepare") is None
    assert run.is_done("prepare", "anything") is False
    assert run.is_done("train", "def") is True
    assert sorted(json.loads(Path(run.manifest_path).read_text())["stages"]) == ["train"]


def test_is_done_with_another_hash_raises_naming_the_stage(tmp_path):
    run = RunDir.at(tmp_path)
    run.mark_done("prepare", "aaaa")
    run.mark_done("eval", "bbbb")
    with pytest.raises(StageConfigMismatch) as info:
        run.is_done("prepare", "cccc")
    message = str(info.value)
    assert "'prepare'" in message
    assert "aaaa" in message and "cccc" in message
    assert "--force" in message
    assert "'eval'" not in message
    # The refusal changes nothing on disk.
    assert run.stage("prepare")["config_hash"] == "aaaa"


def test_run_dir_paths_follow_the_design(tmp_path):
    run = RunDir.at(tmp_path)
    rel = {
        name: Path(getattr(run, name)).relative_to(run.root).as_posix()
        for name in (
            "manifest_path",
            "shards",
            "rejects",
            "stats_path",
            "train",
            "model",
            "sweep",
            "eval_results_path",
            "summary_path",
        )
    }
    assert rel == {
        "manifest_path": "manifest.json",
        "shards": "data/shards",
        "rejects": "data/rejects",
        "stats_path": "data/stats.json",
        "train": "train",
        "model": "model",
        "sweep": "sweep",
        "eval_results_path": "eval/results.json",
        "summary_path": "summary.json",
    }


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "nested" / "deeper" / "stats.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2], "p": tmp_path})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1, "p": str(tmp_path)}
    write_json_atomic(target, {"v": 2})  # overwrites in place
    assert json.loads(target.read_text()) == {"v": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.json"]

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_json_atomic(target, {"x": Unserialisable()})
    # A failed write keeps the old file whole.
    assert json.loads(target.read_text()) == {"v": 2}
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "stats.json"]
    assert leftovers == []


def test_an_unfinished_stage_folder_is_resumed_only_under_its_own_configuration(tmp_path):
    from pipeline.pretrain import claim

    run = RunDir.at(tmp_path / "run")
    a = {"config": {"lr": 0.002}, "inputs": {"shards": "aaaa"}}
    b = {"config": {"lr": 0.001}, "inputs": {"shards": "aaaa"}}
    claim(run.train, a, fresh=False, what="training run")
    (Path(run.train) / "checkpoint").write_text("step 200")
    claim(run.train, a, fresh=False, what="training run")  # same identity: resumed, kept
    assert (Path(run.train) / "checkpoint").read_text() == "step 200"
    with pytest.raises(StageConfigMismatch, match="unfinished training run of another") as err:
        claim(run.train, b, fresh=False, what="training run")
    assert "config.lr: 0.002 -> 0.001" in str(err.value)  # names what differs
    assert (Path(run.train) / "checkpoint").exists()  # refused: nothing written is lost
    claim(run.train, b, fresh=True, what="training run")  # --force
    assert not (Path(run.train) / "checkpoint").exists()
    assert json.loads((Path(run.train) / ".identity.json").read_text()) == b


def test_a_run_dir_in_a_bucket_keeps_its_uri():
    # Not a local folder named "s3:" in the working directory (issue 13).
    run = RunDir.at("s3://bucket/runs/one/")
    assert run.root == "s3://bucket/runs/one"
    assert run.shards == "s3://bucket/runs/one/data/shards"
    assert run.eval_results_path == "s3://bucket/runs/one/eval/results.json"
