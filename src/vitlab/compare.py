"""``compare`` and ``analyze``: the toolkit's main jobs as Python functions (the CLI wraps them).

:func:`compare` trains a ViT, a CNN and an MLP-Mixer on the same data, analyses them side by side
and writes ``report.html`` and ``results.json``. :func:`analyze` does the analysis and report for
existing run directories or registered model names.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import distributed
from .analysis.catalog import REGISTRY
from .analysis.registry import AnalysisResults, RunOptions
from .analysis.subjects import Subject, load_subject, subject_from_run
from .analysis.suite import check_analyses, run_analyses
from .analysis.supervision import is_self_supervised
from .config import Optim, TrainConfig
from .data import DataConfig, build_dataset
from .errors import VitlabError
from .io import timestamp
from .models import check_model_name
from .report.html import ReportMeta, write_report
from .runs import WEIGHTS, read_config
from .train import train

_RUN = RunOptions()  # the declared defaults of --analysis-images and --analysis-batch-size


@dataclass
class CompareRecipe:
    """One model of the default comparison and the schedule that makes it learn within the budget."""

    model: str
    epochs: int
    lr: float
    warmup_epochs: float
    batch_size: int = 32
    weight_decay: float = 0.05


#: The default comparison: one of each family, each with the schedule that makes it learn
#: ``shapes`` within about a minute and a half on two CPU cores. Small batches give many steps
#: per image; the ViT sees 40k images, the Mixer 30k, the (slower) ResNet 20k.
DEFAULT_RECIPES = (
    CompareRecipe("vit_nano_patch8_sincos_32", epochs=4, lr=1e-3, warmup_epochs=0.4),
    CompareRecipe("resnet20_cifar", epochs=2, lr=2e-3, warmup_epochs=0.2),
    CompareRecipe("mixer_nano_patch8_32", epochs=3, lr=1e-3, warmup_epochs=0.3),
)


def default_data() -> DataConfig:
    """The comparison's data: 10,000 rendered training images, no augmentation, and 2,048
    validation images (eight analysis batches of 256).

    Fresh procedural images are plentiful, and augmentation slows the first epochs that a
    minutes-long budget consists of, so the comparison trains on plain images.
    """
    return DataConfig(name="shapes", num_train=10_000, num_val=2_048, augment="none")


@dataclass
class CompareResult:
    """What :func:`compare` and :func:`analyze` wrote: the output directory, the report's path, the
    analysed subjects, their analysis results and the seconds each step took."""

    out_dir: Path
    report: Path
    subjects: list[Subject]
    analysis: AnalysisResults
    timings: dict[str, float] = field(default_factory=dict)


def analysis_loader(data: DataConfig, num_images: int, batch_size: int, seed: int = 0,
                    progress: bool = False, split: str = "val") -> DataLoader:
    """Images of ``split`` (validation by default) in [0, 1] (no augmentation, no normalisation),
    with their labels, in equal batches."""
    dataset, _ = build_dataset(data, split, train_transform=False, seed=seed, progress=progress, normalize=False)
    if len(dataset) < batch_size:
        raise VitlabError(f"the {'validation' if split == 'val' else 'training'} split has {len(dataset)} images, "
                          f"fewer than one analysis batch of {batch_size}; lower --analysis-batch-size")
    if num_images < len(dataset):
        dataset = Subset(dataset, range(num_images))
    # Minibatch CKA needs equal batch sizes: the last incomplete batch is dropped.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)


def compare(
    models: Sequence[str] | None = None,
    data: DataConfig | None = None,
    out: str | Path | None = None,
    epochs: int | None = None,
    seed: int = 0,
    analyses: Sequence[str] | None = None,
    analysis_images: int = _RUN.images,
    analysis_batch_size: int = _RUN.batch_size,
    progress: bool = True,
    command: str = "",
    resume: bool = False,
    overwrite: bool = False,
    options: Any = None,
    runs: Sequence[str | Path] = (),
) -> CompareResult:
    """Train each model on ``data``, analyse them together and write the report.

    ``runs`` adds finished run directories (``vitlab train``, ``pretrain`` or ``finetune``) to the
    comparison without training them again, e.g. one architecture trained with different
    supervision; given alone (no ``models``), only they are compared. The report then shows what
    the supervision changed.

    ``models`` defaults to :data:`DEFAULT_RECIPES` (ViT, ResNet, Mixer, with their tuned
    schedules); other model names train with the first recipe's schedule. ``epochs`` overrides
    every model's epochs; ``data`` defaults to :func:`default_data`; ``analyses`` to every default
    analysis, and ``options`` (an :data:`~vitlab.analysis.catalog.AnalysisOptions`) to their declared
    options. ``resume`` continues an
    interrupted comparison in ``out``: finished runs are kept, an unfinished one resumes;
    ``overwrite`` deletes an existing ``out`` first.
    """
    started = time.perf_counter()
    analyses = check_analyses(analyses)
    data = data or default_data()
    run_dirs = [_check_run_dir(r) for r in runs]  # every name is checked before any training starts
    recipes = [] if run_dirs and not models else _recipes_for(models)
    out_dir = Path(out) if out else Path("runs") / f"compare-{timestamp()}"
    if resume and overwrite:
        raise VitlabError("--resume continues the comparison in --out and --overwrite replaces it; pass one of them")
    if resume and not out_dir.is_dir():
        raise VitlabError(f"cannot resume '{out_dir}': it does not exist; drop --resume to start a comparison")
    if not resume:
        _clear_out_dir(out_dir, overwrite, "pass --resume to continue it, --overwrite to replace it, "
                                           "or choose another with --out", keep=run_dirs)

    subjects, timings = [], {}
    for step, recipe in enumerate(recipes, 1):
        _say(progress, f"[{step}/{len(recipes) + 1}] training {recipe.model} on {data.name}")
        cfg = TrainConfig(model=recipe.model, data=data, epochs=epochs or recipe.epochs, batch_size=recipe.batch_size,
                          seed=seed, optim=Optim(lr=recipe.lr, warmup_epochs=recipe.warmup_epochs,
                                                 weight_decay=recipe.weight_decay))
        t0 = time.perf_counter()
        run_dir = out_dir / recipe.model
        result = train(cfg, run_dir, resume=resume and (run_dir / "config.yaml").exists(), progress=progress)
        timings[f"train {recipe.model}"] = round(time.perf_counter() - t0, 1)
        subjects.append(subject_from_run(result.run_dir, name=recipe.model))

    subjects += [subject_from_run(r) for r in run_dirs]
    t0 = time.perf_counter()
    _say(progress, f"[{len(recipes) + 1}/{len(recipes) + 1}] analysing ({', '.join(analyses)})")
    analysis = _analyse(subjects, data, analyses, analysis_images, analysis_batch_size, seed, progress, options)
    timings["analyses"] = round(time.perf_counter() - t0, 1)
    timings.update({f"analysis: {name}": seconds for name, seconds in analysis.timings.items()})
    timings["total"] = round(time.perf_counter() - started, 1)
    title = ("vitlab compare: how differently do a ViT, a CNN and an MLP-Mixer see?" if not run_dirs else
             "vitlab compare: " + ", ".join(s.name for s in subjects))
    meta = ReportMeta(title=title,
                      data=data.name, command=command, timings=timings)
    report = write_report(out_dir, subjects, analysis, meta)
    return CompareResult(out_dir, report, subjects, analysis, timings)


def _check_run_dir(path: str | Path) -> Path:
    """``path`` if it is a finished run directory, else a one-line error naming what it lacks."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise VitlabError(f"'{path}' is not a run directory (no config.yaml); pass directories that "
                          "vitlab train, pretrain or finetune wrote")
    if not (path / WEIGHTS).is_file():
        raise VitlabError(f"run '{path}' has no trained weights yet ({WEIGHTS}); finish it with "
                          f"vitlab train --resume {path}")
    return path


def _clear_out_dir(out_dir: Path, overwrite: bool, fix: str, keep: Sequence[Path] = ()) -> None:
    """Refuse a non-empty output directory, or empty it when ``overwrite`` (never one holding ``keep``)."""
    if not (out_dir.exists() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise VitlabError(f"output directory '{out_dir}' already exists; {fix}")
    for path in keep:
        if out_dir.resolve() in (path.resolve(), *path.resolve().parents):
            raise VitlabError(f"--overwrite would delete '{path}', which is being analysed; choose another --out")
    shutil.rmtree(out_dir)


def _analyse(subjects: Sequence[Subject], data: DataConfig, analyses: Sequence[str], analysis_images: int,
             batch_size: int, seed: int, progress: bool, options: Any) -> AnalysisResults:
    """The analysis suite over ``data``'s validation images, with what the separate analyses need."""
    loader = analysis_loader(data, analysis_images, batch_size, seed=seed, progress=progress)
    trained_on = {s.name: _training_data(s.run_dir) for s in subjects if s.run_dir is not None}
    results = run_analyses(subjects, loader, analyses, progress=progress, total=len(loader), options=options,
                           train_loader=lambda: analysis_loader(data, 10**9, batch_size, seed=seed, split="train"),
                           trained_on=trained_on)
    label_based = [a.name for a in REGISTRY if a.name in analyses and a.reads_classifier]
    for s in subjects:
        if s.run_dir is not None and label_based and is_self_supervised(s.run_dir):
            results.notes.append(f"{s.name} is self-supervised ({s.supervision}): its classifier never saw a label, "
                                 f"so its {', '.join(label_based)} numbers are at chance; compare its features "
                                 f"(cka, probes, attention), or fine-tune it first (vitlab finetune {s.run_dir})")
    return results


def _training_data(run_dir: Path) -> str:
    """What a run was trained on, e.g. ``shapes (match textures)``, from its config."""
    cfg = read_config(run_dir).data
    return f"{cfg.name} ({cfg.texture_mode} textures)" if cfg.name == "shapes" else cfg.name


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)


def _recipes_for(models: Sequence[str] | None) -> list[CompareRecipe]:
    if not models:
        return list(DEFAULT_RECIPES)
    for name in models:
        check_model_name(name)
    repeated = sorted({m for m in models if list(models).count(m) > 1})
    if repeated:
        raise VitlabError(f"model {repeated[0]} is listed twice; each model can be compared once")
    known = {r.model: r for r in DEFAULT_RECIPES}
    base = DEFAULT_RECIPES[0]
    return [known.get(m, CompareRecipe(m, base.epochs, base.lr, base.warmup_epochs, base.batch_size))
            for m in models]


def analyze(
    specs: Sequence[str],
    data: DataConfig | None = None,
    out: str | Path | None = None,
    pretrained: bool = False,
    analyses: Sequence[str] | None = None,
    analysis_images: int = _RUN.images,
    analysis_batch_size: int = _RUN.batch_size,
    seed: int = 0,
    allow_pickle: bool = False,
    progress: bool = True,
    command: str = "",
    overwrite: bool = False,
    options: Any = None,
) -> CompareResult:
    """Analyse run directories, model names or ``MODEL@FILE`` (``specs``) on ``data`` and write the report.

    ``MODEL@FILE`` loads the weights in FILE (safetensors; a pickle only with ``allow_pickle``).

    ``overwrite`` replaces an existing ``out`` (refused when it holds one of the analysed runs).
    """
    started = time.perf_counter()
    if not specs:
        raise VitlabError("name at least one run directory or model to analyse")
    analyses = check_analyses(analyses)
    world = distributed.setup("cpu")  # under torchrun: the streamed analyses split the batches (gloo)
    data = data or default_data()
    out_dir = Path(out) if out else Path("runs") / f"analyze-{timestamp()}"
    out_dir = Path(distributed.broadcast_object(str(out_dir)))
    runs = [Path(spec) for spec in specs if Path(spec).is_dir()]
    if world.is_main:
        _clear_out_dir(out_dir, overwrite, "pass --overwrite to replace it or choose another with --out", keep=runs)
    subjects = [load_subject(spec, pretrained=pretrained, allow_pickle=allow_pickle) for spec in specs]
    analysis = _analyse(subjects, data, analyses, analysis_images, analysis_batch_size, seed,
                        progress and world.is_main, options)
    if not world.is_main:  # rank 0 alone writes the report
        return CompareResult(out_dir, out_dir / "report.html", subjects, analysis, {})
    timings = {"total": round(time.perf_counter() - started, 1)}
    meta = ReportMeta(title="vitlab analyze: " + ", ".join(s.name for s in subjects), data=data.name,
                      command=command, timings=timings)
    report = write_report(out_dir, subjects, analysis, meta)
    return CompareResult(out_dir, report, subjects, analysis, timings)
