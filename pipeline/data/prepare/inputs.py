"""Reading URL lists: Parquet, CSV, TSV or JSON lines; a file or a folder; local or fsspec."""

from __future__ import annotations

import os

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline import schema

READERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".json": "json",
}
# Set by read_url_list on rows whose text is not UTF-8: (column, reason) is rejected at input.
INPUT_REASON = "_input_reason"
_NOT_UTF8 = {"url": "bad_url", "caption": "caption_not_utf8"}


def _list_inputs(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _, (root,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"URL list {path!r} does not exist")
    if fs.isdir(root):
        files = sorted(f for f in fs.find(root) if os.path.splitext(f)[1].lower() in READERS)
        if not files:
            raise ValueError(f"URL list folder {path!r} holds no {'/'.join(sorted(READERS))} files")
        return fs, files
    if os.path.splitext(root)[1].lower() not in READERS:
        raise ValueError(
            f"URL list {path!r}: unknown format; use one of {', '.join(sorted(READERS))}"
        )
    return fs, [root]


def _read_one(fs: fsspec.AbstractFileSystem, path: str, text_columns: list[str]) -> pa.Table:
    """One URL list file. CSV/TSV `text_columns` are read as raw bytes, never guessed as
    numbers or dates, and never refused whole for one row that is not UTF-8."""
    kind = READERS[os.path.splitext(path)[1].lower()]
    try:
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                return pq.read_table(f)
            if kind == "json":
                return pa_json.read_json(f)
            return pa_csv.read_csv(
                f,
                parse_options=pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                convert_options=pa_csv.ConvertOptions(
                    column_types={c: pa.binary() for c in text_columns},
                    strings_can_be_null=True,  # an empty cell is a missing caption
                ),
            )
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read URL list {path!r} as {kind}: {err}") from err


def _as_text(values: list, column: str, reasons: list) -> list[str | None]:
    """Strings or None; bytes that are not UTF-8 are kept readable and their row flagged."""
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None or (not isinstance(v, str | bytes) and pd.isna(v)):
            out.append(None)
        elif isinstance(v, bytes):
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.decode("utf-8", "replace"))
                reasons[i] = reasons[i] or (_NOT_UTF8[column], f"{column} is not valid UTF-8")
        else:
            out.append(str(v))
    return out


def read_url_list(
    path: str,
    url_col: str = "url",
    caption_col: str = "caption",
    additional_columns: tuple[str, ...] | list[str] = (),
) -> pd.DataFrame:
    """The URL list as a DataFrame, in file then row order.

    Columns: `url`, `caption`, the `additional_columns` under their own names, and
    INPUT_REASON when some row's text is not UTF-8. ``frame.attrs["additional_types"]``
    holds the extra columns' Arrow types.
    """
    clash = sorted(set(additional_columns) & (set(schema.SAMPLE.names) | set(schema.REJECT.names)))
    if clash:
        raise ValueError(
            f"--save-additional-columns: {', '.join(clash)} would overwrite the output column(s) "
            "of that name; rename them in the URL list"
        )
    fs, files = _list_inputs(path)
    wanted = [url_col, caption_col, *additional_columns]
    tables = []
    for file in files:
        table = _read_one(fs, file, [url_col, caption_col])
        missing = [c for c in dict.fromkeys(wanted) if c not in table.column_names]
        if missing:
            raise ValueError(
                f"URL list {file!r} has no column {' or '.join(map(repr, missing))}; "
                f"columns found: {', '.join(table.column_names) or 'none'} "
                "(choose them with --url-col / --caption-col / --save-additional-columns)"
            )
        tables.append(table.select(wanted))
    n = sum(t.num_rows for t in tables)
    if n == 0:
        raise ValueError(
            f"URL list {path!r} is empty: no rows to download "
            f"(columns found: {', '.join(tables[0].column_names)})"
        )
    reasons: list = [None] * n
    columns: dict[str, list] = {}
    for name, column in (("url", url_col), ("caption", caption_col)):
        values = [v for t in tables for v in t[column].to_pylist()]
        columns[name] = _as_text(values, name, reasons)
    extra_types = {}
    for c in additional_columns:
        # One type across files: the first file's, the others cast to it (or text if they differ).
        types = {t[c].type for t in tables}
        extra_types[c] = types.pop() if len(types) == 1 else pa.string()
        columns[c] = [v for t in tables for v in t[c].cast(extra_types[c], safe=False).to_pylist()]
    frame = pd.DataFrame(columns)
    if any(reasons):
        frame[INPUT_REASON] = pd.Series(reasons, dtype=object)
    frame.attrs["additional_types"] = extra_types
    return frame
