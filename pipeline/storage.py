"""Paths as URIs: a local path, `s3://bucket/key` or `gs://bucket/key`, through one API.

Every stage reads and writes the run directory, its inputs and its outputs through these
functions, so the same code runs on a laptop's disk and on a cluster whose only shared place is
a bucket. fsspec picks the file system from the scheme (s3fs, gcsfs); a custom S3 endpoint
(MinIO, Ceph, a local test server) comes from the standard `AWS_ENDPOINT_URL` variable, which
botocore reads itself.

Commits: a local file is written under a temporary name and renamed into place; an object is
uploaded whole (object stores never show a half-written object). A reader trusts an output only
once its marker, written last, exists: the same rule on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any

# Schemes whose file system lives in a separate package, named in the error when it is missing.
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class StorageError(RuntimeError):
    """A path that cannot be used: a missing package, bucket or credentials, no write access."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths other than `file://`, which are plain local paths."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def normalize(path: str | os.PathLike) -> str:
    """One spelling per location: local paths absolute, URIs without a trailing slash."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return str(Path(text).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(os.fspath(path).rstrip("/"))


def parent(path: str | os.PathLike) -> str:
    text = os.fspath(path).rstrip("/")
    if is_uri(text):
        return text.rsplit("/", 1)[0]
    return os.path.dirname(text)


def filesystem(path: str | os.PathLike):
    """(fsspec file system, path within it) for a local path or URI.

    A scheme whose package is not installed is a StorageError naming the package.
    """
    import fsspec

    text = os.fspath(path)
    scheme = text.split("://", 1)[0].lower() if is_uri(text) else "file"
    try:
        return fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        package = SCHEME_PACKAGES.get(scheme)
        if package is None and isinstance(e, ValueError) and "Protocol not known" in str(e):
            raise StorageError(f"{text}: unknown storage scheme {scheme!r}://") from e
        if package is not None:
            raise StorageError(
                f"{text}: {scheme}:// needs the {package} package (pip install {package})"
            ) from e
        if isinstance(e, ImportError):
            raise StorageError(f"{text}: {scheme}:// needs a package that is missing ({e})") from e
        raise StorageError(f"{text}: {e}") from e


def arrow_filesystem(path: str | os.PathLike):
    """(pyarrow file system, path within it), for pyarrow, Ray Data and Ray Train.

    Wraps the fsspec file system, so credentials and endpoints resolve the same way everywhere.
    """
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), inner
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def isdir(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def makedirs(path: str | os.PathLike) -> None:
    """Create a folder; on object stores folders are implied by keys, so nothing to do."""
    if not is_uri(path):
        os.makedirs(os.fspath(path), exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file or object: a reader sees the old content or the new, never a part."""
    text = os.fspath(path)
    if is_uri(text):
        fs, inner = filesystem(text)
        fs.pipe_file(inner, data)
        return
    os.makedirs(os.path.dirname(text) or ".", exist_ok=True)
    tmp = os.path.join(
        os.path.dirname(text), f".{os.path.basename(text)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, text)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(table, path: str | os.PathLike, **kwargs: Any) -> None:
    """Write a Parquet file whole (see write_bytes): a crash never leaves a readable half file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    write_bytes(path, sink.getvalue().to_pybytes())


def read_parquet(path: str | os.PathLike, **kwargs: Any):
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    return pq.read_table(inner, filesystem=fs, **kwargs)


def list_files(folder: str | os.PathLike, suffix: str = "") -> list[str]:
    """Files directly in `folder` ending in `suffix`, sorted, as full paths or URIs.

    Hidden names (a leading dot: temporary files of an unfinished write) are never listed.
    A missing folder lists as empty.
    """
    folder = os.fspath(folder)
    fs, inner = filesystem(folder)
    try:
        entries = fs.ls(inner, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        base = name(entry["name"])
        if entry.get("type") == "directory" or base.startswith(".") or not base.endswith(suffix):
            continue
        found.append(join(folder, base))
    return sorted(found)


def glob(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Files under `folder` matching `pattern` (such as `*/history.jsonl`), sorted, as full
    paths or URIs. Listed fresh: other processes may have written there since the last look."""
    folder = os.fspath(folder)
    fs, inner = filesystem(folder)
    fs.invalidate_cache()
    root = inner.rstrip("/")
    found = fs.glob(f"{root}/{pattern}")
    return sorted(join(folder, *path[len(root) + 1 :].split("/")) for path in found)


def size(path: str | os.PathLike) -> int:
    fs, inner = filesystem(path)
    return fs.size(inner)


def remove(path: str | os.PathLike, recursive: bool = False) -> None:
    """Remove a file, or a folder with everything in it; a missing path is not an error."""
    fs, inner = filesystem(path)
    try:
        fs.rm(inner, recursive=recursive)
    except FileNotFoundError:
        pass


def download(src: str | os.PathLike, local_dst: str | os.PathLike) -> None:
    """Copy a file or a folder (recursively) from any location to a local path."""
    fs, inner = filesystem(src)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(local_dst))) or ".", exist_ok=True)
    fs.get(inner, os.fspath(local_dst), recursive=fs.isdir(inner))


def upload(local_src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a local file or folder (recursively) to any location."""
    local_src = os.fspath(local_src)
    fs, inner = filesystem(dst)
    if not is_uri(dst):
        os.makedirs(os.path.dirname(inner) or ".", exist_ok=True)
    fs.put(local_src, inner, recursive=os.path.isdir(local_src))


def check_writable(folder: str | os.PathLike) -> None:
    """Raise StorageError naming what is wrong unless a file can be written in `folder`.

    Writes and removes a small probe, so a missing bucket, missing credentials or a read-only
    location are found before any stage starts, not halfway through one.
    """
    folder = os.fspath(folder)
    filesystem(folder)  # a scheme without its package is named with the folder, not the probe
    probe = join(folder, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - each backend raises its own types; name them all
        raise StorageError(f"{folder}: cannot write there ({_reason(e)})") from e


def check_readable(path: str | os.PathLike) -> None:
    """Raise StorageError naming what is wrong unless `path` exists and can be read."""
    try:
        found = exists(path)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"{os.fspath(path)}: cannot read it ({_reason(e)})") from e
    if not found:
        raise StorageError(f"{os.fspath(path)}: not found")


def _reason(e: Exception) -> str:
    """A short cause for the error line: missing bucket, missing credentials, no permission."""
    text = f"{type(e).__name__}: {e}"
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return "the bucket does not exist"
    if "credentials" in lowered or "invalidaccesskeyid" in lowered:
        return (
            "no valid credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile "
            "or an instance role; for GCS, application default credentials)"
        )
    if isinstance(e, PermissionError) or "accessdenied" in lowered or "forbidden" in lowered:
        return "permission denied"
    return text.splitlines()[0][:200]


def find_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under `folder` (recursively) as (path relative to it, size), sorted.

    A single file lists as itself; a missing folder lists as empty.
    """
    folder = os.fspath(folder)
    fs, inner = filesystem(folder)
    try:
        if fs.isfile(inner):
            return [(name(inner), fs.size(inner))]
        found = fs.find(inner, detail=True)
    except FileNotFoundError:
        return []
    root = inner.rstrip("/") + "/"
    return sorted(
        (path[len(root) :], int(info.get("size") or 0))
        for path, info in found.items()
        if path.startswith(root) and info.get("type") != "directory"
    )


def parquet_file(path: str | os.PathLike):
    """A pyarrow ParquetFile on any location: footer read now, row groups read on demand."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    return pq.ParquetFile(inner, filesystem=fs)


def parquet_rows(path: str | os.PathLike) -> int:
    """A Parquet file's row count, from its footer (no data read)."""
    return parquet_file(path).metadata.num_rows


@contextlib.contextmanager
def local_copy(path: str | os.PathLike):
    """A local path holding `path`'s content for the block: the path itself when local, else a
    temporary download (for libraries that read only local files, such as open_clip)."""
    path = os.fspath(path)
    if not is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clip-pipeline-") as tmp:
        local = os.path.join(tmp, name(path))
        download(path, local)
        yield local


@contextlib.contextmanager
def local_output(path: str | os.PathLike):
    """A local folder to write into for the block, uploaded to `path` at its end when `path` is a
    URI (for libraries that write only local files: open_clip's export, TensorBoard)."""
    path = os.fspath(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clip-pipeline-") as tmp:
        yield tmp
        for rel, _ in find_files(tmp):
            # File by file, each whole: a reader never sees half an object.
            with open(os.path.join(tmp, rel), "rb") as f:
                write_bytes(join(path, *rel.split(os.sep)), f.read())
