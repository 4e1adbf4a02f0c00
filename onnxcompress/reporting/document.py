"""The report as a list of blocks (heading, paragraph, table, image) and its two renderings,
GitHub-flavoured Markdown (images linked by relative path) and a self-contained HTML page
(images embedded as ``data:`` URIs)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Heading", "Para", "Table", "Image", "Block", "render_markdown", "render_html"]


@dataclass
class Heading:
    """A section heading."""

    level: int
    text: str


@dataclass
class Para:
    """A paragraph of plain text; spans in backticks are code."""

    text: str


@dataclass
class Table:
    """A table; ``right`` lists the right-aligned column indices."""

    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)


@dataclass
class Image:
    """A PNG: ``file`` next to the document (Markdown links it), ``data`` its bytes (HTML embeds them)."""

    file: str
    alt: str
    data: bytes = b""


Block = Heading | Para | Table | Image

_CODE = re.compile(r"`([^`]*)`")


def _md_text(text: str, in_table: bool = False) -> str:
    parts = _CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"`{part}`")
            continue
        part = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part.replace("\\", "\\\\").replace("*", "\\*"))
        out.append(re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", part))
    joined = "".join(out)
    return joined.replace("|", "\\|") if in_table else joined


def render_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown of ``blocks``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            out.append(_md_text(b.text))
        elif isinstance(b, Image):
            out.append(f"![{_md_text(b.alt)}]({b.file})")
        else:
            out.append(_md_table(b))
    return "\n\n".join(out) + "\n"


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_text(h, True) for h in t.headers) + " |",
             "|" + "|".join("---:" if i in t.right else "---" for i in range(len(t.headers))) + "|"]
    lines += ["| " + " | ".join(_md_text(c, True) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _html_text(text: str) -> str:
    parts = _CODE.split(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
        "th,td{border:1px solid #ccc;padding:.25rem .5rem;vertical-align:top}th{background:#f3f3f3}"
        "td.r,th.r{text-align:right}code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page of ``blocks``: images with ``data`` are embedded as ``data:`` URIs."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_html_text(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_text(b.text)}</p>")
        elif isinstance(b, Image):
            body.append(f'<p><img src="{_image_src(b)}" alt="{html.escape(b.alt)}"></p>')
        else:
            body.append(_html_table(b))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _image_src(image: Image) -> str:
    if image.data:
        return "data:image/png;base64," + base64.b64encode(image.data).decode("ascii")
    return html.escape(image.file)


_RIGHT = ' class="r"'


def _html_table(t: Table) -> str:
    def cells(row: list[str], tag: str) -> str:
        return "".join(f"<{tag}{_RIGHT if i in t.right else ''}>{_html_text(c)}</{tag}>" for i, c in enumerate(row))
    rows = [f"<tr>{cells(r, 'td')}</tr>" for r in t.rows]
    head = f"<table>\n<thead><tr>{cells(t.headers, 'th')}</tr></thead>\n<tbody>\n"
    return head + "\n".join(rows) + "\n</tbody>\n</table>"
