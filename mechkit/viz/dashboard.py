"""One self-contained HTML file for a run's results: a section per result, the run's metadata.

plotly.js is embedded once (``include_plotlyjs=True`` on the first figure), so the file works
with no network.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import atomic_path

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} .meta{color:#555;font-size:.9rem} section{margin:2rem 0;border-top:1px solid #ddd;padding-top:1rem}
table.meta{border-collapse:collapse} table.meta td{padding:.15rem .8rem .15rem 0;vertical-align:top}
.note{color:#444;font-size:.95rem;max-width:900px}
"""


def _figure_of(item: Any):
    if hasattr(item, "to_html"):
        return item
    if hasattr(item, "figure"):
        return item.figure()
    raise TypeError(f"dashboard sections take Plotly figures or objects with .figure(); got {type(item).__name__}")


def dashboard(
    results: Mapping[str, Any],
    path: str | Path,
    title: str = "mechkit results",
    metadata: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
) -> Path:
    """Write ``results`` (section title -> figure or result) to one offline HTML file at ``path``.

    ``metadata``: shown as a table (model, task, method, timings...); mechkit's version and the
    date are added. ``notes``: optional text under a section. Returns the path.
    """
    from .._version import __version__

    meta = {"mechkit version": __version__, "date": _dt.datetime.now().isoformat(timespec="seconds")}
    meta.update(metadata or {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>", "<table class='meta'>"]
    parts += [f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()]
    parts.append("</table>")
    first = True
    for i, (name, item) in enumerate(results.items()):
        fig = _figure_of(item)
        parts.append(f"<section id='section-{i}'><h2>{html.escape(name)}</h2>")
        if notes and name in notes:
            parts.append(f"<p class='note'>{html.escape(notes[name])}</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 div_id=f"fig-{i}", config={"displaylogo": False}))
        parts.append("</section>")
        first = False
    parts.append("</body></html>")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
