"""Draw the figure of every registered analysis for its documentation page.

    python docs/figures.py runs/compare-TIMESTAMP/vit_nano_patch8_sincos_32 \\
        runs/compare-TIMESTAMP/resnet20_cifar runs/compare-TIMESTAMP/mixer_nano_patch8_32

runs every analysis of :data:`vitlab.analysis.catalog.REGISTRY` on those runs (the three models
`vitlab compare` trains, by default) over 512 validation images of the default comparison data,
and writes ``docs/figures/<analysis>.png``: the first figure of each registration, drawn as the
report draws it. The docs build shows a page's figure when its file exists. The early exits and
the supervision comparison need runs of their own (an early-exit model, a self-supervised run):

    python docs/figures.py VIT_RUN MP3_RUN EARLY_EXIT_RUN \\
        --analyses early_exits,supervision,probes,attention_distance

(then restore the probes and attention-distance figures of the first command, or draw them last).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlab.analysis.catalog import REGISTRY
from vitlab.analysis.subjects import subject_from_run
from vitlab.analysis.suite import analysis_options, run_analyses
from vitlab.compare import analysis_loader, default_data
from vitlab.report.html import draw_figure

OUT = Path(__file__).parent / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (those of a vitlab compare)")
    parser.add_argument("--images", type=int, default=512, help="validation images analysed (default 512)")
    parser.add_argument("--analyses", help="run and draw only these, comma-separated, with any a derived one reads "
                                           "(default: every registered analysis)")
    args = parser.parse_args()
    subjects = [subject_from_run(run) for run in args.runs]
    data = default_data()
    loader = analysis_loader(data, args.images, 128)
    wanted = args.analyses.split(",") if args.analyses else [a.name for a in REGISTRY]
    results = run_analyses(
        subjects, loader, wanted, total=len(loader),
        options=analysis_options(featvis_steps=200, probe_images=2048),
        train_loader=lambda: analysis_loader(data, 10**9, 128, split="train"),
        trained_on={s.name: "shapes (random textures)" for s in subjects})
    OUT.mkdir(exist_ok=True)
    for analysis in (a for a in REGISTRY if a.name in wanted):
        found = results.results.get(analysis.name)
        if not found:
            print(f"{analysis.name}: no result ({'; '.join(n for n in results.notes if analysis.label in n)})")
            continue
        figure = analysis.figures[0]
        chosen = [r for key, r in found.items() if figure.select is None or figure.select(key, r)]
        if figure.arrange == "each":
            chosen = chosen[:1]
        (OUT / f"{analysis.name}.png").write_bytes(draw_figure(figure, chosen, dpi=80))
        print(f"{analysis.name}: {OUT / analysis.name}.png")


if __name__ == "__main__":
    main()
