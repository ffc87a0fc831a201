"""Reading URL lists: Parquet, CSV, TSV or JSON lines; a file or a folder; local or fsspec."""

from __future__ import annotations

import csv
import glob
import io
import math
import os

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.data.untrusted import printable

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
MALFORMED = "malformed_row"  # a CSV/TSV line that is no row: rejected at input, never merged


def _list_inputs(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _, paths = fsspec.get_fs_token_paths(path)  # a glob pattern expands to its matches
    if glob.has_magic(path):
        files = sorted(f for f in paths if os.path.splitext(f)[1].lower() in READERS)
        if not files:
            raise FileNotFoundError(
                f"URL list {path!r} matches no {'/'.join(sorted(READERS))} files"
            )
        return fs, files
    (root,) = paths
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


def _split_records(data: bytes, delimiter: str, quoting: bool) -> tuple[bytes, list]:
    """One physical line is one row: lines that cannot be a row on their own are taken out.

    A CSV quote left open would otherwise run on over the following lines and swallow their
    rows into one caption, silently. So each line must parse alone, with the header's number
    of columns; the others come back as (position among the file's rows, detail) to be
    rejected as malformed_row where they stood. The rest is returned for pyarrow to read.
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not part of a name
        data = data[3:]
    # Numbered as an editor shows them; blank ones are no rows (pyarrow skips them too).
    lines = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip(b" \t")]
    if not lines:
        return data, []
    opts = {"delimiter": delimiter, "strict": True}
    if not quoting:
        opts["quoting"] = csv.QUOTE_NONE
    try:
        # latin-1 maps each byte to one character: quotes and delimiters are ASCII.
        width = len(next(csv.reader([lines[0][1].decode("latin-1")], **opts)))
    except csv.Error as err:
        raise pa.ArrowInvalid(f"header line: {err}") from err
    good, bad = [lines[0][1]], []
    for position, (number, line) in enumerate(lines[1:]):
        try:
            fields = next(csv.reader([line.decode("latin-1")], **opts))
            problem = None if len(fields) == width else f"{len(fields)} fields, not {width}"
        except csv.Error as err:  # an unclosed quote, or text after a closing one
            problem = str(err)
        if problem is None:
            good.append(line)
        else:
            text = printable(line.decode("utf-8", "replace"), 120)
            bad.append((position, f"line {number}: {problem}: {text}"))
    return b"\n".join(good) + b"\n", bad


def _read_one(
    fs: fsspec.AbstractFileSystem, path: str, text_columns: list[str]
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """One URL list file, and its malformed rows (position, detail). CSV/TSV `text_columns`
    are read as raw bytes, never guessed as numbers or dates, and never refused whole for one
    row that is not UTF-8. TSV has no quoting (a caption may hold a `"`); CSV's quotes may
    not span lines."""
    kind = READERS[os.path.splitext(path)[1].lower()]
    try:
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                return pq.read_table(f), []
            if kind == "json":
                return pa_json.read_json(f), []
            data, bad = _split_records(f.read(), "\t" if kind == "tsv" else ",", kind == "csv")
        quote = {"quote_char": False} if kind == "tsv" else {}
        table = pa_csv.read_csv(
            io.BytesIO(data),
            parse_options=pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", **quote),
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.binary() for c in text_columns},
                strings_can_be_null=True,  # an empty cell is a missing caption,
                null_values=[""],  # but a caption "NA" or "null" is text
            ),
        )
        return table, bad
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read URL list {path!r} as {kind}: {printable(err, 300)}") from err


def _as_text(values: list, column: str, reasons: list) -> list[str | None]:
    """Strings or None; bytes that are not UTF-8 are kept readable and their row flagged, as
    is a URL that is not text at all (a number, a list)."""
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, bytes):
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.decode("utf-8", "replace"))
                reasons[i] = reasons[i] or (_NOT_UTF8[column], f"{column} is not valid UTF-8")
        else:
            if column == "url" and not isinstance(v, str):
                reasons[i] = reasons[i] or ("bad_url", f"url is a {type(v).__name__}, not text")
            out.append(str(v))
    return out


def _text_values(column: pa.ChunkedArray) -> list:
    """A column's values; strings as bytes, so invalid UTF-8 is flagged per row by _as_text
    rather than failing the whole list."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
    return column.to_pylist()


def _with_gaps(values: list, gaps: list[int]) -> list:
    """`values` with None inserted so that each position in `gaps` (ascending) holds one."""
    out = list(values)
    for position in gaps:
        out.insert(position, None)
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
    tables, malformed = [], []
    for file in files:
        table, bad = _read_one(fs, file, [url_col, caption_col])
        missing = [c for c in dict.fromkeys(wanted) if c not in table.column_names]
        if missing:
            names = ", ".join(printable(c) for c in table.column_names) or "none"
            raise ValueError(
                f"URL list {file!r} has no column {' or '.join(map(repr, missing))}; "
                f"columns found: {names} "
                "(choose them with --url-col / --caption-col / --save-additional-columns)"
            )
        tables.append(table.select(wanted))
        malformed.append(bad)
    sizes = [t.num_rows + len(bad) for t, bad in zip(tables, malformed, strict=True)]
    n = sum(sizes)
    if n == 0:
        raise ValueError(
            f"URL list {path!r} is empty: no rows to download "
            f"(columns found: {', '.join(printable(c) for c in tables[0].column_names)})"
        )
    reasons: list = [None] * n
    offset = 0
    for size, bad in zip(sizes, malformed, strict=True):
        for position, detail in bad:
            reasons[offset + position] = (MALFORMED, detail)
        offset += size

    def gathered(column: str, text: bool = False, kind: pa.DataType | None = None) -> list:
        values = []
        for t, bad in zip(tables, malformed, strict=True):
            col = t[column] if kind is None else t[column].cast(kind, safe=False)
            got = _text_values(col) if text else col.to_pylist()
            values += _with_gaps(got, [position for position, _ in bad])
        return values

    columns: dict[str, list] = {}
    for name, column in (("url", url_col), ("caption", caption_col)):
        columns[name] = _as_text(gathered(column, text=True), name, reasons)
    extra_types = {}
    for c in additional_columns:
        # One type across files: the first file's, the others cast to it (or text if they differ).
        types = {t[c].type for t in tables}
        extra_types[c] = types.pop() if len(types) == 1 else pa.string()
        values = gathered(c, kind=extra_types[c])
        # Object dtype: a gap (None) must not turn an integer column into floats.
        columns[c] = pd.Series(values, dtype=object) if any(malformed) else values
    frame = pd.DataFrame(columns)
    if any(reasons):
        frame[INPUT_REASON] = pd.Series(reasons, dtype=object)
    frame.attrs["additional_types"] = extra_types
    return frame
