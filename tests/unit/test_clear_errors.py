"""Each bad input of issue 15's items 7 and 8 is one clear error (a ValueError or
FileNotFoundError naming the file, which the jobs print as one `error:` line with exit 2)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import get_preset
from pipeline.data.prepare import read_url_list
from pipeline.evaluate import load_image_folder
from pipeline.rundir import RunDir
from pipeline.spec import spec_of

ROOT = Path(__file__).resolve().parents[2]


def _folder(root: Path, broken: bytes | None = None) -> Path:
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), rgb).save(root / name / f"{i}.jpg")
    if broken is not None:
        (root / "blue" / "9.jpg").write_bytes(broken)
    return root


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("broken", [_truncated_jpeg(), b"", b"not an image at all"])
def test_a_val_folder_with_an_unreadable_image_fails_up_front(tmp_path, broken):
    val = _folder(tmp_path / "val", broken)
    with pytest.raises(ValueError, match=r"--val-dataset: 1 of 5 images in .* cannot be read: "):
        spec_of(get_preset("tiny"), tmp_path / "run", ("train",), val_dataset=str(val))
    good = _folder(tmp_path / "good")
    spec_of(get_preset("tiny"), tmp_path / "run", ("train",), val_dataset=str(good))


def test_the_train_job_refuses_a_bad_val_folder_with_one_line(tmp_path):
    val = _folder(tmp_path / "val", _truncated_jpeg())
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--preset", "tiny", "--run-dir", str(tmp_path / "run"),
         "--val-dataset", str(val)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --val-dataset: ") and "9.jpg" in lines[0]


@pytest.mark.parametrize("name", ["classnames.txt", "templates.txt", "splits.json"])
def test_dataset_text_files_that_are_not_utf8_name_the_file(tmp_path, name):
    folder = _folder(tmp_path / "eval")
    (folder / name).write_bytes(b"r\xe9d {}\nblue {}\n")
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text"):
        load_image_folder(folder)


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    for path in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(ValueError, match="is a file, not a folder"):
            RunDir.at(path)


def test_a_glob_input_reads_the_files_it_matches(tmp_path):
    for i in range(3):
        table = pa.table({"url": [f"http://a/{i}"], "caption": [f"c{i}"]})
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    (tmp_path / "notes.txt").write_text("not a list")
    frame = read_url_list(str(tmp_path / "part-*.parquet"))
    assert list(frame["url"]) == ["http://a/0", "http://a/1", "http://a/2"]
    with pytest.raises(FileNotFoundError, match="matches no"):
        read_url_list(str(tmp_path / "nothing-*.csv"))
