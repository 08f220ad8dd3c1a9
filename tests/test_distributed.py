"""torchrun with two gloo processes on one CPU gives what one process gives."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

TRAIN = ["train", "--model", "vit_nano_patch4_32", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
         "--warmup-epochs", "0.5", "--num-train", "64", "--num-val", "40", "--seed", "3"]


def vitlab(args, world_size: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "vitlab"] if world_size == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
         "-m", "vitlab"]
    # one thread per process in both cases, as torchrun sets it, so only the world size differs
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launcher + list(map(str, args)), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    vitlab(TRAIN + ["--out", root / "one"])
    two = vitlab(TRAIN + ["--out", root / "two"], world_size=2)
    return root, two


def test_two_processes_with_half_batches_train_like_one(runs):
    root, _ = runs
    one, two = load_file(str(root / "one" / "model.safetensors")), load_file(str(root / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    # 8 steps of AdamW: equal up to the order in which the gradient sums were added. Except the
    # key bias: softmax ignores it, so its gradient is rounding noise that Adam scales up to lr-sized
    # steps (whose sign depends on the summation order); it changes no output.
    dim = one["cls_token"].shape[-1]
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.qkv.bias"):
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), key
    m1, m2 = (list(csv.DictReader(open(root / run / "metrics.csv"))) for run in ("one", "two"))
    assert len(m1) == len(m2) == 2
    # training sums are added over the ranks, validation is over all 40 images (20 + 20)
    for key in ("train_acc", "val_acc"):
        assert [r[key] for r in m1] == [r[key] for r in m2]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([float(r[key]) for r in m1], [float(r[key]) for r in m2], rtol=1e-5)


def test_only_rank_zero_writes_and_speaks(runs):
    root, two = runs
    assert two.stdout.count("val acc") == 1  # one summary, not one per process
    names = sorted(p.name for p in (root / "two").iterdir())
    assert names == sorted(["config.yaml", "init.safetensors", "model.safetensors", "metrics.csv",
                            "state-00000004.pt", "state-00000008.pt"])


def test_distributed_analysis_matches_one_process(runs, tmp_path):
    root, _ = runs
    args = ["analyze", root / "one", root / "two", "--analyses", "cka,attention_distance,skip_connections",
            "--analysis-images", "96", "--analysis-batch-size", "32"]  # 3 batches: rank 0 takes 2, rank 1 one
    vitlab(args + ["--out", tmp_path / "single"])
    vitlab(args + ["--out", tmp_path / "double"], world_size=2)
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    double = json.loads((tmp_path / "double" / "results.json").read_text())
    assert single["cka"].keys() == double["cka"].keys() and len(single["cka"]) == 3
    for pair in single["cka"]:
        np.testing.assert_allclose(single["cka"][pair]["matrix"], double["cka"][pair]["matrix"], atol=1e-6, rtol=0)
    for model in single["attention_distance"]:
        np.testing.assert_allclose(single["attention_distance"][model]["distances"],
                                   double["attention_distance"][model]["distances"], atol=1e-6, rtol=0)
    assert json.dumps(single["skip_connections"]) != "{}"
    for model in single["skip_connections"]:
        np.testing.assert_allclose(single["skip_connections"][model]["spatial_ratio"],
                                   double["skip_connections"][model]["spatial_ratio"], rtol=1e-9)
