"""Reading URL lists: Parquet, CSV, TSV or JSON lines; a file or a folder; local or fsspec."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class UrlList:
    """A URL list as planned, never loaded: its files, their row counts and column types.

    Shard tasks read their own rows with `read_rows`; the driver holds only this.
    """

    path: str
    fs: fsspec.AbstractFileSystem
    files: tuple[str, ...]
    rows: tuple[int, ...]  # per file, malformed lines included (each is a rejected row)
    url_col: str
    caption_col: str
    additional_columns: tuple[str, ...]
    extra_types: dict[str, pa.DataType]
    any_malformed: bool

    def __len__(self) -> int:
        return sum(self.rows)

    @property
    def wanted(self) -> list[str]:
        return [self.url_col, self.caption_col, *self.additional_columns]


def _check_columns(file: str, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in dict.fromkeys(wanted) if c not in names]
    if missing:
        found = ", ".join(printable(c) for c in names) or "none"
        raise ValueError(
            f"URL list {file!r} has no column {' or '.join(map(repr, missing))}; "
            f"columns found: {found} "
            "(choose them with --url-col / --caption-col / --save-additional-columns)"
        )


def file_info(
    fs: fsspec.AbstractFileSystem, file: str, url_col: str, caption_col: str, extras: list[str]
) -> tuple[int, dict[str, pa.DataType], bool, list[str]]:
    """(rows, extra column types, has malformed rows, column names) of one list file.

    Parquet: from its footer. The text formats must be parsed to be counted: a shard task or
    a planning task does that, not the driver (see plan_url_list's `map_files`).
    """
    wanted = [url_col, caption_col, *extras]
    if READERS[os.path.splitext(file)[1].lower()] == "parquet":
        try:
            with fs.open(file, "rb") as f:
                meta = pq.ParquetFile(f)
                sch, rows = meta.schema_arrow, meta.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(
                f"cannot read URL list {file!r} as parquet: {printable(err, 300)}"
            ) from err
        _check_columns(file, sch.names, wanted)
        return rows, {c: sch.field(c).type for c in extras}, False, sch.names
    table, bad = _read_one(fs, file, [url_col, caption_col])
    _check_columns(file, table.column_names, wanted)
    types = {c: table[c].type for c in extras}
    return table.num_rows + len(bad), types, bool(bad), table.column_names


def plan_url_list(
    path: str,
    url_col: str = "url",
    caption_col: str = "caption",
    additional_columns: tuple[str, ...] | list[str] = (),
    map_files=None,
) -> UrlList:
    """The list's files and row counts. `map_files(fn, args_list)` may run `file_info` for
    each file elsewhere (Ray tasks); by default it runs here."""
    clash = sorted(set(additional_columns) & (set(schema.SAMPLE.names) | set(schema.REJECT.names)))
    if clash:
        raise ValueError(
            f"--save-additional-columns: {', '.join(clash)} would overwrite the output column(s) "
            "of that name; rename them in the URL list"
        )
    fs, files = _list_inputs(path)
    args = [(fs, f, url_col, caption_col, list(additional_columns)) for f in files]
    infos = map_files(file_info, args) if map_files else [file_info(*a) for a in args]
    if sum(rows for rows, *_ in infos) == 0:
        raise ValueError(
            f"URL list {path!r} is empty: no rows to download "
            f"(columns found: {', '.join(printable(c) for c in infos[0][3])})"
        )
    extra_types = {}
    for c in additional_columns:
        # One type across files: the first file's, the others cast to it (or text if they differ).
        types = {types[c] for _, types, _, _ in infos}
        extra_types[c] = types.pop() if len(types) == 1 else pa.string()
    return UrlList(
        path=path,
        fs=fs,
        files=tuple(files),
        rows=tuple(rows for rows, *_ in infos),
        url_col=url_col,
        caption_col=caption_col,
        additional_columns=tuple(additional_columns),
        extra_types=extra_types,
        any_malformed=any(m for _, _, m, _ in infos),
    )


def _read_range(ul: UrlList, file: str, lo: int, hi: int) -> tuple[pa.Table, list]:
    """Rows [lo, hi) of one file as a table, and the malformed ones (position - lo, detail).

    Parquet reads only the row groups that hold the range; the text formats are parsed whole.
    """
    if READERS[os.path.splitext(file)[1].lower()] == "parquet":
        with ul.fs.open(file, "rb") as f:
            meta = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for g in range(meta.num_row_groups):
                n = meta.metadata.row_group(g).num_rows
                if offset + n > lo and offset < hi:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            if not groups:
                return meta.schema_arrow.empty_table().select(ul.wanted), []
            table = meta.read_row_groups(groups, columns=list(dict.fromkeys(ul.wanted)))
        return table.select(ul.wanted).slice(lo - first, hi - lo), []
    table, bad = _read_one(ul.fs, file, [ul.url_col, ul.caption_col])
    table = table.select(ul.wanted)
    # Positions among the file's rows: a malformed line holds its place as a row of its own.
    start = lo - sum(1 for p, _ in bad if p < lo)
    stop = hi - sum(1 for p, _ in bad if p < hi)
    return table.slice(start, stop - start), [(p - lo, d) for p, d in bad if lo <= p < hi]


def read_rows(ul: UrlList, start: int = 0, stop: int | None = None) -> pd.DataFrame:
    """Rows [start, stop) of the list (input positions, over all its files) as a DataFrame
    indexed by position: columns `url`, `caption`, the additional columns, and INPUT_REASON
    when some row's text is not UTF-8 or its line is malformed."""
    stop = len(ul) if stop is None else min(stop, len(ul))
    parts, offset = [], 0
    for file, rows in zip(ul.files, ul.rows, strict=True):
        lo, hi = max(start, offset) - offset, min(stop, offset + rows) - offset
        if lo < hi:
            parts.append(_read_range(ul, file, lo, hi))
        offset += rows
    n = stop - start
    reasons: list = [None] * n
    at = 0
    for table, bad in parts:
        for position, detail in bad:
            reasons[at + position] = (MALFORMED, detail)
        at += table.num_rows + len(bad)

    def gathered(column: str, text: bool = False, kind: pa.DataType | None = None) -> list:
        values = []
        for t, bad in parts:
            col = t[column] if kind is None else t[column].cast(kind, safe=False)
            got = _text_values(col) if text else col.to_pylist()
            values += _with_gaps(got, [position for position, _ in bad])
        return values

    columns: dict[str, list] = {}
    for key, column in (("url", ul.url_col), ("caption", ul.caption_col)):
        columns[key] = _as_text(gathered(column, text=True), key, reasons)
    for c in ul.additional_columns:
        values = gathered(c, kind=ul.extra_types[c])
        # Object dtype: a gap (None) must not turn an integer column into floats.
        index = pd.RangeIndex(start, stop)  # a Series is aligned on it, not taken in order
        columns[c] = pd.Series(values, dtype=object, index=index) if ul.any_malformed else values
    frame = pd.DataFrame(columns, index=pd.RangeIndex(start, stop))
    if any(reasons):
        frame[INPUT_REASON] = pd.Series(reasons, dtype=object, index=frame.index)
    frame.attrs["additional_types"] = dict(ul.extra_types)
    return frame


def read_url_list(
    path: str,
    url_col: str = "url",
    caption_col: str = "caption",
    additional_columns: tuple[str, ...] | list[str] = (),
) -> pd.DataFrame:
    """The whole URL list as a DataFrame, in file then row order (small lists, tests, tools:
    prepare itself plans the list and lets each shard task read its own rows).

    Columns: `url`, `caption`, the `additional_columns` under their own names, and
    INPUT_REASON when some row's text is not UTF-8. ``frame.attrs["additional_types"]``
    holds the extra columns' Arrow types.
    """
    frame = read_rows(plan_url_list(path, url_col, caption_col, additional_columns))
    frame.index = pd.RangeIndex(len(frame))
    return frame


_PEEK_BYTES = 1 << 20


def _peek_columns(fs: fsspec.AbstractFileSystem, file: str) -> tuple[list[str], bool]:
    """(column names, has a row) of a text list file from its first megabyte only."""
    kind = READERS[os.path.splitext(file)[1].lower()]
    with fs.open(file, "rb") as f:
        head = f.read(_PEEK_BYTES)
        more = bool(f.read(1))
    if more:  # the last line may be cut: keep whole lines only
        head = head[: head.rfind(b"\n") + 1] or head
    try:
        if kind == "json":
            lines = [line for line in head.splitlines() if line.strip()]
            table = pa_json.read_json(io.BytesIO(b"\n".join(lines[:100]) + b"\n"))
            return table.column_names, bool(lines) or more
        data, bad = _split_records(head, "\t" if kind == "tsv" else ",", kind == "csv")
        quote = {"quote_char": False} if kind == "tsv" else {}
        table = pa_csv.read_csv(
            io.BytesIO(data),
            parse_options=pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", **quote),
            convert_options=pa_csv.ConvertOptions(strings_can_be_null=True),
        )
        return table.column_names, table.num_rows + len(bad) > 0 or more
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read URL list {file!r} as {kind}: {printable(err, 300)}") from err


def _content_id(fs: fsspec.AbstractFileSystem, file: str) -> list:
    """A file's identity without reading it whole: its size, and an object store's ETag (the
    content's MD5 for a single upload) or else a hash of its first and last MiB (which holds a
    Parquet file's footer: row counts and column statistics). A copy under another name is the
    same input; a rewrite that keeps the size and both ends is not seen (rerun with --force)."""
    info = fs.info(file)
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return [size, str(etag)]
    digest = hashlib.sha256()
    with fs.open(file, "rb") as f:
        digest.update(f.read(_PEEK_BYTES))
        if size and size > 2 * _PEEK_BYTES:
            f.seek(size - _PEEK_BYTES)
        digest.update(f.read(_PEEK_BYTES))
    return [size, digest.hexdigest()]


def check_url_list(
    path: str,
    url_col: str = "url",
    caption_col: str = "caption",
    additional_columns: tuple[str, ...] | list[str] = (),
) -> str:
    """The checks worth making before Ray starts, from metadata and each file's first lines
    (never the whole list): it exists, its format, its columns, not empty. Returns the list's
    fingerprint, from each file's size and ETag or first and last MiB (_content_id)."""
    fs, files = _list_inputs(path)
    wanted = [url_col, caption_col, *additional_columns]
    rows, names, identity = 0, [], []
    for file in files:
        identity.append(_content_id(fs, file))
        if READERS[os.path.splitext(file)[1].lower()] == "parquet":
            n, _, _, cols = file_info(fs, file, url_col, caption_col, list(additional_columns))
        else:
            cols, has_rows = _peek_columns(fs, file)
            _check_columns(file, cols, wanted)
            n = int(has_rows)
        rows += n
        names = names or cols
    if rows == 0:
        raise ValueError(
            f"URL list {path!r} is empty: no rows to download "
            f"(columns found: {', '.join(printable(c) for c in names)})"
        )
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
