"""The QnA layer against the attention layers it replaces: time and peak memory, forward + backward.

QnA's claim (Arar et al.) is local attention with overlapping windows at the cost of a convolution.
On the same (B, H, W, C) input this script times, side by side in one run:

* ``qna``            vitlab's QnA layer (window softmax as two depthwise convolutions);
* ``qna-unfold``     the same layer with explicit windows (``QnALayer.forward_unfold``), the
                     textbook implementation, which materialises every k x k window of values;
* ``sliding-sa``     sliding-window self-attention over the same k x k windows (every token its
                     own query: the layer QnA approximates with learned queries);
* ``window-sa``      non-overlapping window self-attention (Swin-style, relative position bias;
                     the LSA blocks of QnA-ViT) with 7 x 7 windows on 56 x 56 and 8 x 8 on 16 x 16.

Each measurement runs in a fresh process, so its peak resident memory (``ru_maxrss`` minus the
footprint before the first pass) is its own. The shapes are QnA-ViT-tiny's first stage at 224
(56 x 56 x 64, 8 heads) and at 32 (``qna_vit_tiny_32``: 16 x 16 x 64).

    python benchmarks/qna.py                 # both shapes, batch 16
    python benchmarks/qna.py --batch 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS = ("qna", "qna-unfold", "sliding-sa", "window-sa")
# (grid rows, grid columns, channels, window-sa window): windows must tile the grid.
SHAPES = {"224 stage 1": (56, 56, 64, 7), "32 stage 1": (16, 16, 64, 8)}
HEADS, KERNEL = 8, 3


class SlidingWindowSelfAttention(nn.Module):
    """Self-attention of every token over its k x k neighbourhood (zero-padded windows left out)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.kernel_size = num_heads, dim // num_heads, kernel_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        nh, hd, k = self.num_heads, self.head_dim, self.kernel_size
        q, key, v = self.qkv(x).chunk(3, dim=-1)

        def unfold(t):
            return F.unfold(t.permute(0, 3, 1, 2), k, padding=k // 2).view(b, nh, hd, k * k, h * w)

        inside = F.unfold(x.new_ones(1, 1, h, w), k, padding=k // 2).view(1, 1, k * k, h * w) > 0
        q = q.reshape(b, h * w, nh, hd).permute(0, 2, 3, 1).unsqueeze(3)  # b, nh, hd, 1, L
        logits = (q * unfold(key)).sum(2) * hd**-0.5  # b, nh, k*k, L
        probs = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
        out = (probs.unsqueeze(2) * unfold(v)).sum(3)  # b, nh, hd, L
        return self.proj(out.reshape(b, c, h * w).transpose(1, 2).reshape(b, h, w, c))


def build(layer: str, dim: int, window: int) -> tuple[nn.Module, str]:
    from vitlab.models.qna import LocalSelfAttention, QnALayer

    if layer in ("qna", "qna-unfold"):
        module = QnALayer(dim, num_heads=HEADS, kernel_size=KERNEL)
        return module, "forward" if layer == "qna" else "forward_unfold"
    if layer == "sliding-sa":
        return SlidingWindowSelfAttention(dim, HEADS, KERNEL), "forward"
    return LocalSelfAttention(dim, HEADS, window), "forward"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(layer: str, shape: tuple[int, int, int, int], batch: int, steps: int) -> dict:
    """Median seconds of one forward + backward pass of ``layer``, and its peak extra memory (this process)."""
    torch.manual_seed(0)
    h, w, dim, window = shape
    module, method = build(layer, dim, window)
    forward = getattr(module, method)
    x = torch.randn(batch, h, w, dim, requires_grad=True)
    base = current_rss_mb()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        forward(x).square().mean().backward()
        if i:  # the first pass warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "memory_mb": peak_rss_mb() - base,
            "params": sum(p.numel() for p in module.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("LAYER", "SHAPE"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], SHAPES[args.one[1]], args.batch, args.steps)))
        return

    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, forward + backward, "
          f"{HEADS} heads, QnA and sliding windows {KERNEL}x{KERNEL}, window-sa windows 7x7 (56x56), 8x8 (16x16)")
    print(f"{'shape':<12} {'layer':<11} {'params':>7} {'ms/pass':>8} {'vs qna':>7} {'peak MB':>8} {'vs qna':>7}")
    for shape in SHAPES:
        rows = {}
        for layer in LAYERS:
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--one", layer, shape]
            rows[layer] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        ref = rows["qna"]
        for layer, r in rows.items():
            print(f"{shape:<12} {layer:<11} {r['params']:>7,} {r['seconds'] * 1e3:>8.1f} "
                  f"{r['seconds'] / ref['seconds']:>6.2f}x {r['memory_mb']:>8.0f} "
                  f"{r['memory_mb'] / max(ref['memory_mb'], 1e-9):>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
