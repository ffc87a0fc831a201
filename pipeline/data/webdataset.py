"""WebDataset tars at the storage boundary, both ways.

Out: each prepared shard (RUN/data/shards/NAME.parquet) becomes NAME.tar holding, per sample,
KEY.jpg (the image bytes as stored), KEY.txt (the caption) and KEY.json (every other column
but the tokens, which belong to one tokenizer): the layout img2dataset writes and
open_clip's trainer reads (`--dataset-type webdataset`).

In (`jobs/train.py --shards`): tars of that layout (ours, img2dataset's, anyone's with jpg +
txt), or another run's Parquet shards, become rows of the shard schema (pipeline/schema.py
SAMPLE): Ray Data reads them (`read_webdataset`, `read_parquet`), the captions are tokenized
with the open_clip tokenizer of the model to train, as prepare does, and the rows are written
as Parquet shards, which training then streams by its usual deterministic plan.
Missing metadata is derived: sizes from the JPEG header, sha256 from the bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipeline import schema, storage

# Not in KEY.json: the image and caption have their own members, and tokens are recomputed
# for whichever model reads the tars.
NOT_IN_JSON = ("jpg", "caption", "tokens")
IMPORT_MARKER = ".imported.json"  # in the shards folder, written last: the import is whole
IMPORT_STARTED = ".importing.json"  # written first: the folder's Parquet files are an import's


def _is_uri(path: str) -> bool:
    return "://" in str(path)


def find_shards(source: str) -> tuple[str, list[str]]:
    """("webdataset", tars) or ("parquet", files): a .tar or .parquet file, or every one under
    a folder (local or fsspec URL), sorted; tars win when a folder holds both."""
    fs, root = fsspec.core.url_to_fs(str(source))
    if not fs.exists(root):
        raise FileNotFoundError(f"{source}: no such file or folder")
    found = [root] if fs.isfile(root) else fs.find(root)
    found = [p for p in found if not p.rsplit("/", 1)[-1].startswith(".")]  # partial writes
    for kind, suffix in (("webdataset", ".tar"), ("parquet", ".parquet")):
        files = sorted(p for p in found if p.endswith(suffix))
        if files:
            return kind, [fs.unstrip_protocol(p) if _is_uri(source) else p for p in files]
    raise ValueError(f"{source}: no WebDataset .tar files and no .parquet shards")


def list_tars(source: str) -> list[str]:
    kind, files = find_shards(source)
    if kind != "webdataset":
        raise ValueError(f"{source}: no WebDataset .tar files")
    return files


# -- out: Parquet shard -> tar ----------------------------------------------------------------
def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same shard, same bytes
    tar.addfile(info, io.BytesIO(data))


def shard_to_tar(parquet: str, tar_path: str) -> int:
    """Write one shard's rows as a WebDataset tar (one object, whole); returns the rows.

    Locally the tar is written beside its final name and renamed into place; on a bucket
    an object appears only once its upload completes, so a reader never sees half a tar."""
    table = storage.read_parquet(parquet)
    local = not _is_uri(tar_path)
    target = str(tar_path)
    if local:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        target = str(Path(target).with_name(f".{Path(target).name}.partial"))
    with fsspec.open(target, "wb") as stream, tarfile.open(fileobj=stream, mode="w") as tar:
        for row in table.to_pylist():
            key = row["key"]
            meta = {k: v for k, v in row.items() if k not in NOT_IN_JSON}
            meta["caption"] = row["caption"]  # img2dataset's json carries it too
            # Members of a sample are contiguous and sorted: jpg, json, txt.
            _member(tar, f"{key}.jpg", row["jpg"])
            _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            _member(tar, f"{key}.txt", (row["caption"] or "").encode("utf-8"))
    if local:
        os.replace(target, tar_path)
    return table.num_rows


def export_plan(shards: str | Path, dest: str) -> list[dict[str, str]]:
    """{shard, tar} for every finished shard (hidden files are partial writes)."""
    files = storage.list_files(shards, ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {shards}: run jobs/prepare_data.py first")
    dest = str(dest).rstrip("/")
    return [
        {"shard": f, "tar": f"{dest}/{storage.name(f).removesuffix('.parquet')}.tar"} for f in files
    ]


def _export_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = [shard_to_tar(s, t) for s, t in zip(batch["shard"], batch["tar"], strict=True)]
    return {"tar": batch["tar"], "rows": np.asarray(rows, dtype=np.int64)}


def export_webdataset(shards: str | Path, dest: str) -> dict[str, int]:
    """Every shard to DEST/NAME.tar, one Ray task per shard (data moves between the workers
    and storage, not through the driver). Returns {tar: rows}. The caller starts Ray."""
    import ray

    plan = export_plan(shards, dest)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    out = ds.map_batches(_export_batch, batch_size=1, num_cpus=0.5).take_all()
    return {row["tar"]: int(row["rows"]) for row in out}


# -- in: tar samples -> shard rows ------------------------------------------------------------
def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value if isinstance(value, str) else None  # a missing member: None or NaN


def _image_size(jpg: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as img:  # the header only: no pixels decoded
        return img.size


def sample_rows(samples: dict[str, Any], tokenizer: Any) -> pa.Table:
    """WebDataset samples (columns __key__, jpg, txt, json: raw bytes, as `read_webdataset`
    gives them without a decoder; a sample may lack txt or json, null or NaN then) -> rows of
    the shard schema, tokens from `tokenizer`."""
    out: dict[str, list] = {name: [] for name in schema.SAMPLE.names}
    n = len(samples["__key__"])
    for i in range(n):
        jpg = samples["jpg"][i]
        if jpg is None:
            raise ValueError(f"sample {samples['__key__'][i]!r} has no .jpg member")
        meta = samples["json"][i] if samples.get("json") is not None else None
        meta = json.loads(meta) if isinstance(meta, bytes | str) else meta
        meta = meta if isinstance(meta, dict) else {}
        caption = _text(samples["txt"][i]) if samples.get("txt") is not None else None
        caption = caption if caption is not None else meta.get("caption")
        if caption is None:
            raise ValueError(f"sample {samples['__key__'][i]!r} has no caption (.txt)")
        width, height = meta.get("width"), meta.get("height")
        if width is None or height is None:
            width, height = _image_size(jpg)
        out["key"].append(_text(samples["__key__"][i]))
        out["url"].append(meta.get("url"))
        out["caption"].append(caption)
        out["jpg"].append(bytes(jpg))
        out["width"].append(width)
        out["height"].append(height)
        out["original_width"].append(meta.get("original_width") or width)
        out["original_height"].append(meta.get("original_height") or height)
        out["sha256"].append(meta.get("sha256") or hashlib.sha256(jpg).hexdigest())
    captions = out["caption"]
    out["tokens"] = tokenizer(captions).tolist()
    return pa.Table.from_pydict(out, schema=schema.SAMPLE)


class SampleRows:
    """Ray Data callable class: tar samples (or Parquet shard rows) -> shard rows with tokens
    for `model`; the tokenizer loads once per actor."""

    def __init__(self, model: str):
        from pipeline.data.tokenize import load_tokenizer

        self.tokenizer = load_tokenizer(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns = {k: list(v) for k, v in batch.items()}
        if "__key__" not in columns:  # Parquet rows of the shard schema: new tokens only
            captions = [str(c) for c in columns["caption"]]
            columns["tokens"] = self.tokenizer(captions).tolist()
            return pa.Table.from_pydict(columns, schema=schema.SAMPLE)
        for member in ("txt", "json"):
            columns.setdefault(member, None)
        return sample_rows(columns, self.tokenizer)


def files_fingerprint(files: list[str]) -> list[list]:
    """Names and sizes: another set of files (or a rewritten one) is another import."""
    out = []
    for name in files:
        fs, path = fsspec.core.url_to_fs(name)
        out.append([name, int(fs.size(path))])
    return out


def import_shards(
    source: str, shards: Path, model: str, rows_per_shard: int = 10_000, log: Any = print
) -> int:
    """WebDataset tars (or Parquet shards of another run) at `source` -> Parquet shards in
    `shards`, tokens for `model`, so training streams them by its usual plan.

    Whole or not at all: the Parquet files are written first and IMPORT_MARKER last; an import
    that finds no marker matching these files clears the folder's Parquet files and redoes it.
    Returns the rows imported. The caller starts Ray."""
    import ray

    kind, files = find_shards(source)
    shards = str(shards)
    marker = storage.join(shards, IMPORT_MARKER)
    identity = {"source": str(source), "files": files_fingerprint(files), "model": model}
    if storage.exists(marker):
        done = storage.read_json(marker)
        if {k: done.get(k) for k in identity} == identity:
            return int(done["rows"])
    storage.makedirs(shards)
    # Claimed first, so a killed import's files are known as an import's and cleared by the
    # rerun (never mistaken for prepare's shards).
    storage.write_json(storage.join(shards, IMPORT_STARTED), identity)
    for old in [marker, *storage.list_files(shards, ".parquet")]:
        storage.remove(old)
    log(f"[train] reading {len(files)} {kind} files from {source}")
    if kind == "webdataset":
        # No decoder (None; False would still run the default one, which decodes the JPEG to
        # pixels): the image stays the bytes it was stored as; txt and json decode here.
        ds = ray.data.read_webdataset(files, decoder=None, suffixes=["jpg", "txt", "json"])
    else:
        columns = [c for c in schema.SAMPLE.names if c != "tokens"]
        ds = ray.data.read_parquet(files, columns=columns)
    ds = ds.map_batches(
        SampleRows,
        fn_constructor_kwargs={"model": model},
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.5,
    )
    fs, inner = storage.arrow_filesystem(shards)
    ds.write_parquet(inner, filesystem=fs, min_rows_per_file=rows_per_shard)
    rows = sum(storage.parquet_rows(f) for f in storage.list_files(shards, ".parquet"))
    storage.write_json(marker, {**identity, "rows": rows})  # whole, and last
    storage.remove(storage.join(shards, IMPORT_STARTED))
    log(f"[train] {rows} samples written as Parquet shards in {shards}")
    return rows
