"""The ``vitlab`` command: ``compare | train | analyze | models``. A thin layer over the Python API."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from .errors import VitlabError

EPILOG = "Run `vitlab COMMAND --help` for the options of each command."


def _add_data_args(p: argparse.ArgumentParser, base, default: str | None = "shapes") -> None:
    """Data options; ``base`` (a DataConfig) supplies the defaults the help text shows."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, metavar="NAME",
                   help="shapes (embedded, default), cifar10, cifar100 or imagefolder:PATH")
    g.add_argument("--image-size", type=int, metavar="PX", help="train/analyse at this size (default: native)")
    g.add_argument("--data-root", metavar="DIR", help="where CIFAR lives (default ~/.cache/vitlab/data)")
    g.add_argument("--download", action="store_true", help="download CIFAR if missing (needs the network)")
    g.add_argument("--num-train", type=int, metavar="N", help=f"shapes: training images (default {base.num_train})")
    g.add_argument("--num-val", type=int, metavar="N", help=f"shapes: validation images (default {base.num_val})")
    g.add_argument("--texture-mode", choices=["random", "match", "conflict"],
                   help=f"shapes: how object texture relates to class (default {base.texture_mode}; 'match' makes "
                        "both shape and texture predict the class, the training set for a shape-bias study)")
    g.add_argument("--num-workers", type=int, metavar="N",
                   help=f"data-loading worker processes (default {base.num_workers})")
    g.add_argument("--augment", choices=["crop-flip", "resized-crop-flip", "none"],
                   help=f"augmentation preset (default {base.augment})")
    g.add_argument("--crop-scale", type=float, metavar="S",
                   help=f"resized-crop-flip: smallest fraction of the area kept (default {base.crop_scale})")
    g.add_argument("--crop-padding", type=int, metavar="PX",
                   help="crop-flip: pixels of padding on each side before the random crop, i.e. the largest "
                        "shift (default: an eighth of the side, 4 at 32x32)")
    g.add_argument("--randaugment", metavar="CFG",
                   help="timm RandAugment config, e.g. rand-m9-mstd0.5, or 'none' to turn a recipe's off (default off)")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help=f"image folders without train/val sub-folders: the seeded class-balanced fraction held out "
                        f"for validation (default {base.val_fraction})")
    g.add_argument("--split-seed", type=int, metavar="N",
                   help="seed of the validation split (an image folder's hold-out, shapes' validation images), "
                        "so runs of several --seed values are measured on one validation set (default: --seed)")


def _data_overrides(args: argparse.Namespace) -> dict:
    return {"data.name": args.data, "data.image_size": args.image_size, "data.root": args.data_root,
            "data.download": args.download or None, "data.num_train": args.num_train,
            "data.num_val": args.num_val, "data.num_workers": args.num_workers, "data.texture_mode": args.texture_mode,
            "data.augment": args.augment, "data.randaugment": args.randaugment, "data.crop_scale": args.crop_scale,
            "data.crop_padding": args.crop_padding,
            "data.val_fraction": args.val_fraction, "data.split_seed": args.split_seed}


def _data_config(args: argparse.Namespace, base=None):
    """The data section: ``base`` (default: the training defaults) with the command-line options."""
    from .train import TrainConfig

    return TrainConfig(data=base or TrainConfig().data).merged(_data_overrides(args)).data


def build_parser() -> argparse.ArgumentParser:
    from .compare import default_data
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="vitlab", epilog=EPILOG,
        description="Build, train and dissect vision transformers, CNNs and MLP-Mixers side by side.")
    parser.add_argument("--version", action="version", version=f"vitlab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compare", help="train a ViT, a CNN and an MLP-Mixer and report how differently they see",
                       description="Train a ViT, a CIFAR ResNet and an MLP-Mixer on the same data (the embedded "
                                   "shapes data set by default), compare their representations (CKA) and "
                                   "attention, and write report.html and results.json. With --runs, finished runs join the comparison "
                                   "(alone, only they are compared), e.g. one ViT trained with different supervision.")
    p.add_argument("--models", metavar="A,B,...", help="models to compare (default: vit_nano_patch8_sincos_32,"
                   "resnet20_cifar,mixer_nano_patch8_32 with their tuned schedules)")
    p.add_argument("--runs", metavar="DIR,DIR,...",
                   help="finished run directories to compare as well, without training them again (e.g. one ViT "
                        "trained with labels, by vitlab pretrain --method mae and --method dino: the report shows "
                        "what supervision changes); alone, only these are compared")
    p.add_argument("--epochs", type=int, help="epochs for every model (default: each model's tuned schedule)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/compare-TIMESTAMP)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and order (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _add_analysis_args(p)
    _add_data_args(p, default_data())
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train", help="train one model and write a run directory",
                       description="Train one model. Writes config.yaml, model.safetensors, metrics.csv and "
                                   "the last checkpoints state-STEP.pt (for --resume) into the run directory. "
                                   "Under torchrun (torchrun --nproc_per_node N -m vitlab train ...) every "
                                   "process trains on its share of each batch.")
    t = TrainConfig()
    p.add_argument("--model", metavar="NAME", help=f"model name (see `vitlab models`; default {t.model})")
    p.add_argument("--recipe", metavar="NAME",
                   help="start from a shipped recipe (vitlab recipes lists them); options override its values")
    p.add_argument("--config", metavar="YAML", help="recipe file; command-line options override its values")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue RUN_DIR (or --out) from its newest checkpoint, e.g. after the run was killed")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("pretrain", help="self-supervised pretraining (MP3, MAE, DINO) without labels",
                       description="Pretrain a model without labels and write a run directory that vitlab "
                                   "finetune takes (model.safetensors is the bare model). "
                                   "mp3 (ViTs): the ViT runs without its position embedding and learns to predict "
                                   "every patch's position, attending to a random subset of the patches (Zhai et "
                                   "al. 2022); val acc is position accuracy. "
                                   "mae (ViTs): the encoder sees a random quarter of the patches, a light decoder "
                                   "predicts the pixels of the others (He et al. 2022). "
                                   "dino (any model): a student matches its momentum teacher's output on another "
                                   "augmented view (Caron et al. 2021). For mae and dino, val loss is the objective "
                                   "on the validation images and val acc a k-NN monitor (cosine, k=20) of the pooled "
                                   "features: even-numbered validation images are the labelled bank, odd-numbered "
                                   "ones the queries.")
    p.add_argument("--method", choices=["mp3", "mae", "dino"], required=True, help="pretraining method")
    p.add_argument("--model", metavar="NAME", help=f"e.g. vit_tiny_patch4_32 (mp3 and mae need a ViT; default {t.model})")
    g = p.add_argument_group("mp3")
    g.add_argument("--mp3-keep", type=float, metavar="F", help=f"fraction of patches used as keys (default {t.mp3_keep})")
    g = p.add_argument_group("mae")
    g.add_argument("--mae-mask-ratio", type=float, metavar="F",
                   help=f"fraction of patches hidden from the encoder (default {t.mae_mask_ratio})")
    g.add_argument("--mae-decoder-dim", type=int, metavar="D", help=f"decoder width (default {t.mae_decoder_dim})")
    g.add_argument("--mae-decoder-depth", type=int, metavar="N", help=f"decoder blocks (default {t.mae_decoder_depth})")
    g.add_argument("--mae-decoder-heads", type=int, metavar="H", help=f"decoder heads (default {t.mae_decoder_heads})")
    g.add_argument("--no-mae-norm-pix", dest="mae_norm_pix", action="store_false", default=None,
                   help="predict raw (normalised-image) pixels instead of per-patch normalised ones")
    g = p.add_argument_group("dino")
    g.add_argument("--dino-prototypes", type=int, metavar="K", help=f"head output size (default {t.dino_prototypes})")
    g.add_argument("--dino-hidden-dim", type=int, metavar="D", help=f"head MLP width (default {t.dino_hidden_dim})")
    g.add_argument("--dino-bottleneck-dim", type=int, metavar="D",
                   help=f"head bottleneck before the prototypes (default {t.dino_bottleneck_dim})")
    g.add_argument("--dino-student-temp", type=float, metavar="T", help=f"(default {t.dino_student_temp})")
    g.add_argument("--dino-teacher-temp", type=float, metavar="T",
                   help=f"teacher temperature after the warm-up (default {t.dino_teacher_temp})")
    g.add_argument("--dino-teacher-temp-warmup", type=float, metavar="EPOCHS",
                   help=f"epochs of linear warm-up from 0.04 to --dino-teacher-temp (default {t.dino_teacher_temp_warmup})")
    g.add_argument("--dino-momentum", type=float, metavar="M",
                   help=f"teacher EMA momentum at the start, rising on a cosine to 1 (default {t.dino_momentum})")
    g.add_argument("--dino-center-momentum", type=float, metavar="M",
                   help=f"momentum of the teacher-output centre (default {t.dino_center_momentum})")
    g.add_argument("--dino-crop-scale", type=float, metavar="F",
                   help=f"smallest area fraction of the two random crops (default {t.dino_crop_scale})")
    _add_train_args(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a trained run on new data (full, or a linear probe)",
                       description="Start from RUN's trained weights with a new classifier and train on --data: "
                                   "every weight (--mode full) or only the classifier (--mode linear, a linear "
                                   "probe), optionally re-initialising the top --reinit-blocks blocks first.")
    p.add_argument("run", metavar="RUN_DIR", help="the trained run to start from")
    p.add_argument("--mode", choices=["full", "linear"], default="full", help="(default full)")
    p.add_argument("--reinit-blocks", type=int, default=0, metavar="K",
                   help="re-initialise the top K blocks before fine-tuning (default 0)")
    _add_train_args(p)
    p.set_defaults(func=_cmd_finetune)

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
    p.add_argument("--seed", type=int, default=0)
    _add_analysis_args(p)
    _add_data_args(p, default_data())
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("recipes", help="list the shipped training recipes (for vitlab train --recipe NAME)")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("models", help="list the registered models with their parameter counts, input sizes and classes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit*' (default: all)")
    p.add_argument("--all", action="store_true", help="include stock timm models")
    p.set_defaults(func=_cmd_models)
    return parser


def _model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--model-arg``, the value read as YAML (``0`` a number, ``true`` a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE; e.g. --model-arg attn_drop_rate=0")
    return key.strip(), yaml.safe_load(value)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of training, shared by ``train``, ``pretrain`` and ``finetune``."""
    from .train import TrainConfig

    t = TrainConfig()
    p.add_argument("--epochs", type=int, help=f"(default {t.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default {t.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate, reached after the warm-up (default {t.lr})")
    p.add_argument("--min-lr", type=float, help=f"floor of the cosine decay (default {t.min_lr})")
    p.add_argument("--weight-decay", type=float, help=f"(default {t.weight_decay})")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warm-up before the cosine decay (default {t.warmup_epochs})")
    p.add_argument("--label-smoothing", type=float, help=f"(default {t.label_smoothing})")
    p.add_argument("--drop-path", type=float, help=f"stochastic depth rate (default {t.drop_path})")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help=f"(default {t.optimizer})")
    p.add_argument("--mixup", type=float, metavar="ALPHA", help=f"Mixup alpha, 0 for off (default {t.mixup})")
    p.add_argument("--cutmix", type=float, metavar="ALPHA", help=f"CutMix alpha, 0 for off (default {t.cutmix})")
    p.add_argument("--spatial-entropy", type=float, metavar="LAMBDA",
                   help=f"spatial entropy regulariser's peak weight (Peruzzo et al.; 0.01 in the paper; default {t.spatial_entropy})")
    p.add_argument("--spatial-entropy-warmup", type=float, metavar="EPOCHS",
                   help=f"epochs of its linear warm-up before the cosine decay (default {t.spatial_entropy_warmup})")
    p.add_argument("--no-last-attention-skip", dest="last_attention_skip", action="store_false", default=None,
                   help="the paper's variant: drop the last block's attention skip connection and second norm")
    p.add_argument("--conv-init", type=int, metavar="K",
                   help="convolutional initialisation of attention, for small data: a learnable relative position bias "
                        "in every attention, head h starting on one offset of a KxK kernel (odd, e.g. 3; nearest offsets "
                        "first, repeating when heads > K*K); timm-attention models: vit_*, CCT, T2T-ViT (default off)")
    p.add_argument("--conv-init-strength", type=float, metavar="ALPHA",
                   help=f"the bias at each head's own offset: {t.conv_init_strength} puts about 97%% of a patch's "
                        f"attention there at the start, 1 is ConViT's softer locality (default {t.conv_init_strength})")
    p.add_argument("--exit-training", choices=["joint", "branches", "copycat"],
                   help="early-exit models: every head on the labels (joint, default), or the backbone frozen and "
                        "the branches on the labels (branches) or copying the final head (copycat)")
    p.add_argument("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE", dest="model_args",
                   help="a keyword of the model's constructor, e.g. attn_drop_rate=0 (YAML value; repeatable)")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help=f"keep a moving average of the weights with this decay, 0 for off (default {t.ema_decay})")
    p.add_argument("--eval-flip", action="store_const", const=True,
                   help="also report validation accuracy with horizontal-flip test-time augmentation "
                        "(val_acc_flip in metrics.csv, beside the plain val_acc)")
    p.add_argument("--progressive-resize", metavar="SIZE:EPOCHS[,...]",
                   help="train the first EPOCHS epochs on images downscaled to SIZE x SIZE (stages in order; e.g. "
                        "24:16), the rest at full size: cheaper early epochs; validation stays at full size "
                        "(models with a position embedding resample it; default off)")
    p.add_argument("--seed", type=int, help=f"(default {t.seed})")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/MODEL-DATA-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--init-weights", metavar="FILE",
                   help="start from these weights (e.g. a timm .safetensors checkpoint), matched by name")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --init-weights to be a pickle (.pt/.pth), which can run code: only for trusted files")
    g = p.add_argument_group("checkpoints and speed")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help=f"also checkpoint every STEPS steps within an epoch (default {t.checkpoint_every}: epoch ends only)")
    g.add_argument("--keep-checkpoints", type=int, metavar="K", help=f"checkpoints kept (default {t.keep_checkpoints})")
    g.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help=f"bf16 autocast, only where the CPU or GPU has it natively; auto picks it there (default {t.precision})")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--channels-last", choices=["auto", "on", "off"],
                   help=f"channels-last memory layout; auto: for CNNs (default {t.channels_last})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"(default {t.device}: this rank's GPU if any)")
    _add_data_args(p, t.data, default=None)


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    from .analysis.suite import ANALYSES

    g = p.add_argument_group("analysis")
    g.add_argument("--analyses", default=",".join(ANALYSES), metavar="A,B",
                   help=f"analyses to run (default: {','.join(ANALYSES)})")
    g.add_argument("--analysis-images", type=int, default=2048, metavar="N",
                   help="validation images to analyse (default 2048)")
    g.add_argument("--analysis-batch-size", type=int, default=256, metavar="N",
                   help="images per analysis batch (default 256; CKA uses equal batches)")
    g.add_argument("--saliency-model", metavar="NAME_OR_RUN",
                   help="a model with a class token that ranks patches for salient PatchDrop of models without one")
    g.add_argument("--cue-conflict", metavar="DIR",
                   help="Geirhos cue-conflict images (cat1-elephant2.png ...) for the shape bias of ImageNet models")
    g.add_argument("--occlusion-grid", type=int, default=8, metavar="G",
                   help="PatchDrop lattice of G x G patches (default 8; it must divide the image size)")
    g.add_argument("--featvis-steps", type=int, default=400, metavar="N",
                   help="Adam steps per feature visualisation (default 400, the paper's)")


def _analysis_options(args: argparse.Namespace):
    from .analysis.suite import AnalysisOptions

    if args.occlusion_grid < 1:
        raise VitlabError(f"--occlusion-grid must be a positive number of patches per side, not {args.occlusion_grid}")
    if args.featvis_steps < 1:
        raise VitlabError(f"--featvis-steps must be at least 1, not {args.featvis_steps}")
    return AnalysisOptions(saliency_model=args.saliency_model, cue_conflict_dir=args.cue_conflict,
                           occlusion_grid=args.occlusion_grid, featvis_steps=args.featvis_steps)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _command_line() -> str:
    return "vitlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, default_data

    result = compare(models=_split(args.models) or None, data=_data_config(args, default_data()), out=args.out,
                     epochs=args.epochs, seed=args.seed, analyses=_split(args.analyses),
                     analysis_images=args.analysis_images, analysis_batch_size=args.analysis_batch_size,
                     command=_command_line(), resume=args.resume, overwrite=args.overwrite,
                     options=_analysis_options(args), runs=_split(args.runs))
    _print_summary(result)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .compare import analyze, default_data

    result = analyze(args.subjects, data=_data_config(args, default_data()), out=args.out,
                     pretrained=args.pretrained, allow_pickle=args.trust_pickle, analyses=_split(args.analyses),
                     analysis_images=args.analysis_images, analysis_batch_size=args.analysis_batch_size,
                     seed=args.seed, command=_command_line(), overwrite=args.overwrite,
                     options=_analysis_options(args))
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    from . import distributed

    if not distributed.current().is_main:  # under torchrun rank 0 speaks for all
        return
    for s in result.subjects:
        acc = f"val acc {100 * s.val_acc:.1f}%" if s.val_acc is not None else s.source
        print(f"  {s.name:<28} {s.params:>12,} params  {acc}")
    if "total" in result.timings:
        print(f"  total time {result.timings['total']:.0f} s")
    print(f"report: {result.report}")


def _train_overrides(args: argparse.Namespace) -> dict:
    """The training options given on the command line (None where not given)."""
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "min_lr": args.min_lr, "warmup_epochs": args.warmup_epochs,
            "label_smoothing": args.label_smoothing, "drop_path": args.drop_path, "seed": args.seed,
            "eval_flip": args.eval_flip, "progressive_resize": args.progressive_resize,
            "optimizer": args.optimizer, "mixup": args.mixup, "cutmix": args.cutmix, "ema_decay": args.ema_decay,
            "spatial_entropy": args.spatial_entropy, "spatial_entropy_warmup": args.spatial_entropy_warmup,
            "last_attention_skip": args.last_attention_skip, "exit_training": args.exit_training,
            "conv_init": args.conv_init, "conv_init_strength": args.conv_init_strength,
            "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
            "precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
            "device": args.device, "init_weights": args.init_weights,
            "model_args": dict(args.model_args) if args.model_args else None, **_data_overrides(args)}


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    method_options = ["mp3_keep", "mae_mask_ratio", "mae_decoder_dim", "mae_decoder_depth", "mae_decoder_heads",
                      "mae_norm_pix", "dino_prototypes", "dino_hidden_dim", "dino_bottleneck_dim", "dino_student_temp",
                      "dino_teacher_temp", "dino_teacher_temp_warmup", "dino_momentum", "dino_center_momentum",
                      "dino_crop_scale"]
    given = [k for k in method_options if getattr(args, k) is not None and not k.startswith(args.method + "_")]
    if given:  # an option of another method would be silently unused
        raise VitlabError(f"--{given[0].replace('_', '-')} is an option of --method {given[0].split('_')[0]}, "
                          f"not of --method {args.method}")
    cfg = TrainConfig().merged({"model": args.model, **_train_overrides(args), "objective": args.method,
                                **{k: getattr(args, k) for k in method_options}})
    return _report_training(train(cfg, args.out, overwrite=args.overwrite, allow_pickle=args.trust_pickle))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .runs import ARCHITECTURE_FIELDS, read_config
    from .train import TrainConfig, train

    source = read_config(args.run)
    # The source's architecture; classes and image size are resolved again from the new data.
    model_args = {k: v for k, v in source.model_args.items() if k not in ("num_classes", "img_size")}
    architecture = {name: getattr(source, name) for name in ARCHITECTURE_FIELDS}
    base = TrainConfig(**architecture, model_args=model_args, data=source.data)
    cfg = base.merged({**_train_overrides(args), "finetune_from": str(args.run), "finetune_mode": args.mode,
                       "reinit_blocks": args.reinit_blocks})
    from .io import timestamp

    out = args.out or str(Path("runs") / f"{Path(args.run).name}-{args.mode}-{timestamp()}")
    return _report_training(train(cfg, out, overwrite=args.overwrite, allow_pickle=args.trust_pickle))


def _report_training(result) -> int:
    from . import distributed

    if not distributed.current().is_main:
        return 0
    what = {"supervised": "val acc", "mp3": "val position accuracy",
            "mae": "val k-NN accuracy (pooled features, cosine k=20, bank: half the val split)",
            "dino": "val k-NN accuracy (pooled features, cosine k=20, bank: half the val split)"}[result.config.objective]
    if result.config.objective in ("mae", "dino") and result.metrics:
        print(f"{result.config.model}: {result.config.objective} val loss {result.metrics[-1]['val_loss']:.4f}")
    print(f"{result.config.model}: {what} {100 * result.val_acc:.1f}% after {len(result.metrics)} epochs "
          f"({result.train_time_s:.0f} s of training)")
    print(f"run: {result.run_dir}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .runs import read_config
    from .train import TrainConfig, load_config, train

    if isinstance(args.resume, str):
        if args.out and Path(args.out) != Path(args.resume):
            raise VitlabError(f"--resume {args.resume} and --out {args.out} name different runs; give one of them")
        args.out = args.resume
    if args.resume:
        if not args.out:
            raise VitlabError("--resume needs the run directory: vitlab train --resume RUN_DIR")
        cfg = read_config(args.out)
    else:
        if args.recipe and args.config:
            raise VitlabError("--recipe and --config both name a starting point; pass one of them")
        if args.recipe:
            from .config.recipes import load_recipe

            cfg = load_recipe(args.recipe)
        else:
            cfg = load_config(args.config) if args.config else TrainConfig()
        overrides = {"model": args.model, **_train_overrides(args)}
        cfg = cfg.merged(overrides)
    return _report_training(train(cfg, args.out, resume=bool(args.resume), overwrite=args.overwrite,
                                  allow_pickle=args.trust_pickle))


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .config.recipes import list_recipes, load_recipe

    print(f"{'recipe':<8} {'model':<22} {'epochs':>6} {'optimizer':<9} {'lr':>8}  augmentation")
    for name in list_recipes():
        cfg = load_recipe(name)
        extras = [cfg.data.augment] + ([cfg.data.randaugment] if cfg.data.randaugment else []) + \
            ([f"mixup {cfg.mixup}/cutmix {cfg.cutmix}"] if cfg.mixup or cfg.cutmix else []) + \
            ([f"EMA {cfg.ema_decay}"] if cfg.ema_decay else [])
        print(f"{name:<8} {cfg.model:<22} {cfg.epochs:>6} {cfg.optimizer:<9} {cfg.lr:>8.2g}  {', '.join(extras)}")
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
        return args.func(args)
    except VitlabError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": "; the last checkpoint is saved: resume with vitlab train --resume RUN_DIR",
                "compare": "; finished epochs are saved: resume with vitlab compare --resume --out DIR"}
        print(f"vitlab: interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
