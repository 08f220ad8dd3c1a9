"""Time the default ``vitlab compare`` end to end, as a user runs it, and print a table.

Runs ``vitlab compare`` in a fresh process (start-up and imports included) into a temporary
directory and reports the wall-clock time, the time of each stage (from ``results.json``) and the
accuracy each model reached.

    python benchmarks/compare.py              # the default comparison (about five minutes)
    python benchmarks/compare.py --epochs 1   # any extra options go to vitlab compare
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compare"
        env = dict(os.environ, VITLAB_CACHE=str(Path(tmp) / "cache"))  # cold cache: rendering included
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vitlab", "compare", "--out", str(out), *extra], check=True,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())

    print(f"vitlab compare {' '.join(extra)}".strip() + f": {os.cpu_count()} CPUs")
    print(f"{'stage':<40} {'seconds':>8}")
    print("-" * 49)
    for stage, seconds in results["meta"]["timings_s"].items():
        if stage != "total":
            print(f"{stage:<40} {seconds:>8.1f}")
    print(f"{'inside compare (total)':<40} {results['meta']['timings_s']['total']:>8.1f}")
    print(f"{'wall clock, start-up included':<40} {wall:>8.1f}")
    print()
    print(f"{'model':<28} {'params':>10} {'epochs':>7} {'train (s)':>10} {'img/s':>7} {'val acc':>8}")
    print("-" * 74)
    for m in results["models"]:
        print(f"{m['name']:<28} {m['params']:>10,} {m['epochs']:>7} {m['train_time_s']:>10.1f} "
              f"{m['train_images_per_s']:>7.0f} {100 * m['val_acc']:>7.1f}%")


if __name__ == "__main__":
    main()
