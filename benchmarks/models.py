"""Every vitlab model at 32x32 on this machine: parameters, MACs, training and inference speed.

Where another implementation of the same architecture exists, it is built with the same
configuration and timed in the same run, interleaved with vitlab's: timm for ViT, Mixer and
LeViT (vitlab registers these on timm's classes, so the comparison checks that vitlab's builders
and input checks add no overhead), and vit-pytorch for CCT and its sine variants. This VM's speed
drifts by ~20% from minute to minute, so a ratio (vitlab / reference images per second) is the
median over alternating rounds (A B, B A, ...) of measurements taken seconds apart; the last line
gives the median ratio over every model and both modes. Paper-resolution models are rebuilt with
``img_size=32``. MACs count every matmul and convolution, attention's included.

    python benchmarks/models.py                       # every model (about 40 minutes on 2 cores)
    python benchmarks/models.py --models 'cct*'       # a subset (shell pattern)
    python benchmarks/models.py --markdown docs/models.md   # also write the table as Markdown
    python benchmarks/models.py --models 'cvt*' --markdown docs/models.md --update   # re-measure some rows
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn

import vitlab
from vitlab.models.complexity import count_macs

TRAIN_BATCH, INFER_BATCH = 64, 256


def build_at_32(name: str) -> nn.Module | None:
    """vitlab's model built for 32x32 input (paper-resolution ones with img_size=32), or None."""
    for overrides in ({}, {"img_size": 32}):
        try:
            model = vitlab.create_model(name, **overrides)
            with torch.no_grad():  # two images: a 1x1 BatchNorm map (CvT at 32x32) needs more than one value
                model(torch.zeros(2, 3, 32, 32))
            return model
        except Exception:  # noqa: BLE001  (a model that cannot take 32x32 at all is reported as such)
            continue
    return None


def reference_for(name: str, model: nn.Module) -> tuple[str, Callable[[], nn.Module]] | None:
    """The other implementation of ``name``'s architecture with the same configuration, if one exists."""
    from timm.models.levit import Levit
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, (VisionTransformer, MlpMixer, Levit)):
        # The same timm class and arguments, built by timm itself (no vitlab wrapper around it).
        return "timm", lambda: timm.create_model(name, **_img_size_override(name, model))
    if name.startswith("cct_"):
        try:
            from vit_pytorch.cct import CCT
        except ImportError:
            return None
        return "vit-pytorch", lambda: CCT(**vit_pytorch_cct_args(model))
    return None


def _img_size_override(name: str, model: nn.Module) -> dict:
    cfg = timm.models.get_pretrained_cfg(name)
    return {} if cfg and cfg.input_size[-1] == 32 else {"img_size": 32}


def vit_pytorch_cct_args(model: nn.Module) -> dict:
    """vit-pytorch's CCT arguments for a vitlab CCT, read off the built model (same dropout defaults)."""
    conv = model.patch_embed.stages[0].conv
    block = model.blocks[0]
    pos = "none" if model.pos_embed is None else ("learnable" if model.pos_embed.requires_grad else "sine")
    return dict(
        img_size=model.img_size[0], embedding_dim=model.embed_dim, n_conv_layers=len(model.patch_embed.stages),
        kernel_size=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
        num_layers=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim, num_classes=model.num_classes,
        positional_embedding=pos,
    )


def _seconds_per_step(step: Callable[[], None], min_seconds: float, min_steps: int) -> float:
    """Mean seconds of ``step`` after one warm-up call, over at least ``min_steps`` calls and ``min_seconds``."""
    step()
    count, start = 0, time.perf_counter()
    while count < min_steps or time.perf_counter() - start < min_seconds:
        step()
        count += 1
    return (time.perf_counter() - start) / count


def time_train(model: nn.Module, min_seconds: float) -> float:
    """Training images per second: forward, loss on every output (early exits have several), backward, AdamW."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(TRAIN_BATCH, 3, 32, 32), torch.randint(0, 10, (TRAIN_BATCH,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        out = model(x)
        loss = sum(loss_fn(o, y) for o in ([out] if torch.is_tensor(out) else out))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return TRAIN_BATCH / _seconds_per_step(step, min_seconds, min_steps=2)


def time_infer(model: nn.Module, min_seconds: float) -> float:
    """Inference images per second (eval mode, no autograd)."""
    model.eval()
    x = torch.randn(INFER_BATCH, 3, 32, 32)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return INFER_BATCH / _seconds_per_step(step, min_seconds, min_steps=1)


def measure(models: list[nn.Module], rounds: int,
            min_seconds: float) -> tuple[list[tuple[float, float]], tuple[float, float] | None]:
    """Median (train, infer) images/s of each model, and for a pair the median per-round speed ratios.

    Rounds alternate the order (A B, B A, ...) and each ratio compares measurements taken seconds
    apart, so the machine's slow drift in speed cancels out of the ratios.
    """
    train = [[] for _ in models]
    infer = [[] for _ in models]
    for r in range(rounds):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            train[i].append(time_train(models[i], min_seconds))
            infer[i].append(time_infer(models[i], min_seconds))
    speeds = [(statistics.median(t), statistics.median(f)) for t, f in zip(train, infer)]
    if len(models) < 2:
        return speeds, None
    ratios = (statistics.median(a / b for a, b in zip(train[0], train[1])),
              statistics.median(a / b for a, b in zip(infer[0], infer[1])))
    return speeds, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="*", help="shell pattern of vitlab model names (default all)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds for models with a reference (default 4)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each measurement at least this long")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--update", action="store_true",
                        help="with --markdown: replace only the measured models' rows of an existing table")
    args = parser.parse_args()

    names = [n for n in vitlab.list_models() if fnmatch.fnmatch(n, args.models)]
    header = ("model", "params", "MMACs", "train img/s", "infer img/s", "reference", "train ratio", "infer ratio")
    rows, ratios = [], []
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
          f"train batch {TRAIN_BATCH}, inference batch {INFER_BATCH}, 32x32 input")
    print(" | ".join(header))
    for name in names:
        torch.manual_seed(0)
        model = build_at_32(name)
        if model is None:
            rows.append((name, f"{vitlab.count_parameters(name):,}", "does not take 32x32", "", "", "", "", ""))
            print(" | ".join(rows[-1]), flush=True)
            continue
        params, macs = vitlab.count_parameters(model), count_macs(model, 32)
        ref = reference_for(name, model)
        candidates = [model] + ([ref[1]()] if ref else [])
        speeds, pair = measure(candidates, args.rounds if ref else 1, args.min_seconds)
        (train_ips, infer_ips), ref_row = speeds[0], ("", "", "")
        if pair:
            rt, ri = pair
            ratios += [rt, ri]
            ref_row = (ref[0], f"{rt:.2f}", f"{ri:.2f}")
        rows.append((name, f"{params:,}", f"{macs / 1e6:.1f}", f"{train_ips:.0f}", f"{infer_ips:.0f}", *ref_row))
        print(" | ".join(rows[-1]), flush=True)
    if ratios:
        print(f"median vitlab / reference speed ratio over {len(ratios) // 2} models (train and inference): "
              f"{statistics.median(ratios):.2f}")
    if args.markdown:
        if args.update and args.markdown.exists():  # keep the other models' rows of an earlier full run
            measured = {r[0] for r in rows}
            kept = [line for line in args.markdown.read_text().splitlines()[6:]
                    if line.startswith("| ") and line.split(" | ")[0][2:] not in measured]
            rows = sorted([tuple(c.strip() for c in line.strip("| ").split(" | ")) for line in kept] + rows)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        paired = [float(x) for r in rows if len(r) > 7 and r[6] for x in (r[6], r[7])]
        summary = (f"\nMedian vitlab / reference speed ratio over {len(paired) // 2} models with a reference "
                   f"(training and inference): {statistics.median(paired):.2f}.\n" if paired else "")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            "# vitlab models at 32x32\n\nGenerated by `python benchmarks/models.py --markdown docs/models.md` "
            f"({torch.get_num_threads()} CPU threads; train batch {TRAIN_BATCH}, inference batch {INFER_BATCH}; a "
            "ratio is vitlab / reference images per second, the median over alternating rounds). Models made for "
            "larger images are rebuilt with `img_size=32`, so their position embeddings, and parameter counts, are "
            "smaller than `vitlab models` shows; MACs count every matmul and convolution, attention's included.\n\n"
            + "\n".join(lines) + "\n" + summary)


if __name__ == "__main__":
    main()
