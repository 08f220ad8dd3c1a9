"""The ``vitlab`` command: a thin layer over the Python API.

Every option of a run is declared once, in :mod:`vitlab.config` and :mod:`vitlab.data` (and
every analysis option in its analysis's registration); the flags below are generated from
those declarations, so a flag's name is its config key (``--lr`` sets ``lr``, ``--mae-mask-ratio``
sets ``mae_mask_ratio``) and its help shows the declared default. The few flags written here
say what to do with a run rather than how to train it: ``--out``, ``--resume``, ``--overwrite``,
``--config``, ``--trust-pickle``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import options
from .errors import VitlabError

if TYPE_CHECKING:
    from .compare import CompareResult
    from .config import TrainConfig
    from .train import TrainResult

EPILOG = "Run `vitlab COMMAND --help` for the options of each command."

#: The options of the commands that write a run, by the section they belong to: ``train`` takes the
#: supervised ones, ``pretrain`` adds the objective and its method's section, ``finetune`` the
#: fine-tuning section (its source run is the positional RUN_DIR).
_PRETRAINING = ("mp3", "mae", "dino")


def _train_scope(leaf: options.Leaf) -> bool:
    return leaf.path[0] not in ("objective", "finetune", *_PRETRAINING)


def _pretrain_scope(leaf: options.Leaf) -> bool:
    return _train_scope(leaf) or leaf.path[0] in ("objective", *_PRETRAINING)


def _finetune_scope(leaf: options.Leaf) -> bool:
    return (_train_scope(leaf) and leaf.key not in ("model", "recipe")) or \
        (leaf.path[0] == "finetune" and leaf.key != "finetune_from")


#: Which options each run-writing command takes, and what happens to the others (refused by argparse).
RUN_COMMANDS: dict[str, Callable[[options.Leaf], bool]] = {
    "train": _train_scope, "pretrain": _pretrain_scope, "finetune": _finetune_scope,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``vitlab`` argument parser, with one sub-parser per command."""
    from .compare import default_data
    from .config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="vitlab", epilog=EPILOG,
        description="Build, train and dissect vision transformers, CNNs and MLP-Mixers side by side.")
    parser.add_argument("--version", action="version", version=f"vitlab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data_defaults = TrainConfig(data=default_data())  # what compare and analyze train and analyse on

    p = sub.add_parser("compare", help="train a ViT, a CNN and an MLP-Mixer and report how differently they see",
                       description="Train a ViT, a CIFAR ResNet and an MLP-Mixer on the same data (the embedded "
                                   "shapes data set by default), compare their representations (CKA) and "
                                   "attention, and write report.html and results.json. With --runs, finished runs "
                                   "join the comparison (alone, only they are compared), e.g. one ViT trained with "
                                   "different supervision.")
    p.add_argument("--models", type=_comma_list, metavar="A,B,...",
                   help="models to compare (default: vit_nano_patch8_sincos_32,resnet20_cifar,mixer_nano_patch8_32 "
                        "with their tuned schedules)")
    p.add_argument("--runs", type=_comma_list, metavar="DIR,DIR,...",
                   help="finished run directories to compare as well, without training them again (e.g. one ViT "
                        "trained with labels, by vitlab pretrain --objective mae and --objective dino: the report "
                        "shows what supervision changes); alone, only these are compared")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs for every model (default: each model's tuned "
                                                            "schedule)")
    options.add_arguments(p, TrainConfig, only=lambda leaf: leaf.key == "seed")
    _add_run_dir_args(p, "comparison", "runs/compare-TIMESTAMP")
    _add_analysis_args(p)
    p.set_defaults(func=_cmd_compare, data_added=options.add_arguments(p, TrainConfig, data_defaults,
                                                                       only=lambda leaf: leaf.path[0] == "data"))

    for command, scope in RUN_COMMANDS.items():
        p = sub.add_parser(command, **_RUN_COMMAND_TEXT[command])
        if command == "finetune":
            p.add_argument("finetune_from", metavar="RUN_DIR", help="the trained run to start from")
        p.add_argument("--config", metavar="YAML", help="start from this config file; options override its values")
        _add_run_dir_args(p, "run", "runs/MODEL-DATA-TIMESTAMP")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow --init-weights to be a pickle (.pt/.pth), which can run code: only for trusted "
                            "files")
        added = options.add_arguments(p, TrainConfig, only=scope)
        p.set_defaults(func=_cmd_run, added=added)
        if command == "pretrain":
            objective = next(a for a in p._actions if a.dest == "objective")
            objective.choices, objective.required = _PRETRAINING, True

    p = sub.add_parser("analyze", help="analyse run directories or models by name and write a report",
                       description="Analyse trained runs (run directories) and/or registered models by name "
                                   "(untrained, or timm-pretrained with --pretrained) on one data set.")
    p.add_argument("subjects", nargs="+", metavar="RUN_DIR_OR_MODEL",
                   help="run directories, model names, or MODEL@FILE: a model with the weights in FILE")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for model names")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL@FILE to name a pickle (.pt/.pth), which can run code: only for trusted files")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/analyze-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    options.add_arguments(p, TrainConfig, only=lambda leaf: leaf.key == "seed")
    _add_analysis_args(p)
    p.set_defaults(func=_cmd_analyze, data_added=options.add_arguments(p, TrainConfig, data_defaults,
                                                                       only=lambda leaf: leaf.path[0] == "data"))

    p = sub.add_parser("recipes", help="list the shipped training recipes (for vitlab train --recipe NAME)")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("models", help="list the registered models with their parameter counts, input sizes and classes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit*' (default: all)")
    p.add_argument("--all", action="store_true", help="include stock timm models")
    p.set_defaults(func=_cmd_models)
    return parser


_RUN_COMMAND_TEXT = {
    "train": dict(help="train one model and write a run directory",
                  description="Train one model. Writes config.yaml, model.safetensors, metrics.csv and the last "
                              "checkpoints state-STEP.pt (for --resume) into the run directory. Under torchrun "
                              "(torchrun --nproc_per_node N -m vitlab train ...) every process trains on its share "
                              "of each batch."),
    "pretrain": dict(help="self-supervised pretraining (MP3, MAE, DINO) without labels",
                     description="Pretrain a model without labels and write a run directory that vitlab finetune "
                                 "takes (model.safetensors is the bare model). mp3 (ViTs): the ViT runs without its "
                                 "position embedding and learns to predict every patch's position, attending to a "
                                 "random subset of the patches (Zhai et al. 2022); val acc is position accuracy. "
                                 "mae (ViTs): the encoder sees a random quarter of the patches, a light decoder "
                                 "predicts the pixels of the others (He et al. 2022). dino (any model): a student "
                                 "matches its momentum teacher's output on another augmented view (Caron et al. "
                                 "2021). For mae and dino, val loss is the objective on the validation images and "
                                 "val acc a k-NN monitor (cosine, k=20) of the pooled features: even-numbered "
                                 "validation images are the labelled bank, odd-numbered ones the queries."),
    "finetune": dict(help="fine-tune a trained run on new data (full, or a linear probe)",
                     description="Start from RUN_DIR's trained weights with a new classifier and train on --data: "
                                 "every weight (--finetune-mode full) or only the classifier (--finetune-mode linear, "
                                 "a linear probe), optionally re-initialising the top --reinit-blocks blocks first. "
                                 "The architecture is the source run's."),
}


def _add_run_dir_args(p: argparse.ArgumentParser, what: str, default: str) -> None:
    """``--out``, ``--resume`` and ``--overwrite``, with one meaning in every command that writes a run."""
    p.add_argument("--out", metavar="DIR", help=f"the {what} directory (default {default})")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help=f"continue the {what} in DIR (or --out) from where it stopped, e.g. after it was killed")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} directory")


def _run_dir(args: argparse.Namespace) -> tuple[str | None, bool]:
    """``(directory, resume)`` from ``--out`` and ``--resume [DIR]``."""
    if isinstance(args.resume, str):
        if args.out and Path(args.out) != Path(args.resume):
            raise VitlabError(f"--resume {args.resume} and --out {args.out} name different directories; give one")
        return args.resume, True
    if args.resume and not args.out:
        raise VitlabError(f"--resume needs the directory: vitlab {args.command} --resume DIR")
    return args.out, bool(args.resume)


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    """Which analyses, on how many images, and every registered analysis's options."""
    from .analysis.catalog import ANALYSES, AnalysisOptions
    from .analysis.registry import RunOptions

    run = options.add_arguments(p, RunOptions)
    next(a for a in p._actions if a.dest == "analyses").help = f"analyses to run (default: {','.join(ANALYSES)})"
    p.set_defaults(run_added=run, analysis_added=options.add_arguments(p, AnalysisOptions))


def _comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _command_line() -> str:
    return "vitlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _seed(args: argparse.Namespace) -> int:
    """``--seed``, or the config's default seed: the same meaning in every command."""
    from .config import TrainConfig

    return args.seed if args.seed is not None else TrainConfig().seed


def _data(args: argparse.Namespace):
    """The data section of compare and analyze: the comparison's defaults with the options given."""
    from .compare import default_data
    from .config import TrainConfig

    return TrainConfig(data=default_data()).merged(options.given(args, args.data_added)).data


def _analysis_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of compare() and analyze() that choose and configure the analyses."""
    from .analysis.catalog import AnalysisOptions
    from .analysis.registry import RunOptions

    run = options.merged(RunOptions(), options.given(args, args.run_added))
    return dict(analyses=run.analyses, analysis_images=run.images, analysis_batch_size=run.batch_size,
                options=options.merged(AnalysisOptions(), options.given(args, args.analysis_added)))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    out, resume = _run_dir(args)
    result = compare(models=args.models, data=_data(args), out=out, epochs=args.epochs, seed=_seed(args),
                     command=_command_line(), resume=resume, overwrite=args.overwrite, runs=args.runs or (),
                     **_analysis_options(args))
    _print_summary(result)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .compare import analyze

    result = analyze(args.subjects, data=_data(args), out=args.out, pretrained=args.pretrained,
                     allow_pickle=args.trust_pickle, seed=_seed(args), command=_command_line(),
                     overwrite=args.overwrite, **_analysis_options(args))
    _print_summary(result)
    return 0


def _print_summary(result: CompareResult) -> None:
    from . import distributed

    if not distributed.current().is_main:  # under torchrun rank 0 speaks for all
        return
    for s in result.subjects:
        acc = f"val acc {100 * s.val_acc:.1f}%" if s.val_acc is not None else s.source
        print(f"  {s.name:<28} {s.params:>12,} params  {acc}")
    if "total" in result.timings:
        print(f"  total time {result.timings['total']:.0f} s")
    print(f"report: {result.report}")


def run_config(args: argparse.Namespace) -> TrainConfig:
    """The config a ``train``, ``pretrain`` or ``finetune`` command line describes (without resuming).

    It starts from ``--recipe`` or ``--config`` (else the defaults; for ``finetune``, the source
    run's architecture), and the options given on the command line override it.
    """
    from .config import TrainConfig, load_config
    from .config.recipes import load_recipe

    given = options.given(args, args.added)
    recipe = given.pop("recipe", None)
    if recipe and args.config:
        raise VitlabError("--recipe and --config both name a starting point; pass one of them")
    if args.command == "pretrain":  # an option of another method would be silently unused
        for leaf in args.added:
            section = leaf.path[0] if leaf.path[0] in _PRETRAINING else None
            if leaf.key in given and section is not None and section != given["objective"]:
                raise VitlabError(f"{leaf.flag} is an option of --objective {section}, not of "
                                  f"--objective {given['objective']}")
    if args.command == "finetune":
        base = _finetune_base(args.finetune_from)
        given["finetune_from"] = str(args.finetune_from)
    elif recipe:
        base = load_recipe(recipe)
    else:
        base = load_config(args.config) if args.config else TrainConfig()
    return base.merged(given)


def _finetune_base(source_dir: str) -> TrainConfig:
    """The source run's architecture, with classes and image size left to the new data."""
    from .config import TrainConfig
    from .runs import ARCHITECTURE_FIELDS, read_config

    source = read_config(source_dir)
    model_args = {k: v for k, v in source.model_args.items() if k not in ("num_classes", "img_size")}
    architecture = {name: getattr(source, name) for name in ARCHITECTURE_FIELDS}
    return TrainConfig(**architecture, model_args=model_args, data=source.data)


def _cmd_run(args: argparse.Namespace) -> int:
    from .io import timestamp
    from .runs import read_config
    from .train import train

    out, resume = _run_dir(args)
    if resume:
        cfg = read_config(out)  # the run's own config: options given now would not match its checkpoints
    else:
        cfg = run_config(args)
        if args.command == "finetune" and not out:
            out = str(Path("runs") / f"{Path(args.finetune_from).name}-{cfg.finetune.mode}-{timestamp()}")
    result = train(cfg, out, resume=resume, overwrite=args.overwrite, allow_pickle=args.trust_pickle)
    return _report_training(result)


def _report_training(result: TrainResult) -> int:
    from . import distributed

    if not distributed.current().is_main:
        return 0
    knn = "val k-NN accuracy (pooled features, cosine k=20, bank: half the val split)"
    what = {"supervised": "val acc", "mp3": "val position accuracy", "mae": knn, "dino": knn}[result.config.objective]
    if result.config.objective in ("mae", "dino") and result.metrics:
        print(f"{result.config.model}: {result.config.objective} val loss {result.metrics[-1]['val_loss']:.4f}")
    print(f"{result.config.model}: {what} {100 * result.val_acc:.1f}% after {len(result.metrics)} epochs "
          f"({result.train_time_s:.0f} s of training)")
    print(f"run: {result.run_dir}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .config.recipes import list_recipes, load_recipe

    print(f"{'recipe':<8} {'model':<22} {'epochs':>6} {'optimizer':<9} {'lr':>8}  augmentation")
    for name in list_recipes():
        cfg = load_recipe(name)
        extras = [cfg.data.augment] + ([cfg.data.randaugment] if cfg.data.randaugment else []) + \
            ([f"mixup {cfg.mixup}/cutmix {cfg.cutmix}"] if cfg.mixup or cfg.cutmix else []) + \
            ([f"EMA {cfg.ema_decay}"] if cfg.ema_decay else [])
        print(f"{name:<8} {cfg.model:<22} {cfg.epochs:>6} {cfg.optim.optimizer:<9} {cfg.optim.lr:>8.2g}  "
              f"{', '.join(extras)}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import timm

    from .models import count_parameters, list_models

    names = list_models(args.pattern, include_timm=args.all)
    if not names:
        raise VitlabError(f"no model matches '{args.pattern}'; run `vitlab models` to list them all")
    width = max(len(n) for n in names + ["model"])
    print(f"{'model':<{width}}  {'params':>13}  {'input':>7}  classes")
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        size = f"{cfg.input_size[-2]}x{cfg.input_size[-1]}" if cfg else "?"
        classes = cfg.num_classes if cfg else "?"
        print(f"{name:<{width}}  {count_parameters(name):>13,}  {size:>7}  {classes:>7}")
    return 0


def _version() -> str:
    from . import __version__

    return __version__


#: What an interrupted command says about resuming it.
_RESUME_HINT = "; the last checkpoint is saved: resume with vitlab {command} --resume DIR"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # Denormal floats (untrained or barely trained CNNs in eval mode produce many) run up to 10x
    # slower on x86 CPUs; flushing them to zero changes no result that matters and keeps analyses fast.
    import torch

    torch.set_flush_denormal(True)
    try:
        code = args.func(args)
        from . import distributed

        distributed.finish()
        return code
    except VitlabError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _RESUME_HINT.format(command=args.command) if args.command in (*RUN_COMMANDS, "compare") else ""
        print(f"vitlab: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
