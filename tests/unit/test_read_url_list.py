"""pipeline.data.prepare.read_url_list: every input format of DESIGN.md, and its error messages."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.prepare import read_url_list

ROWS = [
    ("http://example.com/a.jpg", "a red circle"),
    ("http://example.com/b.jpg?size=large&x=1", "two blue stars, side by side"),
    ("https://example.org/c%20d.png", "caption with a\ttab"),
]


def _as_pairs(frame: pd.DataFrame) -> list[tuple]:
    assert list(frame.columns) == ["url", "caption"]
    assert list(frame.index) == list(range(len(frame)))
    return list(frame.itertuples(index=False, name=None))


def write(path, rows, fmt=None, url_col="url", caption_col="caption"):
    fmt = fmt or path.suffix.lstrip(".")
    urls = [u for u, _ in rows]
    caps = [c for _, c in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.table({url_col: urls, caption_col: caps, "extra": [1] * len(rows)}), path)
    elif fmt in ("csv", "tsv"):
        frame = pd.DataFrame({"extra": list(range(len(rows))), url_col: urls, caption_col: caps})
        frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    elif fmt in ("jsonl", "json"):
        path.write_text(
            "".join(json.dumps({url_col: u, caption_col: c, "n": 1}) + "\n" for u, c in rows)
        )
    else:
        raise AssertionError(fmt)
    return path


CSV_ROWS = [r for r in ROWS if "\t" not in r[1]] + [
    ("http://example.com/q.jpg", 'a "quoted", comma caption'),
]
TSV_ROWS = [r for r in ROWS if "\t" not in r[1]] + [
    ("http://example.com/t.jpg", "commas, not tabs, here"),
]


@pytest.mark.parametrize(
    "name, rows",
    [
        ("urls.parquet", ROWS),
        ("urls.csv", CSV_ROWS),
        ("urls.tsv", TSV_ROWS),
        ("urls.jsonl", ROWS),
        ("URLS.JSON", ROWS),  # extensions are case-insensitive; .json holds JSON lines
    ],
)
def test_reads_each_format(tmp_path, name, rows):
    path = write(tmp_path / name, rows, fmt=name.split(".")[-1].lower())
    assert _as_pairs(read_url_list(str(path))) == rows


def test_folder_of_mixed_files_in_sorted_order(tmp_path):
    folder = tmp_path / "list"
    write(folder / "b.csv", [("http://h/b1", "bee one"), ("http://h/b2", "bee two")])
    write(folder / "a.parquet", [("http://h/a1", "ay one")])
    write(folder / "sub" / "c.jsonl", [("http://h/c1", "cee one")])
    write(folder / "aa.tsv", [("http://h/aa1", "double ay")])
    (folder / "README.md").write_text("not a url list\n")
    (folder / "notes.txt").write_text("url,caption\nhttp://h/x,ignored\n")
    got = _as_pairs(read_url_list(str(folder)))
    # Files sorted by path ("a.parquet" < "aa.tsv" < "b.csv" < "sub/c.jsonl"), rows in file order.
    assert got == [
        ("http://h/a1", "ay one"),
        ("http://h/aa1", "double ay"),
        ("http://h/b1", "bee one"),
        ("http://h/b2", "bee two"),
        ("http://h/c1", "cee one"),
    ]


def test_custom_column_names(tmp_path):
    pq_path = write(tmp_path / "l.parquet", ROWS, url_col="URL", caption_col="TEXT")
    assert _as_pairs(read_url_list(str(pq_path), url_col="URL", caption_col="TEXT")) == ROWS
    csv_path = write(tmp_path / "l.csv", CSV_ROWS, url_col="image_url", caption_col="alt")
    got = read_url_list(str(csv_path), url_col="image_url", caption_col="alt")
    assert _as_pairs(got) == CSV_ROWS


def test_values_become_strings_or_none(tmp_path):
    # An all-numeric caption column without gaps is inferred as integers by the CSV reader.
    path = tmp_path / "l.csv"
    path.write_text("url,caption\nhttp://h/1,12345\nhttp://h/2,7\n")
    got = read_url_list(str(path))
    assert got["caption"].tolist() == ["12345", "7"]
    # An empty string cell stays falsy (pyarrow reads it as ""), which prepare treats as missing.
    path.write_text("url,caption\nhttp://h/1,\n,an orphan caption\n")
    got = read_url_list(str(path))
    assert not got["caption"][0] and not got["url"][1]
    assert got["url"][0] == "http://h/1" and got["caption"][1] == "an orphan caption"
    table = pa.table({"url": ["http://h/1", None], "caption": [None, "x y"]})
    pq.write_table(table, tmp_path / "n.parquet")
    got = read_url_list(str(tmp_path / "n.parquet"))
    assert got["url"].tolist() == ["http://h/1", None]
    assert got["caption"].tolist() == [None, "x y"]


@pytest.mark.parametrize(
    "captions",
    [["12345", None, "7"], ["007", "42"]],
    ids=["integers-with-a-gap", "leading-zeros"],
)
def test_numeric_looking_captions_keep_their_text(tmp_path, captions):
    path = tmp_path / "l.csv"
    lines = [f"http://h/{i},{c or ''}" for i, c in enumerate(captions)]
    path.write_text("url,caption\n" + "\n".join(lines) + "\n")
    assert read_url_list(str(path))["caption"].tolist() == captions


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "urls.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_url_list(str(missing))


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    path = write(tmp_path / "l.parquet", ROWS, url_col="link", caption_col="caption")
    with pytest.raises(ValueError) as info:
        read_url_list(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "'url'" in message
    assert "'caption'" not in message  # present, so not reported missing
    for found in ("link", "caption", "extra"):
        assert found in message
    assert "--url-col" in message

    with pytest.raises(ValueError, match="'text'") as info:
        read_url_list(str(path), url_col="link", caption_col="text")
    assert "'link'" not in str(info.value).split("columns found")[0]


def test_missing_column_in_one_file_of_a_folder_names_that_file(tmp_path):
    folder = tmp_path / "list"
    write(folder / "a.csv", [("http://h/a", "ay one")])
    bad = write(folder / "b.jsonl", [("http://h/b", "bee")], caption_col="alt")
    with pytest.raises(ValueError) as info:
        read_url_list(str(folder))
    assert str(bad) in str(info.value)
    assert "'caption'" in str(info.value) and "alt" in str(info.value)


def test_empty_list(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": []}), path)
    with pytest.raises(ValueError, match="is empty"):
        read_url_list(str(path))
    csv = tmp_path / "empty.csv"
    csv.write_text("url,caption\n")
    with pytest.raises(ValueError, match=re.escape(f"{str(csv)!r} is empty")):
        read_url_list(str(csv))


def test_folder_without_url_list_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(ValueError, match="holds no") as info:
        read_url_list(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "urls.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="unknown format") as info:
        read_url_list(str(path))
    message = str(info.value)
    assert str(path) in message
    for ext in (".parquet", ".csv", ".tsv", ".jsonl"):
        assert ext in message


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("bad.parquet", b"PAR1 this is not parquet at all", "parquet"),
        ("cut.parquet", None, "parquet"),  # a real file cut in half
        ("bad.jsonl", b'{"url": "http://h/a", "caption": "ok"}\n{"url": \n', "json"),
    ],
)
def test_unreadable_file(tmp_path, name, content, kind):
    path = tmp_path / name
    if content is None:
        whole = write(tmp_path / "whole.parquet", ROWS * 50).read_bytes()
        content = whole[: len(whole) // 2]
        (tmp_path / "whole.parquet").unlink()
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_url_list(str(path))
    message = str(info.value)
    assert message.startswith(f"cannot read URL list {str(path)!r} as {kind}: ")
    assert len(message) > len(f"cannot read URL list {str(path)!r} as {kind}: ")  # cause kept
    assert info.value.__cause__ is not None


def test_additional_columns_keep_their_values_and_types(tmp_path):
    path = tmp_path / "urls.parquet"
    table = pa.table(
        {
            "url": ["http://e.com/a.jpg", "http://e.com/b.jpg"],
            "caption": ["a cat", "a dog"],
            "uid": pa.array([7, None], pa.int64()),
            "license": ["cc-by", "cc0"],
        }
    )
    pq.write_table(table, path)
    frame = read_url_list(str(path), additional_columns=("uid", "license"))
    assert list(frame.columns[:4]) == ["url", "caption", "uid", "license"]
    assert frame["license"].tolist() == ["cc-by", "cc0"]
    assert frame["uid"].tolist()[0] == 7 and pd.isna(frame["uid"].tolist()[1])
    assert frame.attrs["additional_types"] == {"uid": pa.int64(), "license": pa.string()}


def test_missing_additional_column_names_file_and_columns(tmp_path):
    path = write(tmp_path / "urls.jsonl", ROWS)
    with pytest.raises(ValueError) as err:
        read_url_list(str(path), additional_columns=("uid",))
    message = str(err.value)
    assert "urls.jsonl" in message and "'uid'" in message
    assert "columns found: url, caption, n" in message
    assert "--save-additional-columns" in message


def test_additional_column_may_not_shadow_an_output_column(tmp_path):
    path = write(tmp_path / "urls.parquet", ROWS)
    with pytest.raises(ValueError, match="'?jpg'?.*overwrite|overwrite.*jpg"):
        read_url_list(str(path), additional_columns=("jpg",))


def test_caption_that_is_not_utf8_is_flagged_not_fatal(tmp_path):
    from pipeline.data.prepare.inputs import INPUT_REASON

    path = tmp_path / "urls.csv"
    path.write_bytes(
        b"url,caption\n"
        b"http://e.com/a.jpg,caf\xe9 latin-1\n"  # one bad row must not refuse the whole file
        b"http://e.com/b.jpg,caf\xc3\xa9 utf-8\n"
    )
    frame = read_url_list(str(path))
    assert frame["caption"].tolist() == ["caf\ufffd latin-1", "caf\u00e9 utf-8"]
    flags = frame[INPUT_REASON].tolist()
    assert flags[0][0] == "caption_not_utf8" and flags[1] is None


def test_any_slice_of_a_planned_list_equals_that_slice_of_the_whole(tmp_path):
    """Shard tasks read their own rows: every slice, across files and malformed lines, is the
    same rows (values, flags, positions) as reading the whole list and slicing it."""
    from pipeline.data.prepare.inputs import INPUT_REASON, plan_url_list, read_rows

    folder = tmp_path / "list"
    folder.mkdir()
    lines = [b"url,caption,n"]
    for i in range(23):
        lines.append(f"http://example.com/{i}.jpg,a caption {i},{i}".encode())
    lines[5] = b'http://example.com/bad.jpg,"an open quote,5'  # malformed: a row of its own
    lines[9] = b"http://example.com/\xff.jpg,not utf-8 url,9"
    (folder / "a.csv").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(
        pa.table({"url": [f"http://x.org/{i}" for i in range(17)], "caption": ["c d"] * 17,
                  "n": list(range(17))}),
        folder / "b.parquet", row_group_size=4,
    )  # fmt: skip
    plan = plan_url_list(str(folder), additional_columns=["n"])
    whole = read_url_list(str(folder), additional_columns=["n"])
    assert len(plan) == len(whole) == 23 + 17
    assert whole[INPUT_REASON].notna().sum() == 2
    for start, stop in [(0, 40), (0, 7), (3, 11), (20, 27), (22, 23), (25, 31), (39, 40)]:
        part = read_rows(plan, start, stop)
        assert list(part.index) == list(range(start, stop))
        expected = whole.iloc[start:stop]
        for column in ("url", "caption", "n"):
            assert part[column].tolist() == expected[column].tolist(), (start, stop, column)
        flags = part[INPUT_REASON].tolist() if INPUT_REASON in part else [None] * len(part)
        assert flags == expected[INPUT_REASON].tolist(), (start, stop)
