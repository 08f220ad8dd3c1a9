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

from ..analysis.curves import TrainingCurves
from ..analysis.results import to_jsonable
from ..analysis.subjects import Subject
from ..analysis.suite import AnalysisResults
from ..analysis.supervision import compare_supervision
from ..io import atomic_write_bytes
from .figures import data_uri, figure_png

CAPTIONS = {
    "supervision": (
        "The same comparison for runs trained with different supervision, against relative depth (0: first block, "
        "1: last): on the left the k-NN accuracy of each layer's features (the probes analysis), on the right each "
        "layer's mean attention distance; Walmer et al. found reconstruction-trained ViTs' best features mid-network "
        "and label- or distillation-trained ones' at the end."
    ),
    "early_exits": (
        "Accuracy against compute of each early-exit model on {n} images, one point per confidence threshold "
        "(an image leaves at the first exit whose top probability reaches it; 'off' never exits early): points "
        "up and to the left are better, and the curve's flat part is compute the exits save for free."
    ),
    "curves": (
        "Validation (solid) and training (dashed) accuracy after each epoch on the left, training loss "
        "on the right: a model near 1/classes learned nothing, and a widening gap between the lines "
        "means over-fitting."
    ),
    "cka_self": (
        "Linear CKA (minibatch, unbiased HSIC over {n} validation images) between every pair of layers "
        "of one model, where a bright cell means two layers hold similar representations (Raghu et al. "
        "found ViTs alike across depth and ResNets split into blocks by stage)."
    ),
    "cka_cross": (
        "Linear CKA between the layers of two models (rows: first model, columns: second), where a "
        "bright diagonal band means both compute similar representations in the same order and "
        "brightness off it shows a layer matching another depth of the other model."
    ),
    "attention_distance": (
        "Each dot is one head's mean distance in pixels between a query patch and the patches it "
        "attends to (attention-weighted, class token excluded, over {n} images): low dots are local, "
        "convolution-like heads, dots near the dashed line global (Raghu et al.: early layers mix both "
        "only when trained on enough data)."
    ),
    "attention_heads": (
        "Each head's attention averaged over queries and images and re-centred on the query (layers as rows, "
        "heads as columns), outlined blue when local, orange when offset-local (it looks at one neighbour in a "
        "fixed direction) and green when global, by vitlab's documented rule (after Walmer et al.)."
    ),
    "skip_connections": (
        "The norm of the residual stream divided by the norm of what each branch adds, against depth, for the "
        "spatial tokens (solid) and the class token (dashed): above 1 the skip connection dominates and the block "
        "changes the representation little (Raghu et al.)."
    ),
    "localisation": (
        "For a 3x3 selection of token positions (circled), the CKA over {n} images between the token at that "
        "position of the named layer and every input patch: a bright spot on the circle means the token still "
        "describes its own patch (Raghu et al. found this for class-token ViTs, less for pooled ones)."
    ),
    "probes": (
        "Held-out accuracy after every layer of closed-form ridge probes on the class token, the token average "
        "and the centre token, and of a weighted 20-nearest-neighbour probe, fitted on training images, with "
        "each probe's best layer ringed: it shows at what depth the class becomes decodable."
    ),
    "robustness": (
        "Accuracy of every model when random patches, the most attended patches (salient) or all but them "
        "(non-salient) are blacked out before normalisation, and when the image is cut into g x g shuffled "
        "patches (Naseer et al. found ViTs degrade more gracefully than CNNs)."
    ),
    "shape_bias": (
        "The share of shape decisions among cue decisions on cue-conflict images (one class's shape filled "
        "with another's texture), 1 meaning shape only and 0 texture only; it is informative for models trained "
        "where both cues predict the class (shapes with match textures, or ImageNet)."
    ),
    "feature_visualisation": (
        "Images optimised from noise to excite single MLP hidden units with Ghiasi et al.'s recipe (Adam, "
        "augmented copies, total-variation penalty), one row per block, early blocks first."
    ),
    "erf": (
        "The gradient of each layer's centre output with respect to the input, averaged over images and scaled "
        "to its peak, with the radius that holds half of it under each map: a CNN's receptive field grows with "
        "depth while a ViT's can span the image from its first blocks."
    ),
    "feature_reuse": (
        "CKA between the same layer of two versions of one model (solid) and how far its weights moved, "
        "||W_a - W_b|| / ||W_b|| (dashed), against depth: layers with high CKA and small changes were reused, "
        "the others relearned (Matsoukas et al.)."
    ),
    "conv_attention": (
        "A stride-1 convolution of each model rebuilt exactly as one multi-head self-attention layer over "
        "patches (Li et al.): each tile shows where one head attends around the query patch, and the title the "
        "largest difference from the convolution's own output."
    ),
}

#: Section titles of the analyses beyond CKA and attention distance, in report order.
SECTIONS = {
    "attention_heads": "Attention heads: local, offset-local, global",
    "skip_connections": "Skip connections",
    "localisation": "Spatial localisation",
    "probes": "Layer probes",
    "robustness": "Robustness to occlusion and shuffling",
    "shape_bias": "Shape bias",
    "feature_visualisation": "Feature visualisation",
    "erf": "Effective receptive field",
    "feature_reuse": "Feature reuse",
    "conv_attention": "Convolution as attention",
    "early_exits": "Early exits: accuracy against compute",
}


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
        "cka": {key: result.to_dict() for key, result in analysis.cka.items()},
        "attention_distance": {key: result.to_dict() for key, result in analysis.attention_distance.items()},
        **{name: {key: result.to_dict() for key, result in results.items()}
           for name, results in analysis.results.items()},
        **({"supervision": comparison.to_dict()} if (comparison := compare_supervision(
            {s.name: s.supervision for s in subjects if s.supervision}, analysis)) is not None else {}),
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
    head = ("<tr><th>model</th><th>family</th><th>source</th><th>supervision</th><th>parameters</th><th>val. accuracy</th>"
            "<th>epochs</th><th>training time</th><th>train images/s</th></tr>")
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
        parts.append("<h2>Training</h2>" + _figure(png, CAPTIONS["curves"], "training curves"))

    # --- CKA ------------------------------------------------------------------------------------
    n = analysis.num_images
    selfs = [r for r in analysis.cka.values() if r.model_a == r.model_b]
    crosses = [r for r in analysis.cka.values() if r.model_a != r.model_b]
    if selfs:
        png = figure_png(lambda axes: [r.plot(ax) or ax.set_title(r.model_a) for r, ax in zip(selfs, axes)],
                         ncols=len(selfs), width=4.6, height=4.0)
        parts.append("<h2>Representation similarity within each model</h2>"
                     + _figure(png, CAPTIONS["cka_self"].format(n=n), "CKA within models"))
    if crosses:
        png = figure_png(lambda axes: [r.plot(ax) or ax.set_title(f"{r.model_a} vs {r.model_b}")
                                       for r, ax in zip(crosses, axes)],
                         ncols=len(crosses), width=4.6, height=4.0)
        parts.append("<h2>Representation similarity across models</h2>"
                     + _figure(png, CAPTIONS["cka_cross"], "CKA across models"))

    # --- attention distance ---------------------------------------------------------------------
    for name, result in analysis.attention_distance.items():
        png = figure_png(lambda axes, r=result: r.plot(axes[0]), width=6.0, height=4.0)
        parts.append(f"<h2>Attention distance: {html.escape(name)}</h2>"
                     + _figure(png, CAPTIONS["attention_distance"].format(n=n), f"attention distance of {name}"))

    # --- every further analysis ------------------------------------------------------------------
    for name, title in SECTIONS.items():
        results = analysis.results.get(name)
        if results:
            png = _draw_analysis(name, list(results.values()))
            parts.append(f"<h2>{html.escape(title)}</h2>" + _figure(png, CAPTIONS[name].format(n=n), title))

    # --- what supervision changes (runs trained with different objectives) -------------------------
    supervision = compare_supervision({s.name: s.supervision for s in subjects if s.supervision}, analysis)
    if supervision is not None:
        png = figure_png(lambda axes: supervision.plot(axes), ncols=2, width=5.5, height=4.0)
        parts.append("<h2>What supervision changes</h2>" + _figure(png, CAPTIONS["supervision"], "supervision")
                     + (f"<p>{html.escape(supervision.summary())}</p>" if supervision.summary() else ""))

    if analysis.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in analysis.notes) + "</ul>")
    if meta.command:
        parts.append(f"<h2>Reproduce</h2><pre>{html.escape(meta.command)}</pre>"
                     "<p>Every number above is in <code>results.json</code> next to this file.</p>")
    return _PAGE.format(title=html.escape(meta.title), body="\n".join(parts))


def _draw_analysis(name: str, results: list[Any]) -> bytes:
    """One figure for every result of an analysis: models side by side, or together on shared axes."""
    if name == "robustness":  # one panel per test, every model's curve on it
        tests = list(dict.fromkeys(t for r in results for t in r.curves))
        return figure_png(lambda axes: [r.plot(ax, test) for test, ax in zip(tests, axes) for r in results],
                          ncols=len(tests), width=4.2, height=3.6)
    if name == "shape_bias":
        from ..analysis.shape_bias import plot_shape_bias

        return figure_png(lambda axes: plot_shape_bias(axes[0], results), width=7.0, height=1.0 + 0.7 * len(results))
    if name == "erf":  # a strip of maps per model, one row each
        return figure_png(lambda axes: [r.plot(ax) for r, ax in zip(results, axes)], nrows=len(results),
                          width=10.0, height=2.3)
    if name in ("feature_visualisation", "attention_heads"):  # image grids: side by side, sized by their grids
        rows = max(len(dict.fromkeys(r.layers)) for r in results)
        return figure_png(lambda axes: [r.plot(ax) for r, ax in zip(results, axes)], ncols=len(results),
                          width=4.5 if name == "attention_heads" else 3.5, height=1.0 + 0.8 * rows)
    return figure_png(lambda axes: [r.plot(ax) for r, ax in zip(results, axes)], ncols=len(results),
                      width=4.8, height=4.0)


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
