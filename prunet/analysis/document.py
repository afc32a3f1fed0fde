"""A small document model for reports: blocks rendered to Markdown and to self-contained HTML.

A report is a list of blocks (:class:`Heading`, :class:`Para`, :class:`Bullets`,
:class:`Table`, :class:`Image`, :class:`Pre`); :func:`render_markdown` and
:func:`render_html` turn the same list into either format, so the two never
disagree. The HTML needs no server and no network: images are embedded as
``data:`` URIs, the CSS is inline, every text is escaped, and a
Content-Security-Policy forbids any request.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # `code` spans allowed


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str  # one "l" or "r" per column

    @classmethod
    def from_markdown(cls, text: str) -> "Table":
        """A table from a Markdown pipe table (its alignment row gives ``align``)."""
        lines = [ln.strip() for ln in text.strip().splitlines()]
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
        align = "".join("r" if c.endswith(":") and not c.startswith(":") else "l" for c in cells[1])
        return cls(cells[0], cells[2:], align)


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Pre:
    text: str


Block = Union[Heading, Para, Bullets, Table, Image, Pre]


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The blocks as Markdown under a level-1 ``title``; images link to their files by name."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):

            def row(cells: Sequence[str]) -> str:
                return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"

            out.append(row(b.header))
            out.append("|" + "|".join("--:" if a == "r" else ":--" for a in b.align) + "|")
            out += [row(r) for r in b.rows] + [""]
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.path.name})", ""]
        elif isinstance(b, Pre):
            out += ["```", b.text.rstrip("\n"), "```", ""]
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 3em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
h3 { font-size: 1.05em; margin-top: 1.3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .25em .5em; }
div.wide { overflow-x: auto; }
th { background: #f3f5f7; }
td.r, th.r { text-align: right; white-space: nowrap; }
td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
tr:last-child td { font-weight: 600; }
table.plain tr:last-child td { font-weight: normal; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0 1em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8em; overflow-x: auto; font-size: .85em; }
code { background: #f0f2f4; padding: .1em .3em; border-radius: 3px; font-size: .9em; }
"""

# Nothing may be fetched: images are data: URIs and the style is inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_inline(text: str) -> str:
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The blocks as one self-contained HTML page; a table whose last row is a Total row shows it bold."""
    total_rows = {i for i, b in enumerate(blocks) if isinstance(b, Table) and b.rows and b.rows[-1][0] == "Total"}
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            cls = "" if i in total_rows else ' class="plain"'  # bold last row only for tables with a Total
            head = "".join(f'<th class="{a}">{e(c)}</th>' for c, a in zip(b.header, b.align))
            body = "".join(
                "<tr>" + "".join(f'<td class="{a}">{e(c)}</td>' for c, a in zip(r, b.align)) + "</tr>" for r in b.rows
            )
            # The wrapper scrolls a table wider than the page (a long sensitivity sweep) instead of the page.
            table = f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            out.append(f'<div class="wide">{table}</div>')
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Pre):
            out.append(f"<pre>{e(b.text)}</pre>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
