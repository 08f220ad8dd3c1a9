"""Small-data training methods side by side on ``shapes``: mean and spread over seeds.

One ViT, one data set, one budget of epochs; only the method changes:

* ``baseline``: plain supervised training;
* ``spatial-entropy``: the spatial entropy regulariser (Peruzzo et al.), its weight warmed up over
  the first epoch then decayed;
* ``mp3``: MP3 position prediction (Zhai et al.) for half the epochs, then supervised fine-tuning
  (``vitlab finetune``) for the other half, so the total number of passes is the same;
* ``conv-init``: attention initialised as a 3x3 convolution (every head on one offset).

Every run is an ordinary ``vitlab train`` / ``pretrain`` / ``finetune`` run (seeded: the same seed
gives the same number), with its own data seed, initialisation and order. Prints a table of the
validation accuracy, mean and standard deviation over the seeds (``--markdown FILE`` also writes
it), with the seconds each method took.

    python benchmarks/small_data_methods.py                  # 4 methods x 3 seeds, ~15 minutes
    python benchmarks/small_data_methods.py --seeds 0 --methods baseline,conv-init
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from vitlab.data import DataConfig
from vitlab.train import TrainConfig, train

METHODS = ("baseline", "spatial-entropy", "mp3", "conv-init")


def base_config(model: str, epochs: int, seed: int, num_train: int) -> TrainConfig:
    """The shared schedule: the default comparison's ViT recipe on un-augmented shapes."""
    data = DataConfig(name="shapes", num_train=num_train, num_val=2_000, augment="none")
    return TrainConfig(model=model, data=data, epochs=epochs, batch_size=32, lr=1e-3, warmup_epochs=0.4,
                       weight_decay=0.05, seed=seed)


def run_method(method: str, cfg: TrainConfig, out: Path) -> float:
    """Train ``cfg`` with ``method`` into ``out``; returns the final validation accuracy."""
    final = out.with_name(out.name + "-finetune") if method == "mp3" else out  # the run that ends the method
    if (final / "metrics.csv").exists():  # finished earlier: read back, not trained again
        from vitlab.runs.rundir import read_metrics

        metrics = read_metrics(final)
        if metrics and metrics[-1]["epoch"] >= (cfg.epochs - cfg.epochs // 2 if method == "mp3" else cfg.epochs):
            return metrics[-1]["val_acc"]
    if method == "baseline":
        return train(cfg, out, overwrite=True, progress=False).val_acc
    if method == "spatial-entropy":
        return train(cfg.merged({"spatial_entropy": 0.01, "spatial_entropy_warmup": 1.0}), out, overwrite=True,
                     progress=False).val_acc
    if method == "conv-init":
        return train(cfg.merged({"conv_init": 3}), out, overwrite=True, progress=False).val_acc
    if method == "mp3":  # half the epochs predicting positions, half fine-tuning with labels
        pre = cfg.epochs // 2
        train(cfg.merged({"objective": "mp3", "epochs": pre, "label_smoothing": 0.0}), out, overwrite=True,
              progress=False)
        tuned = cfg.merged({"epochs": cfg.epochs - pre, "finetune_from": str(out), "warmup_epochs": 0.2})
        return train(tuned, final, overwrite=True, progress=False).val_acc
    raise ValueError(f"unknown method {method}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--model", default="vit_nano_patch8_sincos_32")
    p.add_argument("--epochs", type=int, default=4, help="the budget every method gets (MP3: half, then half)")
    p.add_argument("--num-train", type=int, default=10_000, help="shapes training images")
    p.add_argument("--out", default="runs/small-data-methods")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method {bad[0]}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in methods:
        accs, started = [], time.perf_counter()
        for seed in seeds:
            cfg = base_config(args.model, args.epochs, seed, args.num_train)
            accs.append(run_method(method, cfg, Path(args.out) / f"{method}-seed{seed}"))
            print(f"{method} seed {seed}: val acc {accs[-1]:.4f}", flush=True)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append((method, accs, spread, (time.perf_counter() - started) / len(seeds)))
    lines = [f"{args.model} on shapes ({args.num_train:,} training images, 2,000 validation), {args.epochs} epochs, "
             f"seeds {', '.join(map(str, seeds))}", "",
             "| method | val acc mean | std | per seed | s per run |", "|---|---|---|---|---|"]
    for method, accs, spread, seconds in rows:
        lines.append(f"| {method} | {statistics.mean(accs):.2%} | {spread:.2%} | "
                     f"{', '.join(f'{a:.1%}' for a in accs)} | {seconds:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
