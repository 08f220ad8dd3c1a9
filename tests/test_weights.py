"""Weights from elsewhere: timm checkpoints by name, pickles refused unless trusted."""


import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab import VitlabError
from vitlab.weights import load_weights_file


def save_safetensors(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class _Marker:
    """Unpickling this object runs code (it creates a file): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_timm_checkpoint_loads_into_the_same_timm_model(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    target = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    report = load_weights_file(target, save_safetensors(source, tmp_path / "w.safetensors"))
    assert report.loaded == len(source.state_dict()) and not report.skipped
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(source(x), target(x))


def test_timm_checkpoint_loads_into_a_vitlab_model_by_name(tmp_path):
    # ImageNet ViT-Ti/16 (1000 classes) into vitlab's 32x32 ViT-Ti/4 for 10 classes: every block
    # loads as it is, the patch and position embeddings are resampled, the classifier is new.
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    target = vitlab.create_model("vit_tiny_patch4_32", num_classes=10)
    head_before = target.head.weight.clone()
    report = load_weights_file(target, save_safetensors(source, tmp_path / "w.safetensors"))
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert torch.equal(target.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)
    assert target.pos_embed.shape == (1, 65, 192) and target.patch_embed.proj.weight.shape == (192, 3, 4, 4)
    assert torch.equal(target.head.weight, head_before)


def test_wrapped_and_prefixed_checkpoints_are_unwrapped(tmp_path):
    source = vitlab.create_model("resnet20_cifar")
    path = tmp_path / "train.pth"
    # what a DDP training script saves: a dict with the state dict under a key, names with "module."
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = vitlab.create_model("resnet20_cifar")
    load_weights_file(target, path, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_pickle_is_refused_unless_trusted_and_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Marker(marker)}, path)
    model = vitlab.create_model("resnet20_cifar")
    with pytest.raises(VitlabError, match="is a pickle checkpoint, which can run code when loaded; convert it to "
                                          "safetensors, or pass --trust-pickle"):
        load_weights_file(model, path)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_one_clear_line(tmp_path):
    path = save_safetensors(vitlab.create_model("resnet20_cifar"), tmp_path / "r20.safetensors")
    with pytest.raises(VitlabError,
                       match=r"does not fit VisionTransformer \(missing: .*is it a checkpoint of this model"):
        load_weights_file(vitlab.create_model("vit_nano_patch4_32"), path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(VitlabError, match="is not valid safetensors"):
        load_weights_file(vitlab.create_model("resnet20_cifar"), tmp_path / "bad.safetensors")


def test_cli_train_from_weights_and_analyze_model_at_file(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = vitlab.create_model("vit_nano_patch4_32", num_classes=10)
    path = save_safetensors(source, tmp_path / "vit.safetensors")
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    common = ["train", "--model", "vit_nano_patch4_32", "--epochs", "1", "--batch-size", "32", "--num-train", "64",
              "--num-val", "32"]
    code, _, err = cli(*common, "--init-weights", tmp_path / "vit.pth", "--out", tmp_path / "a")
    assert code == 2 and "pass --trust-pickle" in err and "Traceback" not in err
    code, _, err = cli(*common, "--init-weights", tmp_path / "vit.pth", "--trust-pickle", "--out", tmp_path / "a")
    assert code == 0, err[-2000:]
    init = load_weights_file(vitlab.create_model("vit_nano_patch4_32", num_classes=10),
                             tmp_path / "a" / "init.safetensors")
    assert init.loaded == len(source.state_dict())
    from vitlab.train import read_config

    assert read_config(tmp_path / "a").init_weights == str(tmp_path / "vit.pth")
    code, _, err = cli("analyze", f"vit_nano_patch4_32@{path}", "--analyses", "cka", "--analysis-images", "64",
                       "--analysis-batch-size", "32", "--num-val", "64", "--out", tmp_path / "report")
    assert code == 0, err[-2000:]
    assert "vit_nano_patch4_32@vit" in (tmp_path / "report" / "results.json").read_text()


def test_a_failing_checkpoint_filter_warns_naming_itself_and_names_are_matched_as_they_are(tmp_path, monkeypatch):
    import vitlab.models.cct as cct

    def official_names_only(state_dict, model):
        raise KeyError("classifier.positional_emb")

    source = vitlab.create_model("cct_2_3x2_32")
    path = save_safetensors(source, tmp_path / "cct.safetensors")
    monkeypatch.setattr(cct, "checkpoint_filter_fn", official_names_only)
    target = vitlab.create_model("cct_2_3x2_32")
    name = f"{__name__}.test_a_failing_checkpoint_filter_warns_naming_itself_and_names_are_matched_as_they_are" \
           ".<locals>.official_names_only"
    with pytest.warns(UserWarning) as record:
        report = load_weights_file(target, path)
    (warning,) = [w for w in record if "could not adapt" in str(w.message)]
    assert str(warning.message) == (f"{name} could not adapt '{path}' (KeyError: 'classifier.positional_emb'); "
                                    "matching parameter names as they are")
    assert report.loaded == len(source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
