"""Speed options: bf16 only where native, torch.compile, channels-last for CNNs."""

import pytest
import torch
from safetensors.torch import load_file

from vitlab import VitlabError, create_model
from vitlab.train import DataConfig, TrainConfig, accel, train

NATIVE_BF16 = accel.native_bf16(torch.device("cpu"))


def tiny(**overrides) -> TrainConfig:
    values = dict(model="vit_nano_patch4_32", epochs=1, batch_size=16, model_args={"depth": 1},
                  data=DataConfig(num_train=32, num_val=16))
    values.update(overrides)
    return TrainConfig.from_dict(dict(**values))


def final_weights(run):
    return load_file(str(run / "model.safetensors"))


def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(accel, "native_bf16", lambda device: False)
    assert accel.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert accel.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(VitlabError, match="this CPU has no native bf16 .*use --precision fp32 or auto"):
        accel.resolve_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(accel, "native_bf16", lambda device: True)
    assert accel.resolve_precision("auto", torch.device("cpu")) == "bf16"


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_training_really_autocasts_and_stays_deterministic(tmp_path):
    fp32 = train(tiny(), tmp_path / "fp32", progress=False)
    a = train(tiny(precision="bf16"), tmp_path / "a", progress=False)
    b = train(tiny(precision="bf16"), tmp_path / "b", progress=False)
    wa, wb, w32 = final_weights(a.run_dir), final_weights(b.run_dir), final_weights(fp32.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], w32[k]) for k in wa)  # the forward ran in bf16
    assert all(v.dtype == torch.float32 for v in wa.values())  # the weights stay fp32


def test_channels_last_is_on_for_cnns_only():
    assert accel.use_channels_last("auto", create_model("resnet20_cifar"))
    assert not accel.use_channels_last("auto", create_model("vit_nano_patch4_32"))
    assert accel.use_channels_last("on", create_model("vit_nano_patch4_32"))


def test_channels_last_training_matches_the_default_layout(tmp_path):
    cfg = dict(model="resnet20_cifar", model_args={})
    plain = train(tiny(**cfg), tmp_path / "plain", progress=False)
    last = train(tiny(**cfg, channels_last="on"), tmp_path / "last", progress=False)
    wp, wl = final_weights(plain.run_dir), final_weights(last.run_dir)
    assert all(torch.allclose(wp[k].float(), wl[k].float(), atol=1e-4) for k in wp)


def test_compiled_training_matches_eager(tmp_path):
    eager = train(tiny(), tmp_path / "eager", progress=False)
    compiled = train(tiny(compile=True), tmp_path / "compiled", progress=False)
    we, wc = final_weights(eager.run_dir), final_weights(compiled.run_dir)
    assert we.keys() == wc.keys()  # saved without torch.compile's "_orig_mod." prefix
    assert all(torch.allclose(we[k], wc[k], atol=1e-4) for k in we)
