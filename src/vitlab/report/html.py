"""The compare report: one self-contained HTML file plus ``results.json``.

The report arranges result objects; it computes nothing. Each figure comes with one sentence on
what it shows and how to read it, and ``results.json`` holds every number that is plotted.
"""

from __future__ import annotations

import html
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ..analysis.catalog import REGISTRY
from ..analysis.curves import TrainingCurves
from ..analysis.registry import Analysis, AnalysisResults, Figure
from ..analysis.results import to_jsonable
from ..analysis.subjects import Subject
from ..io import atomic_write_bytes
from .figures import data_uri, figure_png

#: What the training-curves figure shows (the analyses' captions are in their registrations).
CURVES_CAPTION = (
    "Validation (solid) and training (dashed) accuracy after each epoch on the left, training loss "
    "on the right: a model near 1/classes learned nothing, and a widening gap between the lines "
    "means over-fitting."
)


@dataclass
class ReportMeta:
    """What the run was: shown at the top of the report and stored in ``results.json``."""

    title: str
    data: str
    command: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))


def model_rows(subjects: Sequence[Subject]) -> list[dict[str, Any]]:
    """One summary row per model: what the table shows and ``results.json`` stores."""
    rows = []
    for s in subjects:
        last = s.metrics[-1] if s.metrics else {}
        rows.append({
            "name": s.name,
            "model": s.model_name or s.name,
            "family": s.anatomy.family,
            "source": s.source,
            "supervision": s.supervision,
            "params": s.params,
            "val_acc": last.get("val_acc"),
            "epochs": int(last["epoch"]) if last else None,
            "train_time_s": last.get("time_s"),
            "train_images_per_s": last.get("images_per_s"),
        })
    return rows


def build_results(subjects: Sequence[Subject], analysis: AnalysisResults, meta: ReportMeta) -> dict[str, Any]:
    """The content of ``results.json``: every number the report plots or tabulates."""
    return to_jsonable({
        "meta": {
            "title": meta.title,
            "created": meta.created,
            "data": meta.data,
            "command": meta.command,
            "analysis_images": analysis.num_images,
            "timings_s": meta.timings,
            "python": platform.python_version(),
        },
        "models": model_rows(subjects),
        "training_curves": TrainingCurves({s.name: s.metrics for s in subjects if s.metrics}).to_dict(),
        **{name: {key: result.to_dict() for key, result in results.items()}
           for name, results in analysis.results.items()},
        "notes": analysis.notes,
    })


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "&ndash;"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "s":
        return f"{value:.0f} s"
    return html.escape(str(value))


def _figure(png: bytes, caption: str, alt: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(subjects: Sequence[Subject], analysis: AnalysisResults, meta: ReportMeta) -> str:
    """The report as one HTML page with every figure embedded."""
    parts = [f"<h1>{html.escape(meta.title)}</h1>",
             f"<p class=meta>Data: <b>{html.escape(meta.data)}</b> &middot; {analysis.num_images:,} images analysed "
             f"&middot; created {html.escape(meta.created)}"
             + (f" &middot; total time {meta.timings['total']:.0f} s" if "total" in meta.timings else "") + "</p>"]

    # --- models table ---------------------------------------------------------------------------
    head = ("<tr><th>model</th><th>family</th><th>source</th><th>supervision</th><th>parameters</th>"
            "<th>val. accuracy</th><th>epochs</th><th>training time</th><th>train images/s</th></tr>")
    body = "".join(
        f"<tr><td>{_fmt(r['name'], '')}</td><td>{_fmt(r['family'], '')}</td><td>{_fmt(r['source'], '')}</td>"
        f"<td>{_fmt(r['supervision'] or None, '')}</td>"
        f"<td class=num>{_fmt(r['params'], 'int')}</td><td class=num>{_fmt(r['val_acc'], 'pct')}</td>"
        f"<td class=num>{_fmt(r['epochs'], '')}</td><td class=num>{_fmt(r['train_time_s'], 's')}</td>"
        f"<td class=num>{_fmt(r['train_images_per_s'], '')}</td></tr>"
        for r in model_rows(subjects))
    parts.append(f"<h2>Models</h2><table>{head}{body}</table>")

    # --- training curves ------------------------------------------------------------------------
    curves = TrainingCurves({s.name: s.metrics for s in subjects if s.metrics})
    if curves.runs:
        png = figure_png(lambda axes: (curves.plot(axes[0], "val_acc"), curves.plot(axes[1], "train_loss")),
                         ncols=2, width=5.5, height=3.8)
        parts.append("<h2>Training</h2>" + _figure(png, CURVES_CAPTION, "training curves"))

    # --- every analysis, as its registration draws it ----------------------------------------------
    for registration in REGISTRY:
        results = analysis.results.get(registration.name)
        if results:
            parts += _sections(registration, results, analysis.num_images)

    if analysis.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in analysis.notes) + "</ul>")
    if meta.command:
        parts.append(f"<h2>Reproduce</h2><pre>{html.escape(meta.command)}</pre>"
                     "<p>Every number above is in <code>results.json</code> next to this file.</p>")
    return _PAGE.format(title=html.escape(meta.title), body="\n".join(parts))


def _sections(registration: Analysis, results: dict[str, Any], n: int) -> list[str]:
    """The report sections of one analysis: a heading, a figure with its caption, and any text."""
    out = []
    for figure in registration.figures:
        chosen = {key: r for key, r in results.items() if figure.select is None or figure.select(key, r)}
        if not chosen:
            continue
        title = figure.title or registration.title
        caption = figure.caption or registration.caption
        groups = [{key: r} for key, r in chosen.items()] if figure.arrange == "each" else [chosen]
        for group in groups:
            key = next(iter(group))
            heading = title.format(key=key)
            png = draw_figure(figure, list(group.values()))
            text = figure.text(list(group.values())) if figure.text else ""
            out.append(f"<h2>{html.escape(heading)}</h2>" + _figure(png, caption.format(n=n, key=key), heading)
                       + (f"<p>{html.escape(text)}</p>" if text else ""))
    return out


def draw_figure(figure: Figure, results: list[Any], dpi: int = 110) -> bytes:
    """One figure of ``results`` laid out as ``figure`` says, as PNG bytes."""
    height = figure.height(results) if callable(figure.height) else figure.height
    if figure.arrange == "panels":  # one axis per panel, every result drawn on each
        panels = figure.panels(results)
        return figure_png(lambda axes: [r.plot(ax, panel) for panel, ax in zip(panels, axes) for r in results],
                          ncols=len(panels), width=figure.width, height=height, dpi=dpi)
    if figure.arrange == "shared":  # one axis for all
        return figure_png(lambda axes: figure.draw(axes[0], results), width=figure.width, height=height, dpi=dpi)
    rows = figure.arrange == "rows"
    return figure_png(lambda axes: [r.plot(ax) for r, ax in zip(results, axes)], width=figure.width, height=height,
                      dpi=dpi, **({"nrows": len(results)} if rows else {"ncols": len(results)}))


def write_report(out_dir: str | Path, subjects: Sequence[Subject], analysis: AnalysisResults,
                 meta: ReportMeta) -> Path:
    """Write ``report.html`` and ``results.json`` into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = build_results(subjects, analysis, meta)
    atomic_write_bytes(out_dir / "results.json", json.dumps(results, indent=1, allow_nan=False).encode())
    report = out_dir / "report.html"
    atomic_write_bytes(report, render_html(subjects, analysis, meta).encode())
    return report


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1400px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ font-size: 1.6em; margin-bottom: .2em; }} h2 {{ font-size: 1.2em; margin-top: 1.8em;
       border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
.meta {{ color: #555; }} table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #e4e4e4; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #444; max-width: 60em; font-size: .95em; margin-top: .3em; }}
pre {{ background: #f5f5f5; padding: .6em; overflow-x: auto; }}
</style></head><body>
{body}
</body></html>
"""
