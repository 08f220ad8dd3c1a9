"""Fine-tuning a run on new data: full, linear probe, re-initialised top blocks."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitlab import VitlabError, create_model
from vitlab.train import DataConfig, TrainConfig, train
from vitlab.train.transfer import prepare_transfer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "resnet"
    cfg = TrainConfig.from_dict(dict(model="resnet20_cifar", epochs=1, batch_size=16,
                                     data=DataConfig(num_train=64, num_val=32)))
    return train(cfg, out, progress=False).run_dir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of 32x32 images: another task than shapes' ten."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir()
        for i in range(16):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def finetune(source, folder, out, **overrides):
    values = dict(model="resnet20_cifar", epochs=1, batch_size=8, finetune_from=str(source),
                  data=DataConfig(name=f"imagefolder:{folder}", val_fraction=0.25))
    values.update(overrides)
    return train(TrainConfig.from_dict(dict(**values)), out, progress=False)


def test_linear_probe_trains_only_the_classifier(source, folder, tmp_path):
    run = finetune(source, folder, tmp_path / "linear", finetune_mode="linear", lr=1e-2)
    before, after = load_file(str(source / "model.safetensors")), load_file(str(run.run_dir / "model.safetensors"))
    assert after["fc.weight"].shape == (3, 64)
    changed = [k for k in before if not k.startswith("fc.") and not torch.equal(before[k], after[k])]
    assert changed == []  # BatchNorm statistics included: the frozen features stay in eval mode
    assert not torch.equal(load_file(str(run.run_dir / "init.safetensors"))["fc.weight"], after["fc.weight"])


def test_full_fine_tuning_changes_the_backbone(source, folder, tmp_path):
    run = finetune(source, folder, tmp_path / "full")
    before, after = load_file(str(source / "model.safetensors")), load_file(str(run.run_dir / "model.safetensors"))
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])


def test_reinitialised_top_blocks_start_from_the_seeds_initialisation(source, folder, tmp_path):
    run = finetune(source, folder, tmp_path / "reinit", reinit_blocks=2, seed=5)
    start = load_file(str(run.run_dir / "init.safetensors"))
    trained = load_file(str(source / "model.safetensors"))
    torch.manual_seed(5)
    fresh = create_model("resnet20_cifar", num_classes=3).state_dict()
    assert torch.equal(start["layer3.2.conv1.weight"], fresh["layer3.2.conv1.weight"])  # the top two blocks: new
    assert torch.equal(start["layer3.1.conv2.weight"], fresh["layer3.1.conv2.weight"])
    assert torch.equal(start["layer3.0.conv1.weight"], trained["layer3.0.conv1.weight"])  # below them: transferred


def test_too_many_blocks_is_one_line(source):
    model, fresh = create_model("resnet20_cifar"), create_model("resnet20_cifar")
    with pytest.raises(VitlabError, match=r"--reinit-blocks 99: CifarResNet has 10 blocks .* choose 0 to 10"):
        prepare_transfer(model, fresh, str(source / "model.safetensors"), reinit_blocks=99)


def test_cli_finetune(source, folder, tmp_path):
    done = subprocess.run([sys.executable, "-m", "vitlab", "finetune", str(source), "--data", f"imagefolder:{folder}",
                           "--finetune-mode", "linear", "--epochs", "1", "--batch-size", "8",
                           "--out", str(tmp_path / "ft")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val acc" in done.stdout
    from vitlab.train import read_config

    cfg = read_config(tmp_path / "ft")
    assert cfg.finetune.source == str(source) and cfg.finetune.mode == "linear" and cfg.model_args["num_classes"] == 3


def test_finetune_keeps_the_source_without_its_last_attention_skip(folder, tmp_path):
    """The variant without the last block's attention skip is architecture: fine-tuning keeps it."""
    from vitlab.cli import main

    cfg = TrainConfig.from_dict(dict(model="vit_nano_patch8_32", epochs=1, batch_size=16, last_attention_skip=False,
                      data=DataConfig(num_train=32, num_val=16)))
    source = train(cfg, tmp_path / "src", progress=False).run_dir
    assert main(["finetune", str(source), "--data", f"imagefolder:{folder}", "--epochs", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "ft")]) == 0
    from vitlab.runs import build_model
    from vitlab.train import read_config

    tuned = read_config(tmp_path / "ft")
    assert tuned.last_attention_skip is False
    assert isinstance(build_model(tuned).blocks[-1].norm2, torch.nn.Identity)
