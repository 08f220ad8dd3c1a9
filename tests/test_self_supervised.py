"""Self-supervised pretraining: MAE (masking, masked-only loss, reconstruction learnt) and DINO
(no gradient to the teacher, EMA and centre updates, exact resume), from the CLI and after it."""

import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vitlab import VitlabError, create_model
from vitlab.cli import main
from vitlab.knn import knn_accuracy
from vitlab.runs.rundir import load_state
from vitlab.train import DataConfig, TrainConfig, read_config, train
from vitlab.train.dino import DINO, augment_views
from vitlab.train.masked_autoencoder import MaskedAutoencoder

TINY = ["--num-train", "64", "--num-val", "32", "--batch-size", "32", "--epochs", "1"]


def nano_vit(**kwargs):
    return create_model("vit_nano_patch4_32", depth=2, **kwargs)  # 8x8 grid of 4-pixel patches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 32x32 PNGs, as an unlabelled user folder would come."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("light", "dark")):
        (root / name).mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (c + 1)).save(root / name / f"{i}.png")
    return root


# --- MAE ----------------------------------------------------------------------------------------

def test_mae_encoder_sees_only_the_kept_patches():
    mae = MaskedAutoencoder(nano_vit()).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    keep, _ = mae.random_masking(3, "cpu")
    assert keep.shape == (3, 16)  # round(0.25 * 64)
    assert len({tuple(sorted(k.tolist())) for k in keep}) == 3  # every image its own subset
    latent = mae.encode(images, keep)
    assert latent.shape == (3, 1 + 16, 128)  # the class token and the kept patches, nothing else
    # Changing a masked patch's pixels leaves the encoding alone; changing a kept one does not.
    masked = next(i for i in range(64) if i not in keep[0].tolist())
    for patch, moves in ((masked, False), (keep[0, 0].item(), True)):
        changed = images.clone()
        r, c = divmod(patch, 8)
        changed[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
        assert (mae.encode(changed, keep) - latent).abs().max().item() > 1e-4 if moves else torch.equal(
            mae.encode(changed, keep), latent)
    torch.manual_seed(0)
    _, _, mask = mae(images)
    assert torch.all(mask.sum(1) == 48) and torch.all(mask.gather(1, keep) == 0)


def test_mae_loss_counts_only_masked_patches_against_normalised_pixels():
    mae = MaskedAutoencoder(nano_vit())
    prediction, target, mask = mae(torch.randn(2, 3, 32, 32))
    loss = mae.loss((prediction, target, mask))[0]
    kept, hidden = (mask[0] == 0).nonzero()[0, 0], (mask[0] == 1).nonzero()[0, 0]
    changed = prediction.detach().clone()
    changed[0, kept] += 10.0
    assert torch.equal(mae.loss((changed, target, mask))[0], loss.detach())
    changed[0, hidden] += 10.0
    assert mae.loss((changed, target, mask))[0] > loss + 1
    assert torch.allclose(target.mean(-1), torch.zeros(2, 64), atol=1e-5)  # per-patch normalised targets
    assert torch.allclose(target.std(-1), torch.ones(2, 64), atol=1e-3)


def test_patchify_follows_the_token_grid():
    mae = MaskedAutoencoder(nano_vit(), norm_pix_loss=False)
    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:12, 20:24] = 1.0  # grid row 2, column 5: token 21
    assert mae.patchify(image)[0].abs().sum(-1).nonzero().flatten().tolist() == [21]


def test_mae_needs_a_vit():
    with pytest.raises(VitlabError, match="MAE needs a ViT") as error:
        MaskedAutoencoder(create_model("resnet20_cifar"))
    assert "\n" not in str(error.value)


def test_mae_lowers_the_reconstruction_loss(tmp_path):
    from vitlab.data import build_dataset
    from vitlab.runs import build_model

    cfg = TrainConfig.from_dict(dict(model="vit_nano_patch8_sincos_32", objective="mae", epochs=2, batch_size=32,
                      lr=2e-3, warmup_epochs=0.2, model_args={"depth": 2}, data=DataConfig(num_train=384, num_val=64)))
    result = train(cfg, tmp_path / "mae", progress=False)
    val, _ = build_dataset(result.config.data, "val", seed=cfg.seed)
    torch.manual_seed(0)
    untrained = MaskedAutoencoder(build_model(result.config))  # the same validation masks (a fixed seed)
    at_init = untrained.validate(torch.utils.data.DataLoader(val, 64))[0]
    assert result.metrics[-1]["val_loss"] < at_init - 0.05, (at_init, result.metrics)
    assert not any(k.startswith("backbone.") for k in load_state(tmp_path / "mae")["task"])  # the decoder only


# --- DINO ---------------------------------------------------------------------------------------

def test_views_differ_per_image_and_replay_from_the_seed():
    images = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    torch.manual_seed(3)
    a = augment_views(images, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(3)
    b = augment_views(images, (0.5,) * 3, (0.5,) * 3)
    assert a.shape == images.shape and torch.equal(a, b)
    assert all((a[0] - a[i]).abs().max() > 1e-3 for i in range(1, 4))  # one image, four different views


@pytest.mark.parametrize("name", ["vit_nano_patch8_sincos_32", "resnet20_cifar", "mixer_nano_patch4_32"])
def test_dino_teacher_follows_the_student_by_ema_and_the_centre_moves(name):
    dino = DINO(create_model(name), total_steps=10, steps_per_epoch=5)
    student = [p for n, p in dino.named_parameters() if p.requires_grad]
    teacher = list(dino.teacher.parameters())
    assert teacher and not any(p.requires_grad for p in teacher)
    assert all(id(p) not in {id(q) for q in teacher} for p in student)
    before = {k: p.detach().clone() for k, p in dino.teacher.module.named_parameters()}
    outputs = dino(torch.randn(4, 3, 32, 32))
    loss, _ = dino.loss(outputs, 0)
    loss.backward()
    assert all(p.grad is None for p in teacher)  # no gradient reaches the teacher
    assert dino.head.prototypes.grad.abs().sum() > 0
    torch.optim.SGD(student, lr=0.5).step()
    dino.after_step(0)
    m = dino.teacher_momentum(0)
    assert m == pytest.approx(0.996) and dino.teacher_momentum(10) == pytest.approx(1.0)
    source = dict(dino.backbone.named_parameters(prefix="backbone")) | dict(dino.head.named_parameters(prefix="head"))
    for key, now in dino.teacher.module.named_parameters():
        assert torch.allclose(now, m * before[key] + (1 - m) * source[key], atol=1e-6), key
    assert (dino.teacher.module.head.prototypes - before["head.prototypes"]).abs().max() > 0  # it moved
    assert torch.allclose(dino.center, 0.1 * outputs[1].float().mean(0, keepdim=True), atol=1e-6)


def test_dino_student_learns_to_match_a_fixed_teacher():
    """With the teacher and the centre frozen (momenta 1), the cross-view loss is a plain target the
    student's gradient steps must lower (a wrong sign, detach or view pairing would not)."""
    torch.manual_seed(0)
    dino = DINO(create_model("vit_nano_patch8_sincos_32", depth=2), total_steps=20, steps_per_epoch=20,
                prototypes=256, momentum=1.0, center_momentum=1.0)
    images = torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        torch.manual_seed(1)  # the same two views every step
        loss, _ = dino.loss(dino(images), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino.after_step(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(dino.center, torch.zeros_like(dino.center))


def test_dino_temperature_warms_up():
    dino = DINO(nano_vit(), total_steps=100, steps_per_epoch=10, teacher_temp=0.07, teacher_temp_warmup=2)
    assert [dino.teacher_temperature(s) for s in (0, 10, 20, 50)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_dino_resumes_exactly(tmp_path):
    cfg = TrainConfig.from_dict(dict(model="vit_nano_patch8_sincos_32", objective="dino", epochs=2, batch_size=16,
                      checkpoint_every=1, drop_path=0.1, model_args={"depth": 2},
                      data=DataConfig(num_train=48, num_val=16)))
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after_step=4)  # mid-epoch 2 (3 steps an epoch)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (load_state(tmp_path / run)["task"] for run in ("full", "cut"))
    assert ta.keys() == tb.keys() and {"center", "teacher.module.head.prototypes"} <= ta.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the teacher and the centre too


def test_knn_accuracy_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    assert knn_accuracy(bank, torch.tensor([0, 0, 1]), queries, torch.tensor([0, 1]), k=2) == 1.0
    assert knn_accuracy(bank, torch.tensor([0, 0, 1]), queries, torch.tensor([1, 0]), k=2) == 0.0


# --- command line and after ---------------------------------------------------------------------

def test_pretrain_mae_on_shapes_then_finetune(tmp_path, capsys):
    run = tmp_path / "mae"
    assert main(["pretrain", "--objective", "mae", "--model", "vit_nano_patch8_sincos_32", "--mae-mask-ratio", "0.5",
                 *TINY, "--out", str(run)]) == 0
    assert "k-NN accuracy" in capsys.readouterr().out
    cfg = read_config(run)
    assert (cfg.objective, cfg.mae.mask_ratio, cfg.mae.decoder_dim) == ("mae", 0.5, 128)
    assert yaml.safe_load((run / "config.yaml").read_text())["mae"]["decoder_depth"] == 2
    assert main(["finetune", str(run), *TINY, "--out", str(tmp_path / "ft")]) == 0
    assert read_config(tmp_path / "ft").objective == "supervised"
    tuned = load_file(str(tmp_path / "ft" / "model.safetensors"))
    pretrained = load_file(str(run / "model.safetensors"))
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])


def test_pretrain_dino_on_an_image_folder(tmp_path, folder):
    run = tmp_path / "dino"
    assert main(["pretrain", "--objective", "dino", "--model", "resnet20_cifar", "--data", f"imagefolder:{folder}",
                 "--dino-prototypes", "256", "--epochs", "1", "--batch-size", "16", "--out", str(run)]) == 0
    cfg = read_config(run)
    assert (cfg.objective, cfg.dino.prototypes, cfg.dino.teacher_temp) == ("dino", 256, 0.04)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[-1]["val_loss"]) > 0 and 0 <= float(rows[-1]["val_acc"]) <= 1


def test_pretrain_mae_on_an_image_folder(tmp_path, folder):
    assert main(["pretrain", "--objective", "mae", "--model", "vit_nano_patch8_sincos_32", "--data",
                 f"imagefolder:{folder}", "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "m")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--objective", "mae", "--model", "resnet20_cifar"], "MAE needs a ViT"),
    (["--objective", "dino", "--mixup", "0.8"], "turn them off for --objective dino"),
    (["--objective", "mae", "--dino-prototypes", "64"], "--dino-prototypes is an option of --objective dino"),
    (["--objective", "mae", "--mae-mask-ratio", "1"], "mae_mask_ratio"),
    (["--objective", "dino", "--dino-teacher-temp", "0"], "dino_teacher_temp must be positive"),
    (["--objective", "mp3", "--eval-flip"], "--eval-flip averages a classifier's logits"),
])
def test_bad_pretraining_options_are_one_line(tmp_path, capsys, argv, message):
    assert main(["pretrain", *argv, *TINY, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_pretrain_help_names_the_methods_and_what_val_acc_is(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{mp3,mae,dino}" in out and "--mae-mask-ratio" in out and "--dino-teacher-temp" in out
    assert "k-NN monitor (cosine, k=20)" in out
