"""Training: the run directory, determinism, exact resume, and clear errors."""

import csv

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab import VitlabError
from vitlab.config import dump_config
from vitlab.runs.rundir import load_weights
from vitlab.train import DataConfig, TrainConfig, load_config, train


def tiny_config(**overrides) -> TrainConfig:
    # Stochastic depth makes the run depend on the RNG, so determinism and resume are really tested.
    values = dict(model="vit_nano_patch4_32", epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5,
                  drop_path=0.1, model_args={"depth": 2},
                  data=DataConfig(num_train=96, num_val=32))
    values.update(overrides)
    return TrainConfig.from_dict(dict(**values))


def newest(run_dir):
    return sorted(run_dir.glob("state-*.pt"))[-1]


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_run_directory_contents(tmp_path):
    result = train(tiny_config(epochs=2), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "model.safetensors", "metrics.csv", "init.safetensors"}
    # 3 steps an epoch, a checkpoint at the end of each (the newest 3 are kept)
    assert sorted(p.name for p in run.glob("state-*.pt")) == ["state-00000003.pt", "state-00000006.pt"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s"} <= set(rows[0])
    saved = load_config(run / "config.yaml")
    # the saved config is resolved: it rebuilds the model without looking at the data
    assert saved.model_args["num_classes"] == 10 and saved.model_args["img_size"] == 32
    assert saved.data.num_train == 96
    assert len(result.metrics) == 2 and 0 <= result.val_acc <= 1


def test_training_is_deterministic(tmp_path):
    train(tiny_config(), tmp_path / "a", progress=False)
    train(tiny_config(), tmp_path / "b", progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(tiny_config(seed=1), tmp_path / "c", progress=False)
    wc = weights(tmp_path / "c")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    train(tiny_config(), tmp_path / "full", progress=False)
    train(tiny_config(), tmp_path / "cut", progress=False, stop_after_epoch=0)  # "killed" after epoch 1
    assert len(list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))) == 1
    resumed = train(tiny_config(), tmp_path / "cut", resume=True, progress=False)
    assert [int(r["epoch"]) for r in resumed.metrics] == [1, 2, 3]
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_resume_after_a_kill_between_file_writes(tmp_path):
    """Weights of an uncommitted epoch on disk (killed before its checkpoint was written) do not leak in."""
    train(tiny_config(), tmp_path / "full", progress=False)
    cut = train(tiny_config(), tmp_path / "cut", progress=False, stop_after_epoch=0)
    # what a kill right after writing the next epoch's weights leaves behind
    from vitlab.runs.rundir import save_weights

    with torch.no_grad():
        for p in cut.model.parameters():
            p.add_(1.0)
    save_weights(tmp_path / "cut", cut.model)
    train(tiny_config(), tmp_path / "cut", resume=True, progress=False)
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_existing_run_directory_is_refused(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(VitlabError, match="already exists; pass --resume .* --overwrite"):
        train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    train(tiny_config(epochs=1), tmp_path / "run", overwrite=True, progress=False)


def test_resume_of_missing_run_is_refused(tmp_path):
    with pytest.raises(VitlabError, match="cannot resume"):
        train(tiny_config(), tmp_path / "nothing", resume=True, progress=False)


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    result = train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(VitlabError, match=r"checkpoint .* is corrupt"):
        load_weights(tmp_path / "run", result.model)
    newest(tmp_path / "run").write_bytes(b"not a zip")
    with pytest.raises(VitlabError, match=r"training state .* is corrupt"):
        train(tiny_config(), tmp_path / "run", resume=True, progress=False)


def test_config_typo_lists_valid_keys(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: resnet20_cifar\nlearning_rate: 0.1\n")
    with pytest.raises(VitlabError, match=r"unknown key 'learning_rate'.*valid keys: model, model_args"):
        load_config(path)
    path.write_text("data:\n  nme: shapes\n")
    with pytest.raises(VitlabError, match=r"unknown key 'nme' in .*data section.*did you mean name"):
        load_config(path)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML follows YAML 1.1, which reads `1e-3` as a string; a recipe author means a number
    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-2\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-2
    path.write_text("lr: inf\n")
    with pytest.raises(VitlabError, match="'lr' in .* must be a number, not 'inf'"):
        load_config(path)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = tiny_config(lr=3e-4)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_batch_larger_than_data_is_refused(tmp_path):
    with pytest.raises(VitlabError, match="fewer than one batch"):
        train(tiny_config(batch_size=512), tmp_path / "run", progress=False)


def test_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    # metrics.csv records the learning rate of each epoch's last step: near the peak after the
    # one-epoch warm-up, at the cosine floor after the last epoch (timm's CosineLRScheduler).
    result = train(tiny_config(epochs=3, warmup_epochs=1.0, lr=1e-3, min_lr=1e-5), tmp_path / "run", progress=False)
    lrs = [row["lr"] for row in result.metrics]
    assert 0.6e-3 <= lrs[0] <= 1e-3  # 3 steps an epoch: the last warm-up step is at 2/3 of the way
    assert lrs[1] < 1e-3 and lrs[1] > lrs[2]
    assert lrs[2] < 0.1e-3  # close to min_lr at the end of the cosine


def test_a_model_that_does_not_build_leaves_no_run_behind(tmp_path):
    bad = tiny_config(model_args={"depth": 2, "no_such_option": 1})
    with pytest.raises(VitlabError, match="does not take the option 'no_such_option'"):
        train(bad, tmp_path / "run", progress=False)
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)  # the same --out works at once


def test_state_of_another_model_is_one_clear_line(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False, stop_after_epoch=0)
    train(tiny_config(epochs=1, model_args={"depth": 3}), tmp_path / "other", progress=False)
    newest(tmp_path / "run").write_bytes(newest(tmp_path / "other").read_bytes())
    with pytest.raises(VitlabError, match=r"training state .* does not fit this run's model"):
        train(tiny_config(), tmp_path / "run", resume=True, progress=False)


def test_damaged_metrics_is_one_clear_line(tmp_path):
    from vitlab.runs.rundir import read_metrics

    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "metrics.csv").write_text("epoch,val_acc\n1,oops\n")
    with pytest.raises(VitlabError, match=r"metrics.csv' is damaged"):
        read_metrics(tmp_path / "run")


@pytest.mark.parametrize("text,message", [
    ("epochs: ten\n", r"'epochs' in .* must be an integer, not 'ten'"),
    ("lr: fast\n", r"'lr' in .* must be a number, not 'fast'"),
    ("data:\n  download: 'yes'\n", r"'download' in .*data section.* must be true or false"),
    ("data: shapes\n", r"'data' in .* must be a mapping"),
])
def test_config_value_of_the_wrong_type_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(VitlabError, match=message):
        load_config(path)


def test_integer_values_pass_as_floats(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1\nwarmup_epochs: 0\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.warmup_epochs == 0.0


def test_flip_evaluation_averages_the_logits_of_each_image_and_its_mirror():
    from torch.utils.data import DataLoader, TensorDataset

    from vitlab.train.trainer import evaluate, evaluate_views

    torch.manual_seed(0)
    # A linear map of the raw pixels: not flip-invariant, so its mirror's logits differ.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images, labels = torch.randn(20, 3, 8, 8), torch.randint(0, 4, (20,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    assert not torch.allclose(plain, mirrored)
    for flip, logits in ((False, plain), (True, (plain + mirrored) / 2)):
        loss, acc = evaluate(model, loader, flip=flip)
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        assert acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    # The trainer's one pass gives both, the same as two separate evaluations.
    assert evaluate_views(model, loader, flip=True) == [evaluate(model, loader), evaluate(model, loader, flip=True)]


def test_eval_flip_logs_its_accuracy_beside_the_plain_one(tmp_path):
    train(tiny_config(epochs=1, eval_flip=True), tmp_path / "run", progress=False)
    row = next(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert {"val_acc", "val_acc_flip", "val_loss_flip"} <= set(row)
    assert float(row["val_loss_flip"]) != float(row["val_loss"])  # a second, different evaluation


def test_config_parses_progressive_resize_stages():
    cfg = tiny_config(epochs=10, progressive_resize="16:2, 24:3")
    assert cfg.resize_stages() == [(16, 2), (24, 3)]
    assert [cfg.train_size_at(e) for e in range(10)] == [16, 16, 24, 24, 24] + [None] * 5
    assert tiny_config().resize_stages() == [] and tiny_config().train_size_at(0) is None


def test_progressive_resize_trains_each_stage_at_its_size(tmp_path, monkeypatch):
    import vitlab.train.trainer as trainer

    seen = []  # the image sizes the model trains on, one per step

    def recording(cfg):
        model = build(cfg)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]) if m.training else None)
        return model

    build = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", recording)
    cfg = tiny_config(model="cct_2_3x2_32", model_args={}, drop_path=0.0, progressive_resize="16:1,24:1")
    result = train(cfg, tmp_path / "run", progress=False)
    assert seen == [16] * 3 + [24] * 3 + [32] * 3  # 3 steps an epoch
    assert [m["train_size"] for m in result.metrics] == [16, 24, 32]
    assert load_config(tmp_path / "run" / "config.yaml").model_args["dynamic_img_size"] is True


def test_progressive_resize_resumes_exactly(tmp_path):
    cfg = tiny_config(progressive_resize="16:1")  # a timm ViT: dynamic_img_size resamples its embedding
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after_epoch=0)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


@pytest.mark.parametrize("overrides,message", [
    (dict(progressive_resize="24"), "SIZE:EPOCHS stages such as 24:16"),
    (dict(progressive_resize="24:0"), "SIZE:EPOCHS stages"),
    (dict(progressive_resize="24:2,16:1"), "leave at least the last epoch at full size"),
    (dict(progressive_resize="32:1"), "stage 32 px is not smaller than the 32 px images"),
    (dict(progressive_resize="18:1"), "not a multiple of vit_nano_patch4_32's patch size 4; use e.g. 16"),
    (dict(progressive_resize="16:1", objective="mp3"), "progressive-resize is for supervised training"),
    (dict(progressive_resize="16:1", model="mixer_nano_patch4_32", model_args={}, drop_path=0.0),
     "mixer_nano_patch4_32 takes only the size it was built for"),
])
def test_bad_progressive_resize_is_one_clear_line(tmp_path, overrides, message):
    with pytest.raises(VitlabError, match=message):
        train(tiny_config(**overrides), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_layer_decay_scales_each_blocks_learning_rate(tmp_path):
    from vitlab.train.tasks import Classification
    from vitlab.train.trainer import build_optimisation

    cfg = tiny_config(layer_decay=0.5)
    model = vitlab.create_model(cfg.model, **cfg.model_args)
    opt = build_optimisation(cfg, Classification(model, cfg, 10), model, steps_per_epoch=2)
    opt.scheduler.step_update(2)  # past the warm-up: every group at lr times its scale
    scales = sorted({g["lr_scale"] for g in opt.optimizer.param_groups})
    depth = len(model.blocks)  # the stem, each block and the head are layers 0 .. depth + 1
    assert scales == pytest.approx([0.5 ** k for k in range(depth + 1, -1, -1)])
    for group in opt.optimizer.param_groups:
        assert group["lr"] == pytest.approx(opt.scheduler._get_lr(2)[0] * group["lr_scale"])
