"""Text from URLs and servers reaches the terminal and funnel.png inert (issue 15, item 1)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.prepare.funnel import build_stats, format_funnel, plot_funnel
from pipeline.data.untrusted import html_text, plot_label, printable

# Host names as urlsplit() returns them from a hostile list: mathtext, escapes, newlines.
HOSTILE = [
    r"$\undefinedmacro{x}$.example",
    "a$b$c$.example",
    r"$\frac{1}{$.example",
    "\x1b[2J\x1b[31mred.example",
    "line\nbreak.example",
    "bell\x07\u202etxt.example",
]


def _stats() -> dict:
    marker = {
        "rows": 10,
        "samples": 10 - len(HOSTILE),
        "rejects": len(HOSTILE),
        "drops": {"download": {"dns_error": len(HOSTILE)}},
        "domains": {d: {"dns_error": 1} for d in HOSTILE},
        "seconds": {},
    }
    return build_stats([marker], 1.0, 10)


def test_funnel_png_draws_hostile_host_names(tmp_path):
    path = tmp_path / "funnel.png"
    plot_funnel(_stats(), path)  # mathtext parsing of "$\undefinedmacro$" used to raise here
    with Image.open(path) as im:
        assert im.size[0] > 100


def test_terminal_table_has_no_control_characters():
    text = format_funnel(_stats())
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text  # shown, escaped
    assert len(text.splitlines()) == len(format_funnel(_stats()).splitlines())
    assert not any("break.example" in line and "line" not in line for line in text.splitlines())


@settings(max_examples=100, deadline=None)
@given(st.text(), st.integers(min_value=2, max_value=200))
def test_printable_is_one_visible_line_within_the_limit(text, limit):
    out = printable(text, limit)
    assert out.isprintable() and len(out) <= limit
    if text.isprintable() and len(text) <= limit:
        assert out == text  # ordinary text is shown as it is
    assert "$" not in plot_label(text, limit).replace(r"\$", "")
    assert "<" not in html_text(text, limit) and '"' not in html_text(text, limit)
