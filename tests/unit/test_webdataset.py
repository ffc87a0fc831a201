"""WebDataset tars both ways, without Ray: a shard written as a tar is read back by the
`webdataset` package (what open_clip's trainer uses) sample for sample, and the tar's samples
become the shard's rows again, tokens recomputed with the same tokenizer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline import schema
from pipeline.data.tokenize import load_tokenizer
from pipeline.data.webdataset import export_plan, list_tars, sample_rows, shard_to_tar


def _jpeg(rgb, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, n: int, first: int = 0) -> pa.Table:
    tokenizer = load_tokenizer("clip-demo-tiny")
    rows = []
    for i in range(first, first + n):
        url = f"http://example.com/{i}.jpg"
        caption = f"a photo of thing number {i} ünïcode"
        jpg = _jpeg((i * 7 % 255, 100, 200), size=(40 + i, 30))
        rows.append(
            {
                "key": schema.url_key(url), "url": url, "caption": caption, "jpg": jpg,
                "width": 40 + i, "height": 30, "original_width": 400 + i,
                "original_height": 300, "sha256": f"sha-{i}",
                "tokens": tokenizer([caption])[0].tolist(),
            }
        )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema.SAMPLE)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table


def test_a_shard_as_a_tar_reads_back_with_webdataset(tmp_path):
    table = write_shard(tmp_path / "shards" / "part-00000.parquet", 5)
    tar = tmp_path / "wds" / "part-00000.tar"
    assert shard_to_tar(str(tmp_path / "shards" / "part-00000.parquet"), str(tar)) == 5
    assert [p.name for p in tar.parent.iterdir()] == ["part-00000.tar"]  # no partial left
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert len(samples) == 5
    for sample, row in zip(samples, table.to_pylist(), strict=True):
        assert sample["__key__"] == row["key"]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "json"}
        assert sample["jpg"] == row["jpg"]  # the stored bytes, not re-encoded
        assert sample["txt"].decode("utf-8") == row["caption"]
        meta = json.loads(sample["json"])
        assert "tokens" not in meta and "jpg" not in meta
        for column in ("url", "width", "height", "original_width", "original_height", "sha256"):
            assert meta[column] == row[column], column
    # The bytes are a function of the shard: exporting again gives the same tar.
    again = tmp_path / "again.tar"
    shard_to_tar(str(tmp_path / "shards" / "part-00000.parquet"), str(again))
    assert again.read_bytes() == tar.read_bytes()


def test_tar_samples_become_the_shard_rows_again(tmp_path):
    shard = tmp_path / "part-00000.parquet"
    table = write_shard(shard, 6)
    shard_to_tar(str(shard), str(tmp_path / "part-00000.tar"))
    raw = list(wds.WebDataset(str(tmp_path / "part-00000.tar"), shardshuffle=False))
    columns = {k: [s[k] for s in raw] for k in ("__key__", "jpg", "txt", "json")}
    back = sample_rows(columns, load_tokenizer("clip-demo-tiny"))
    assert back.schema == schema.SAMPLE
    assert back.to_pylist() == table.to_pylist()


def test_img2dataset_style_tar_without_sizes_or_hash(tmp_path):
    # Only jpg + txt (+ a json without sizes): the sizes come from the JPEG header, the
    # sha256 from the bytes, the url stays null when the json has none.
    jpg = _jpeg((1, 2, 3), size=(33, 21))
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("000000001.jpg", jpg), ("000000001.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = list(wds.WebDataset(str(path), shardshuffle=False))
    columns = {"__key__": [s["__key__"] for s in raw], "jpg": [s["jpg"] for s in raw]}
    columns.update(txt=[s["txt"] for s in raw], json=None)
    (row,) = sample_rows(columns, load_tokenizer("clip-demo-tiny")).to_pylist()
    assert (row["width"], row["height"]) == (33, 21)
    assert (row["original_width"], row["original_height"]) == (33, 21)
    assert row["url"] is None and row["key"] == "000000001"
    assert row["sha256"] == hashlib.sha256(jpg).hexdigest()
    assert row["tokens"] == load_tokenizer("clip-demo-tiny")(["a red square"])[0].tolist()


def test_list_tars_and_export_plan_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_tars(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no WebDataset .tar files"):
        list_tars(str(tmp_path / "empty"))
    (tmp_path / "tars" / "sub").mkdir(parents=True)
    for name in ("b.tar", "a.tar", "sub/c.tar", "notes.txt"):
        (tmp_path / "tars" / name).write_bytes(b"")
    found = list_tars(str(tmp_path / "tars"))
    assert [p.rsplit("/", 1)[-1] for p in found] == ["a.tar", "b.tar", "c.tar"]
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        export_plan(tmp_path / "empty", "s3://bucket/wds")
    write_shard(tmp_path / "shards" / "part-00001.parquet", 1)
    (tmp_path / "shards" / ".part-00002.parquet").write_bytes(b"partial")
    plan = export_plan(tmp_path / "shards", "s3://bucket/wds/")
    assert plan == [
        {
            "shard": str(tmp_path / "shards" / "part-00001.parquet"),
            "tar": "s3://bucket/wds/part-00001.tar",
        }
    ]


def test_export_job_without_shards_is_one_error_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "jobs" / "export_wds.py"
    done = subprocess.run(
        [sys.executable, str(job), "--run-dir", str(tmp_path / "run"), "--to", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: no Parquet shards in {tmp_path / 'run' / 'data' / 'shards'}: "
        "run jobs/prepare_data.py first"
    ]


def test_train_shards_input_is_checked_before_ray(tmp_path):
    from pipeline.spec import Inputs, SpecError, build_spec, validate

    def spec(source):
        return build_spec(
            preset="tiny", run_dir=str(tmp_path / "run"), stages=("train",),
            inputs=Inputs(shards=source),
        )  # fmt: skip

    with pytest.raises(FileNotFoundError, match=r"^--shards: .*missing: no such file"):
        validate(spec("missing"))  # relative: resolved against the current directory
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="--shards: .* no WebDataset .tar files and no .parquet"):
        validate(spec(str(tmp_path / "notes")))
    write_shard(tmp_path / "wds-src" / "part-00000.parquet", 2)
    shard_to_tar(str(tmp_path / "wds-src" / "part-00000.parquet"), str(tmp_path / "wds" / "a.tar"))
    ok = validate(spec(str(tmp_path / "wds")))
    assert ok.inputs.shards == str(tmp_path / "wds")
    # A run whose shards prepare wrote is not overwritten by an import.
    write_shard(tmp_path / "run" / "data" / "shards" / "part-00000.parquet", 2)
    with pytest.raises(SpecError, match="already holds prepared shards"):
        validate(spec(str(tmp_path / "wds")))
    # An import killed midway left its claim: its files are its own, and the rerun redoes it.
    from pipeline.data.webdataset import IMPORT_STARTED

    (tmp_path / "run" / "data" / "shards" / IMPORT_STARTED).write_text("{}")
    assert validate(spec(str(tmp_path / "wds"))).inputs.shards == str(tmp_path / "wds")
