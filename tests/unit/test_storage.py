"""pipeline.storage against a local folder and a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_round_trip_and_listing(root):
    storage.write_json(storage.join(root, "a", "m.json"), {"x": 1})
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")
    storage.write_bytes(storage.join(root, "a", ".hidden"), b"temporary")
    table = pa.table({"k": ["1", "2", "3"]})
    storage.write_parquet(table, storage.join(root, "a", "s.parquet"))

    assert storage.read_json(storage.join(root, "a", "m.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello"
    assert storage.read_parquet(storage.join(root, "a", "s.parquet")).equals(table)
    listed = storage.list_files(storage.join(root, "a"))
    assert [storage.name(p) for p in listed] == ["b.txt", "m.json", "s.parquet"]
    assert storage.list_files(storage.join(root, "a"), ".parquet") == [
        storage.join(root, "a", "s.parquet")
    ]
    assert storage.list_files(storage.join(root, "missing")) == []

    storage.remove(storage.join(root, "a"), recursive=True)
    assert not storage.exists(storage.join(root, "a", "m.json"))


def test_overwrite_replaces_whole(root):
    path = storage.join(root, "f.bin")
    storage.write_bytes(path, b"a" * 1000)
    storage.write_bytes(path, b"b")
    assert storage.read_bytes(path) == b"b"


def test_upload_and_download_a_folder(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "sub" / "two.txt").write_text("2")
    storage.upload(src, storage.join(root, "copy"))
    back = tmp_path / "back"
    storage.download(storage.join(root, "copy"), back)
    assert (back / "one.txt").read_text() == "1"
    assert (back / "sub" / "two.txt").read_text() == "2"


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(storage.StorageError, match="no-such-bucket-here.*does not exist"):
        storage.check_writable("s3://no-such-bucket-here/run")


def test_read_only_location_is_refused():
    # /proc refuses new files even to root, unlike a chmod-ed folder.
    with pytest.raises(storage.StorageError, match="/proc/run: cannot write there"):
        storage.check_writable("/proc/run")


def test_scheme_without_package_is_named():
    with pytest.raises(storage.StorageError, match="unknown storage scheme 'nosuch'"):
        storage.exists("nosuch://bucket/x")


def test_normalize_and_join():
    assert storage.normalize("S3://b/run/") == "s3://b/run"
    assert storage.join("s3://b/run", "data", "x.parquet") == "s3://b/run/data/x.parquet"
    assert storage.parent("s3://b/run/data") == "s3://b/run"
    assert storage.normalize("file:///tmp/x") == "/tmp/x"
    assert storage.is_uri("gs://b") and not storage.is_uri("/tmp/x")


def test_find_files_parquet_rows_and_local_copies(root, tmp_path):
    import pyarrow as pa

    storage.write_text(storage.join(root, "set", "a", "1.png"), "x")
    storage.write_text(storage.join(root, "set", "b", "2.png"), "yy")
    storage.write_parquet(pa.table({"k": [1, 2, 3]}), storage.join(root, "set", "t.parquet"))
    found = storage.find_files(storage.join(root, "set"))
    assert [rel for rel, _ in found] == ["a/1.png", "b/2.png", "t.parquet"]
    assert found[1][1] == 2
    assert storage.find_files(storage.join(root, "nothing")) == []
    assert storage.parquet_rows(storage.join(root, "set", "t.parquet")) == 3
    with storage.local_copy(storage.join(root, "set")) as local:
        assert open(os.path.join(local, "b", "2.png")).read() == "yy"
    with storage.local_output(storage.join(root, "out")) as local:
        with open(os.path.join(local, "events"), "w") as f:
            f.write("tb")
    assert storage.read_text(storage.join(root, "out", "events")) == "tb"
