"""Training speed of vitlab's speed options on this machine: fp32 eager, bf16 autocast, torch.compile.

For a ViT, a CCT and a CIFAR ResNet at 32x32 it times full training steps (forward, backward,
AdamW) on a fixed batch, after warm-up, exactly as the trainer runs them (the same
``vitlab.train.accel`` helpers), and prints images per second side by side, with the fraction of
the CPU's peak FLOP/s each reaches. Training FLOPs per image are 3 x 2 x the forward MACs
(attention matmuls counted). The peak is measured, not looked up: the FLOP/s of the fastest large
fp32 (or, for bf16, bf16) matmul, what this CPU does through PyTorch's BLAS. Convolutions
(oneDNN) and compiled graphs can run a little above it while the clock boosts. (A nominal peak from
cores x clock x lanes is unreliable on virtual CPUs: two vCPUs may be one core's two threads, and
the clock boosts.) Compilation and warm-up time is reported apart, because it is paid once per run.

    python benchmarks/speed.py                      # the three default models
    python benchmarks/speed.py --models resnet20_cifar --batch 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

import vitlab
from vitlab.models.complexity import count_macs
from vitlab.train import accel

MODELS = ("vit_tiny_patch4_32", "cct_7_3x1_32", "resnet20_cifar")


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.5) -> float:
    """FLOP/s of the fastest large square matmul in ``dtype``: the practical peak of this CPU."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - start))
    return best


def time_training(model: nn.Module, batch: int, precision: str, compiled: bool, channels_last: bool,
                  min_seconds: float) -> tuple[float, float]:
    """(images per second, seconds of compilation and warm-up) of training steps in one mode."""
    device = torch.device("cpu")
    model = model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = accel.compile_model(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with accel.autocast(precision, device):
            loss = loss_fn(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(3):  # compiles (when compiled) and warms up the allocator
        step()
    warmup = time.perf_counter() - start
    rates = []
    for _ in range(3):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 3 or runs == 0:
            step()
            runs += 1
        rates.append(runs * batch / (time.perf_counter() - start))
    return statistics.median(rates), warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--min-seconds", type=float, default=6.0, help="timed seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    args = parser.parse_args()

    torch.set_flush_denormal(True)  # as the CLI does
    device = torch.device("cpu")
    bf16 = accel.native_bf16(device)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16) if bf16 else float("nan")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, native bf16: {bf16}")
    print(f"peak FLOP/s (fastest of 1024-4096 square matmuls): fp32 {peak32 / 1e9:.0f} G, bf16 {peak16 / 1e9:.0f} G")
    modes = [("fp32 eager", "fp32", False, False)]
    if bf16:
        modes.append(("bf16 eager", "bf16", False, False))
    if not args.no_compile:
        modes.append(("fp32 compiled", "fp32", True, False))
        if bf16:
            modes.append(("bf16 compiled", "bf16", True, False))
    header = f"{'model':<22} {'mode':<24} {'img/s':>8} {'x fp32':>7} {'GFLOP/s':>8} {'% of peak':>9} {'warm-up s':>9}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        model = vitlab.create_model(name, num_classes=10)
        flops_per_image = 6 * count_macs(model, 32)
        cnn = accel.is_convnet(model)
        model_modes = modes + ([("fp32 eager channels-last", "fp32", False, True)] if cnn else [])
        base = None
        for label, precision, compiled, channels_last in model_modes:
            fresh = vitlab.create_model(name, num_classes=10)
            fresh.load_state_dict(model.state_dict())
            rate, warmup = time_training(fresh, args.batch, precision, compiled, channels_last, args.min_seconds)
            base = base or rate
            flops = rate * flops_per_image
            peak = peak16 if precision == "bf16" else peak32
            print(f"{name:<22} {label:<24} {rate:>8.0f} {rate / base:>7.2f} {flops / 1e9:>8.1f} "
                  f"{100 * flops / peak:>8.0f}% {warmup:>9.1f}", flush=True)
            torch._dynamo.reset() if compiled else None


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main()
