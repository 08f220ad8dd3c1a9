"""Recipes by name, Mixup/CutMix, weight EMA and SGD: they change what they should and resume exactly."""


import pytest
import torch
from safetensors.torch import load_file

from vitlab import VitlabError, list_models
from vitlab.config.recipes import list_recipes, load_recipe
from vitlab.runs import build_model
from vitlab.train import DataConfig, TrainConfig, read_config, train

FAMILIES = {"cct", "cvt", "dhvt", "levit", "mixer", "qna", "resnet", "t2t", "vit"}


def tiny(**overrides) -> TrainConfig:
    values = dict(model="vit_nano_patch4_32", epochs=2, batch_size=16, warmup_epochs=0.5, checkpoint_every=1,
                  model_args={"depth": 2}, data=DataConfig(num_train=64, num_val=32))
    values.update(overrides)
    return TrainConfig.from_dict(dict(**values))


def weights(run, name="model.safetensors"):
    return load_file(str(run / name))


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_family_has_a_recipe_that_builds():
    assert set(list_recipes()) == FAMILIES
    for name in list_recipes():
        cfg = load_recipe(name)
        assert cfg.recipe == name and cfg.model in list_models(), name
        cfg.validate()


def test_the_cct_recipe_is_the_papers():
    cfg = load_recipe("cct")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.batch_size, cfg.epochs,
            cfg.optim.warmup_epochs) == (5.5e-4, 0.06, 128, 300, 10)
    assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.drop_path) == (0.8, 1.0, 0.1, 0.1)
    assert (cfg.data.randaugment, cfg.data.augment,
            cfg.data.crop_scale) == ("rand-m9-mstd0.5", "resized-crop-flip", 0.8)
    assert cfg.ema_decay > 0


def test_unknown_recipe_is_one_line_naming_the_recipes():
    with pytest.raises(VitlabError, match=r"unknown recipe 'ctt'; did you mean .*cct\? \(recipes: cct, cvt, dhvt"):
        load_recipe("ctt")


def test_cli_recipe_run_records_every_value(tmp_path, cli):
    code, _, err = cli("train", "--recipe", "cct", "--model", "cct_2_3x2_32", "--epochs", "1", "--batch-size", "16",
                       "--num-train", "32", "--num-val", "16", "--precision", "fp32", "--out", tmp_path / "run")
    assert code == 0, err[-2000:]
    cfg = read_config(tmp_path / "run")
    assert cfg.recipe == "cct" and cfg.model == "cct_2_3x2_32" and cfg.epochs == 1  # the command line wins
    assert (cfg.mixup, cfg.cutmix, cfg.optim.lr, cfg.data.randaugment) == (0.8, 1.0, 5.5e-4, "rand-m9-mstd0.5")
    assert (tmp_path / "run" / "model_ema.safetensors").exists()
    code, listing, _ = cli("recipes")
    assert code == 0 and all(name in listing for name in FAMILIES) and "cct_7_3x1_32" in listing


def test_model_arg_adds_a_constructor_keyword_to_the_recipes(tmp_path, cli):
    assert tiny().merged({"model_args": {"mlp_ratio": 2.0}}).model_args == {"depth": 2, "mlp_ratio": 2.0}
    command = ["train", "--model", "cct_2_3x2_32", "--epochs", "1", "--batch-size", "16", "--num-train", "32",
               "--num-val", "16", "--precision", "fp32", "--out", tmp_path / "run"]
    code, _, err = cli(*command, "--model-args", "attn_drop_rate=0")
    assert code == 0, err[-2000:]
    cfg = read_config(tmp_path / "run")
    assert cfg.model_args["attn_drop_rate"] == 0
    assert build_model(cfg).blocks[0].attn.attn_drop.p == 0  # the CCT default is 0.1
    for arg, message in (("attn_drop_rate", "is not KEY=VALUE"), ("colour=red", "does not take the option 'colour'")):
        code, _, err = cli(*command, "--overwrite", "--model-args", arg)
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_mixup_and_cutmix_change_training_and_resume_exactly(tmp_path):
    plain = train(tiny(), tmp_path / "plain", progress=False)
    mixed_cfg = tiny(mixup=0.8, cutmix=1.0, ema_decay=0.99)
    mixed = train(mixed_cfg, tmp_path / "mixed", progress=False)
    assert not equal(weights(plain.run_dir), weights(mixed.run_dir))
    train(mixed_cfg, tmp_path / "cut", progress=False, stop_after_step=5)  # mid-epoch 2
    train(mixed_cfg, tmp_path / "cut", resume=True, progress=False)
    assert equal(weights(mixed.run_dir), weights(tmp_path / "cut"))
    assert equal(weights(mixed.run_dir, "model_ema.safetensors"), weights(tmp_path / "cut", "model_ema.safetensors"))


def test_ema_is_a_moving_average_of_the_weights(tmp_path):
    run = train(tiny(ema_decay=0.9), tmp_path / "run", progress=False)
    model, ema, init = (weights(run.run_dir), weights(run.run_dir, "model_ema.safetensors"),
                        weights(run.run_dir, "init.safetensors"))
    key = "blocks.0.mlp.fc1.weight"
    # an average of the path from init to the final weights: off the final weights, but closer to them than init is
    assert not torch.equal(model[key], ema[key])
    assert (ema[key] - model[key]).norm() < (init[key] - model[key]).norm()
    assert {"val_acc_ema", "val_loss_ema"} <= set(run.metrics[-1])


def test_mixup_needs_an_even_batch():
    with pytest.raises(VitlabError, match="use an even batch size, not 15"):
        tiny(mixup=0.8, batch_size=15).validate()


def test_sgd_with_momentum(tmp_path):
    run = train(tiny(optimizer="sgd", lr=0.05, model="resnet20_cifar", model_args={}), tmp_path / "run", progress=False)
    from vitlab.runs.rundir import load_state

    state = load_state(run.run_dir)
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())
