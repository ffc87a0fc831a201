"""Fuzzing the URL list readers (issue 15, item 4): every row is read or rejected with a
reason, never silently lost or merged into another; the only failure is a clear ValueError."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.prepare.inputs import INPUT_REASON, MALFORMED, read_url_list

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Text that breaks naive readers: quotes, separators, line ends, BOMs, nulls, escapes.
NASTY = st.sampled_from(
    ['"', "'", ",", "\t", "\n", "\r", "\r\n", "\ufeff", "\x00", "\\", "NA", " "]
)
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=8)), max_size=6).map("".join)
URL = st.one_of(st.just("http://example.com/a.jpg"), TEXT.map(lambda t: "http://x/" + t))


def _reasons(frame) -> list:
    return list(frame[INPUT_REASON]) if INPUT_REASON in frame else [None] * len(frame)


@FUZZ
@given(rows=st.lists(st.tuples(URL, TEXT), min_size=1, max_size=12), tsv=st.booleans())
def test_naively_written_lines_are_each_one_row(tmp_path, rows, tsv):
    """A writer that does not quote at all: each non-blank line after the header is exactly
    one row of the frame, read or flagged malformed_row; none swallows the next."""
    sep = "\t" if tsv else ","
    body = "url" + sep + "caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in rows)
    path = tmp_path / ("list.tsv" if tsv else "list.csv")
    path.write_bytes(body.encode("utf-8"))
    try:
        frame = read_url_list(str(path))
    except ValueError as err:  # only for a list with no data rows at all
        assert "is empty" in str(err)
        return
    lines = [line for line in body.encode().splitlines()[1:] if line.strip(b" \t")]
    assert len(frame) == len(lines)
    for (url, reason), line in zip(
        zip(frame["url"], _reasons(frame), strict=True), lines, strict=True
    ):
        if reason is not None and reason[0] == MALFORMED:
            assert url is None
        else:  # read: its URL is the line's first field, nothing of another line
            assert url is None or (url.encode() in line)


@FUZZ
@given(rows=st.lists(st.tuples(URL, TEXT), min_size=1, max_size=12), bom=st.booleans())
def test_quoted_csv_round_trips_every_single_line_row(tmp_path, rows, bom):
    """csv.writer's quoting: a row whose fields hold no line end comes back exactly; one that
    spans lines is one row per line, never merged with its neighbours."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["url", "caption"])
    writer.writerows(rows)
    path = tmp_path / "list.csv"
    path.write_bytes(("\ufeff" if bom else "").encode() + buf.getvalue().encode())
    try:
        frame = read_url_list(str(path))
    except ValueError as err:
        assert "is empty" in str(err)
        return
    read = [
        (u, c)
        for u, c, r in zip(frame["url"], frame["caption"], _reasons(frame), strict=True)
        if r is None
    ]
    clean = [(u or None, c or None) for u, c in rows if not any(ch in u + c for ch in "\r\n")]
    # Every single-line row is read back as written, in order; the lines of a row that spans
    # lines are each a row of their own (malformed, or a fragment the download rejects).
    rest = iter(read)
    assert all(row in rest for row in clean)
    lines = [line for line in path.read_bytes().splitlines()[1:] if line.strip(b" \t")]
    assert len(frame) == len(lines)
    flagged = [r for r in _reasons(frame) if r is not None]
    assert all(r[0] in (MALFORMED, "bad_url", "caption_not_utf8") for r in flagged)


@FUZZ
@given(
    values=st.lists(
        st.one_of(
            st.none(), TEXT, st.integers(), st.floats(allow_nan=True), st.lists(st.integers())
        ),
        min_size=1,
        max_size=10,
    )
)
def test_json_lines_of_any_type_are_read_or_refused_clearly(tmp_path, values):
    path = tmp_path / "list.jsonl"
    path.write_text("".join(json.dumps({"url": v, "caption": "c"}) + "\n" for v in values))
    try:
        frame = read_url_list(str(path))
    except ValueError as err:
        assert "cannot read URL list" in str(err) or "no column" in str(err)
        return
    assert len(frame) == len(values)
    for url, reason, value in zip(frame["url"], _reasons(frame), values, strict=True):
        if isinstance(value, str):
            assert url == value and reason is None
        elif value is not None and not (isinstance(value, float) and value != value):
            assert reason is not None and reason[0] == "bad_url"  # not text: never fetched


def test_parquet_strings_that_are_not_utf8_are_flagged_per_row(tmp_path):
    """Arrow does not validate UTF-8 on read: the bytes must not fail the whole list."""
    urls = pa.array([b"http://a/1", b"http://a/\xff", b"http://a/3"], pa.binary())
    table = pa.table({"url": urls.view(pa.string()), "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "list.parquet")
    frame = read_url_list(str(tmp_path / "list.parquet"))
    assert list(frame["url"])[::2] == ["http://a/1", "http://a/3"]
    assert [r and r[0] for r in _reasons(frame)] == [None, "bad_url", None]


@pytest.mark.parametrize("caption", ["NA", "null", "NaN", "#N/A"])
def test_captions_that_look_like_nulls_keep_their_text(tmp_path, caption):
    (tmp_path / "list.csv").write_text(f"url,caption\nhttp://a/1,{caption}\n")
    assert list(read_url_list(str(tmp_path / "list.csv"))["caption"]) == [caption]


def test_an_unclosed_quote_swallows_nothing(tmp_path):
    (tmp_path / "list.csv").write_text(
        'url,caption\nhttp://a/1,"unclosed\nhttp://a/2,fine\nhttp://a/3,"x"\nhttp://a/4,ok\n'
    )
    frame = read_url_list(str(tmp_path / "list.csv"))
    assert list(frame["url"]) == [None, "http://a/2", "http://a/3", "http://a/4"]
    assert list(frame["caption"])[1:] == ["fine", "x", "ok"]
    reason = _reasons(frame)[0]
    assert reason[0] == MALFORMED and reason[1].startswith("line 2: ")
