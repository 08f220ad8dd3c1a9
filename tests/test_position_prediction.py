"""MP3 position prediction: keys from a subset of the patches, a head that learns positions, fine-tuning after."""

import subprocess
import sys

import pytest
import torch

from vitlab import VitlabError, create_model
from vitlab.train import read_config
from vitlab.train.position_prediction import PositionPrediction


def test_logits_cover_every_position_of_every_token():
    task = PositionPrediction(create_model("vit_nano_patch8_sincos_32", depth=2)).eval()
    logits = task(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 16, 16)  # (images, tokens, positions) for a 4x4 grid
    assert torch.equal(task.targets(3)[:16], torch.arange(16))


def test_queries_attend_only_to_the_kept_patches():
    torch.manual_seed(0)
    task = PositionPrediction(create_model("vit_nano_patch8_sincos_32", depth=2), keep=0.25).eval()
    images = torch.randn(1, 3, 32, 32)
    torch.manual_seed(1)
    before = task(images)
    torch.manual_seed(1)  # the same kept patches
    kept = torch.rand(1, 16).argsort(1)[0, :4].tolist()
    dropped = next(i for i in range(16) if i not in kept)
    changed = images.clone()
    r, c = divmod(dropped, 4)
    changed[..., 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.0  # perturb one patch that is not a key
    torch.manual_seed(1)
    after = task(changed)
    moved = (after - before).abs().amax(-1)[0]
    assert moved[dropped] > 1e-4  # its own output changes (it is still a query) ...
    assert torch.all(moved[[i for i in range(16) if i != dropped]] < 1e-5)  # ... nobody else's does


def test_only_vits_can_predict_positions():
    with pytest.raises(VitlabError, match="MP3 position prediction needs a ViT"):
        PositionPrediction(create_model("resnet20_cifar"))


def test_pretrain_learns_positions_and_fine_tunes(tmp_path):
    common = ["--num-train", "1024", "--num-val", "256", "--batch-size", "64"]
    done = subprocess.run([sys.executable, "-m", "vitlab", "pretrain", "--objective", "mp3", "--model",
                           "vit_nano_patch8_sincos_32", "--epochs", "8", "--lr", "1e-3", "--warmup-epochs", "0.5",
                           *common, "--out", str(tmp_path / "mp3")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = read_config(tmp_path / "mp3")
    assert cfg.objective == "mp3" and cfg.mp3.keep == 0.25
    import csv

    rows = list(csv.DictReader(open(tmp_path / "mp3" / "metrics.csv")))
    assert float(rows[-1]["val_acc"]) > 2 / 16  # twice chance on a 4x4 grid
    tuned = subprocess.run([sys.executable, "-m", "vitlab", "finetune", str(tmp_path / "mp3"), "--epochs", "1",
                            *common, "--out", str(tmp_path / "ft")], capture_output=True, text=True)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert read_config(tmp_path / "ft").objective == "supervised"


def test_mp3_with_mixup_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vitlab", "pretrain", "--objective", "mp3", "--mixup", "0.8",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "turn them off for --objective mp3" in done.stderr


@pytest.mark.parametrize("bare_head_format", [False, True])
def test_pretraining_resumes_exactly(tmp_path, bare_head_format):
    """Also from checkpoints written before the objectives' shared protocol, which held the head's
    state unprefixed (``weight``, ``bias``)."""
    from safetensors.torch import load_file

    from vitlab.train import DataConfig, TrainConfig, train

    cfg = TrainConfig.from_dict(dict(model="vit_nano_patch8_sincos_32", objective="mp3", epochs=2, batch_size=16,
                      checkpoint_every=1, model_args={"depth": 2}, data=DataConfig(num_train=48, num_val=16)))
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after_step=4)  # mid-epoch 2: the position head is restored too
    if bare_head_format:
        for path in (tmp_path / "cut").glob("state-*.pt"):  # rewrite the task state as the old trainer saved it
            state = torch.load(path, weights_only=True)
            assert set(state["task"]) == {"head.weight", "head.bias"}
            state["task"] = {key.removeprefix("head."): value for key, value in state["task"].items()}
            torch.save(state, path)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_foreign_task_state_is_refused_in_one_line():
    task = PositionPrediction(create_model("vit_nano_patch8_sincos_32", depth=2))
    with pytest.raises(VitlabError, match="pretraining state does not fit this run"):
        task.load_task_state({"decoder.weight": torch.zeros(1)})
