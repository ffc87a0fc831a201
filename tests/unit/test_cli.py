"""The jobs as a user calls them: bad input gets one clear line and a non-zero exit, before Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = ["pretrain.py", "prepare_data.py", "train.py", "eval.py"]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_help(job):
    result = _run(f"jobs/{job}", "--help")
    assert result.returncode == 0, result.stderr
    assert "--run-dir" in result.stdout and "--preset" in result.stdout


def test_unknown_preset_names_the_choices(tmp_path):
    result = _run("jobs/pretrain.py", "--preset", "huge", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "unknown preset 'huge'" in result.stderr
    assert "demo" in result.stderr and "tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_caption_column_names_file_and_columns(tmp_path):
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "text": ["a cat"]}).to_csv(urls, index=False)
    result = _run("jobs/pretrain.py", "--input", str(urls), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "caption" in result.stderr and "urls.csv" in result.stderr
    assert "url, text" in result.stderr  # the columns that were found
    assert not (tmp_path / "r" / "data").exists()  # nothing started


def test_custom_columns_are_accepted_before_ray_starts(tmp_path):
    # The same file passes the input check once the right column is named; the job then
    # fails on the eval set, still before any Ray work.
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "text": ["a cat"]}).to_csv(urls, index=False)
    result = _run(
        "jobs/pretrain.py", "--input", str(urls), "--caption-col", "text",
        "--eval-dataset", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "caption" not in result.stderr


def test_empty_url_list(tmp_path):
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)}).to_parquet(
        urls
    )
    result = _run("jobs/prepare_data.py", "--input", str(urls), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "empty" in result.stderr


def test_missing_url_list(tmp_path):
    result = _run("jobs/prepare_data.py", "--input", str(tmp_path / "no.parquet"))
    assert result.returncode == 2
    assert "no.parquet" in result.stderr and "does not exist" in result.stderr


def test_bad_allowed_network(tmp_path):
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "caption": ["a cat"]}).to_csv(urls)
    result = _run(
        "jobs/prepare_data.py", "--input", str(urls), "--allowed-networks", "10.0.0.0/99",
        "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "10.0.0.0/99" in result.stderr


def test_unknown_model_is_refused(tmp_path):
    result = _run("jobs/train.py", "--model", "ViT-Z-99", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "unknown model 'ViT-Z-99'" in result.stderr


def _spec(job_args: list[str], sections=("train", "prepare", "eval", "sweep", "demo"), **kw):
    sys.path.insert(0, str(REPO / "jobs"))
    from common import job_parser, spec_from_args

    parser = job_parser("test", sections, inputs=("url_list", "val_dataset", "eval_dataset"))
    return spec_from_args(parser, parser.parse_args(job_args), ("prepare", "train"), **kw)


def test_model_flag_sets_tokenizer_and_trainer_alike():
    config = REPO / "pipeline" / "models" / "clip-demo-vit-tiny.json"
    cfg = _spec(["--preset", "tiny", "--model", str(config)]).config
    assert cfg.train.model == cfg.prepare.tokenize.model == str(config.resolve())


def test_training_flags_override_only_what_they_name():
    from pipeline.config import get_preset

    train = _spec(
        ["--preset", "tiny", "--loss", "siglip", "--init-temperature", "0.1"]
        + ["--fixed-temperature", "--accum-freq", "2", "--max-steps", "7", "--lr", "1e-3"]
    ).config.train
    preset = get_preset("tiny").train
    assert (train.loss, train.init_temperature, train.learn_temperature) == ("siglip", 0.1, False)
    assert (train.accum_freq, train.max_steps, train.lr) == (2, 7, 1e-3)
    # Everything not named keeps the preset's value.
    assert train.global_batch_size == preset.global_batch_size
    assert train.grad_checkpointing is preset.grad_checkpointing is False
    assert _spec(["--preset", "tiny"]).config.train == preset


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--global-batch-size", "100", "--num-workers", "3"], "does not split over 3 workers"),
        (["--val-dataset", "no/such/folder"], "--val-dataset"),
    ],
)
def test_bad_training_flags_stop_before_ray(tmp_path, flags, message):
    result = _run("jobs/train.py", "--run-dir", str(tmp_path / "r"), *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
