"""jobs/prepare_data.py's data flags: bad values stop with one `error:` line before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]


def prepare(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "caption": ["a cat"]}).to_csv(
        urls, index=False
    )
    return subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--input", str(urls), "--run-dir",
         str(tmp_path / "run"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_help_lists_the_data_flags():
    result = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--help"], cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    for flag in (
        "--save-additional-columns", "--decontaminate", "--near-duplicate-distance",
        "--retry-failed", "--allowed-networks",
    ):  # fmt: skip
        assert flag in result.stdout, flag


def test_missing_additional_column_is_named_with_the_file(tmp_path):
    result = prepare(tmp_path, "--save-additional-columns", "uid,license")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "urls.csv" in result.stderr
    assert "'uid'" in result.stderr and "columns found: url, caption" in result.stderr
    assert not (tmp_path / "run" / "data").exists()  # nothing started


def test_decontaminate_needs_a_folder_of_images(tmp_path):
    result = prepare(tmp_path, "--decontaminate", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "--decontaminate" in result.stderr
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty-eval"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("no images here")
    result = prepare(tmp_path, "--decontaminate", str(empty))
    assert result.returncode == 2 and "no images" in result.stderr


def test_near_duplicate_distance_out_of_range(tmp_path):
    result = prepare(tmp_path, "--near-duplicate-distance", "40")
    assert result.returncode == 2
    assert "--near-duplicate-distance" in result.stderr and "0..15" in result.stderr
