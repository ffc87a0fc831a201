"""Text from the internet (URLs, host names, captions, server replies) made inert for display.

Such text never reaches something that interprets it as is: a terminal (escape sequences),
matplotlib (``$...$`` is mathtext), HTML or a log line (newlines forge lines). Parquet and JSON
store it verbatim; everything that shows it goes through here.
"""

from __future__ import annotations

import html

LIMIT = 80  # characters shown of one value: a host name may be 253, a caption far longer


def printable(text: object, limit: int = LIMIT) -> str:
    """One line of visible characters: controls and other unprintables as \\x.. / \\u.. escapes,
    cut to ``limit`` characters with an ellipsis."""
    out = []
    for ch in str(text):
        if ch.isprintable():
            out.append(ch)
        else:  # the escape repr() would write: \x1b, \n, \u200b, ...
            out.append(repr(ch)[1:-1] if ch not in "'\"" else ch)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_label(text: object, limit: int = LIMIT) -> str:
    """printable(), with matplotlib's mathtext switched off: every ``$`` is a dollar sign."""
    return printable(text, limit).replace("$", r"\$")


def html_text(text: object, limit: int = LIMIT) -> str:
    """printable(), escaped for HTML element content and attribute values."""
    return html.escape(printable(text, limit), quote=True)
