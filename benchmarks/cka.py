"""vitlab's minibatch CKA against torch-cka: time, peak memory and agreement.

Both compute the full layer-by-layer CKA matrix (unbiased HSIC, summed over equal minibatches)
between the 12 blocks of two ViT-Ti/4 models (different seeds) on the same shapes images. Each
measurement runs in a fresh process, so its peak resident memory is its own; "memory" is the
peak minus the process's footprint after loading models and data. Times are split, inside the
same run, into the models' forward passes (which both must pay; torch-cka runs them with autograd
on, as its code does) and the CKA work proper: for vitlab the time in its hooks and accumulator,
for torch-cka everything outside the forward passes. Splitting inside one run keeps the figures
comparable on a machine whose speed drifts by 20% from minute to minute.

    python benchmarks/cka.py                  # 1,000 and 10,000 images (about 20 minutes)
    python benchmarks/cka.py --images 1000    # one size only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "vit_tiny_patch4_32"
LAYERS = [f"blocks.{i}" for i in range(12)]
BATCH = 250  # divides 1,000 and 10,000: every image is used, batches are equal


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def setup(num_images: int):
    import vitlab
    from vitlab.data import ShapesConfig, render_shapes

    torch.manual_seed(0)
    model_a = vitlab.create_model(MODEL).eval()
    torch.manual_seed(1)
    model_b = vitlab.create_model(MODEL).eval()
    images = render_shapes(ShapesConfig(num_images=num_images, seed=123)).images.float() / 255
    images = (images - 0.5) / 0.5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(num_images)),
                                         batch_size=BATCH)
    return model_a, model_b, loader


class Stopwatch:
    """Accumulated seconds of the calls it wraps and of the forward passes of the models it watches."""

    def __init__(self) -> None:
        self.cka = self.forward = 0.0
        self._start = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cka += time.perf_counter() - start
        return timed

    def watch(self, model: torch.nn.Module) -> None:
        def pre(module, inputs):
            self._start = time.perf_counter()

        def post(module, inputs, output):
            self.forward += time.perf_counter() - self._start

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)


def run_vitlab(model_a, model_b, loader, clock: Stopwatch) -> np.ndarray:
    from vitlab.analysis.cka import MinibatchCKA
    from vitlab.capture import Capture

    acc = MinibatchCKA(LAYERS, LAYERS)
    add, end_batch, compute = clock.wrap(acc.add), clock.wrap(acc.end_batch), clock.wrap(acc.compute)
    with Capture(model_a, LAYERS, lambda n, t: add(0, n, t)), \
         Capture(model_b, LAYERS, lambda n, t: add(1, n, t)), torch.inference_mode():
        for images, _ in loader:
            model_a(images)
            model_b(images)
            end_batch()
    matrix = compute().numpy()
    clock.forward -= clock.cka  # the Gram matrices are built in hooks, inside the forward passes
    return matrix


def run_torch_cka(model_a, model_b, loader, clock: Stopwatch) -> np.ndarray:
    import warnings

    from torch_cka import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(model_a, model_b, "a", "b", model1_layers=LAYERS, model2_layers=LAYERS, device="cpu")
        cka.compare(loader)
    return cka.export()["CKA"].numpy().astype(np.float64)


def worker(impl: str, num_images: int, out: str) -> None:
    model_a, model_b, loader = setup(num_images)
    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        images = next(iter(loader))[0]
        model_a(images), model_b(images)
    clock = Stopwatch()
    clock.watch(model_a)
    clock.watch(model_b)
    base = current_rss_mb()
    start = time.perf_counter()
    matrix = {"vitlab": run_vitlab, "torch-cka": run_torch_cka}[impl](model_a, model_b, loader, clock)
    seconds = time.perf_counter() - start
    cka = clock.cka if impl == "vitlab" else seconds - clock.forward
    np.save(out + ".npy", matrix)
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "forward": clock.forward, "cka": cka,
                                               "memory_mb": peak_rss_mb() - base}))


def measure(impl: str, num_images: int, tmp: Path) -> dict:
    out = str(tmp / f"{impl}-{num_images}")
    subprocess.run([sys.executable, __file__, "--worker", impl, "--images", str(num_images), "--out", out],
                   check=True)
    result = json.loads(Path(out + ".json").read_text())
    result["matrix"] = np.load(out + ".npy")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--worker", choices=["vitlab", "torch-cka"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.images[0], args.out)
        return

    print(f"CKA matrix of 12 x 12 blocks of two {MODEL} models, batches of {BATCH}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = (f"{'implementation':<12} {'images':>7} {'total (s)':>10} {'speed-up':>9} {'forward (s)':>12} "
              f"{'CKA work (s)':>13} {'speed-up':>9} {'peak mem (MB)':>14} {'max |diff|':>11}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.images:
            ref = measure("torch-cka", n, Path(tmp))
            ours = measure("vitlab", n, Path(tmp))
            diff = float(np.abs(ours["matrix"] - ref["matrix"]).max())
            for name, r in (("torch-cka", ref), ("vitlab", ours)):
                print(f"{name:<12} {n:>7} {r['seconds']:>10.1f} {ref['seconds'] / r['seconds']:>8.1f}x "
                      f"{r['forward']:>12.1f} {r['cka']:>13.1f} {ref['cka'] / r['cka']:>8.1f}x "
                      f"{r['memory_mb']:>14.0f} {diff if name == 'vitlab' else 0.0:>11.1e}")


if __name__ == "__main__":
    main()
