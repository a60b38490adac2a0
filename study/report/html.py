"""One self-contained HTML page for a study report: tables inline, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-style:italic}.caption{max-width:60em}"""


def embedded_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_page(title: str, summary: list[str], tables: dict[str, pd.DataFrame], figures: dict[str, Path],
              notes: list[str], captions: dict[str, str] | None = None) -> str:
    """``tables`` and ``figures`` are keyed by their heading / caption; ``captions`` (e.g. an ablation
    table's: what the cells and marks mean) follow the table of the same heading. Notes come last."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in summary]
    for heading, frame in tables.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(frame.to_html(index=False, border=0, na_rep="–", escape=True))
        if heading in (captions or {}):
            parts.append(f'<p class="caption">{html.escape(captions[heading])}</p>')
    for label, path in figures.items():
        parts.append(f'<figure><img alt="{html.escape(label)}" src="{embedded_png(path)}">'
                     f"<figcaption>{html.escape(label)}</figcaption></figure>")
    if notes:
        parts.append("<h2>Notes</h2>")
        parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")
