"""The HTML of a study report: its images (written beside the page and inlined), escaping, tables and
cells, and the document around them.
"""
from __future__ import annotations

import base64
import html
import numbers
import re
from pathlib import Path

import pandas as pd


class Page:
    """Images of the page: written under ``root/images`` and inlined as data URIs."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.images.mkdir()

    def img(self, path: Path, alt: str, source: str = "") -> str:
        """An <img> of the PNG at ``path`` (already under images/), inlined; ``source`` names its origin."""
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        rel = path.relative_to(self.root).as_posix()
        origin = f' data-artifact="{esc(source)}"' if source else ""
        return (f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}" data-file="{esc(rel)}"{origin}>')

    def figure(self, path: Path, caption: str, source: str = "", wide: bool = False) -> str:
        cls = ' class="wide"' if wide else ""
        image = self.img(path, caption, source)
        return f"<figure{cls}>{image}<figcaption>{esc(caption)}</figcaption></figure>"


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def table(head: list[str], rows: list[list[str]], cls: str, id_: str, data: dict | None = None) -> str:
    """Rows hold HTML already escaped: plain cells, or whole ``<td>`` / ``<th>`` elements."""
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in (data or {}).items())
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
                   + "</tr>" for row in rows)
    return (f'<table class="{cls}" id="{esc(id_)}"{attrs}><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def count_cell(value: int, name: str) -> str:
    return f'<td data-count="{name}">{esc(value)}</td>'


def cell_text(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and pd.notna(value)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name)) or "run"


def document(title: str, body: str) -> str:
    """The page around ``body`` (both escaped already)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


CSS = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 1.5rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 small { font-weight: normal; color: #666; font-size: 60%; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 90%; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.wide { display: block; overflow-x: auto; }
td[data-metric] { font-variant-numeric: tabular-nums; white-space: nowrap; }
.meta, .note { color: #555; font-size: 90%; }
li.holds::marker { content: "✔ "; color: #1a7f37; }
li.fails::marker { content: "✘ "; color: #cf222e; }
li.unknown::marker { content: "? "; color: #888; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top;
         max-width: min(100%, 520px); }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.wide { max-width: 100%; }
table.sweeps th:first-child { white-space: nowrap; }
.summary { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem 1rem; }
figcaption { font-size: 85%; color: #555; }
section.run { border-top: 1px dashed #ccc; margin-top: 1rem; }
"""
