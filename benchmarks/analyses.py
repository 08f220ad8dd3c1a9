"""Time and peak memory of every analysis on 1,000 and 10,000 images, for a ViT and a ResNet.

Each (analysis, model, images) measurement runs in a fresh process, so its peak resident memory
is its own; "memory" is the peak minus the process's footprint after the model and the images
are loaded (the images themselves, 12 MB per 1,000, are not counted), with glibc told to map
large blocks (see ``WORKER_ENV``) so that the peak is the peak of live memory. Analyses stream their data
through float64 sums, so memory should stay flat from 1,000 to 10,000 images while time grows
linearly. The images are ``shapes`` validation images; the models are untrained (speed and
memory do not depend on the weights). Analyses whose work does not depend on the number of
images (feature visualisation: a fixed number of optimisation steps; convolution as attention)
are timed once.

    python benchmarks/analyses.py                      # everything (about 40 minutes on 2 cores)
    python benchmarks/analyses.py --images 1000 --analyses cka,probes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

MODELS = ("vit_nano_patch4_32", "resnet20_cifar")
# glibc keeps freed blocks of the (many, large, short-lived) activation tensors in its heap, so the
# peak resident memory of a long run would measure fragmentation, not what the analysis holds.
# Large blocks always mapped (and unmapped when freed) make the peak the peak of live memory.
WORKER_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
BATCH = 250
FIXED_COST = ("feature_visualisation", "conv_attention")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(analysis: str, model: str, num_images: int) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from vitlab.analysis.subjects import subject_from_name
    from vitlab.analysis.suite import AnalysisOptions, run_analyses
    from vitlab.data import ShapesConfig, load_shapes

    torch.set_flush_denormal(True)  # as the vitlab command does
    torch.manual_seed(0)
    subject = subject_from_name(model)
    arrays = load_shapes(ShapesConfig(num_images=num_images, seed=321))
    data = TensorDataset(arrays.images.float() / 255, arrays.labels)
    loader = DataLoader(data, batch_size=BATCH)
    options = AnalysisOptions(probe_images=num_images, robustness_images=num_images, erf_images=num_images,
                              shape_bias_images=num_images, featvis_layers=2, featvis_units=2)
    base = current_rss_mb()
    start = time.perf_counter()
    if analysis == "shape_bias":  # the suite runs it on trained shapes runs only; time it on the model itself
        from vitlab.analysis.shape_bias import shapes_shape_bias

        shapes_shape_bias(subject, num_images=num_images)
        applies = True
    else:
        result = run_analyses([subject], loader, [analysis], progress=False, options=options,
                              train_loader=lambda: loader)
        applies = analysis in ("cka", "attention_distance") or analysis in result.results
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "memory_mb": peak_rss_mb() - base, "applies": applies}


def main() -> None:
    from vitlab.analysis.suite import ANALYSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--analyses", default=",".join(a for a in ANALYSES if a != "feature_reuse"),
                        help="comma-separated analyses (feature reuse needs two runs and is left out by default)")
    parser.add_argument("--worker", nargs=3, metavar=("ANALYSIS", "MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return

    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, batches of {BATCH}, untrained models")
    header = f"{'analysis':<22} {'model':<20} " + " ".join(f"{f'{n:,} img (s)':>14} {'MB':>6}" for n in args.images)
    print(header)
    print("-" * len(header))
    for analysis in args.analyses.split(","):
        for model in MODELS:
            cells, applies = [], True
            for n in (args.images[:1] if analysis in FIXED_COST else args.images):
                cmd = [sys.executable, __file__, "--worker", analysis, model, str(n)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                              env=WORKER_ENV).stdout.splitlines()[-1])
                applies = r["applies"]
                cells.append(f"{r['seconds']:>14.1f} {r['memory_mb']:>6.0f}")
            line = f"{analysis:<22} {model:<20} " + (" ".join(cells) if applies else "   (does not apply)")
            print(line, flush=True)


if __name__ == "__main__":
    main()
