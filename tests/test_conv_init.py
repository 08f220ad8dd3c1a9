"""Convolutional initialisation of attention: where heads look at init, training, saving, errors."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from vitlab import VitlabError, create_model
from vitlab.analysis.attention import mean_attention_distance
from vitlab.analysis.subjects import subject_from_run
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.cli import main
from vitlab.data import DataConfig, build_dataset
from vitlab.models.conv_init import DEFAULT_STRENGTH, apply_conv_init, kernel_offsets
from vitlab.train import TrainConfig, train
from vitlab.train.spatial_entropy import SpatialEntropyProbe

TABLE = "rel_pos.relative_position_bias_table"


@pytest.fixture(scope="module")
def images():
    val, _ = build_dataset(DataConfig(num_train=32, num_val=16), "val")
    return torch.stack([val[i][0] for i in range(16)])  # real shapes images, normalised as in training


def vit(conv_init=0, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = create_model("vit_nano_patch4_32", depth=2, **kwargs).eval()
    if conv_init:
        apply_conv_init(model, conv_init)
    return model


def attention_of(model, images):
    sites = anatomy(model).attention
    store = Store()
    with Capture(model, attention=sites, on_attention=store), torch.no_grad():
        model(images)
    return sites, store


def test_each_head_attends_to_its_offset_at_init_a_plain_vit_nearly_uniformly(images):
    sites, conv = attention_of(vit(conv_init=3), images)
    _, plain = attention_of(vit(), images)
    offsets, g, p = kernel_offsets(3), 8, 1  # 8x8 patches after one class token
    inner = [(r, c) for r in range(1, g - 1) for c in range(1, g - 1)]
    for site in sites:
        for h in range(site.num_heads):
            dr, dc = offsets[h]
            queries = [p + r * g + c for r, c in inner]
            targets = [p + (r + dr) * g + c + dc for r, c in inner]
            mass = conv[site.name][:, h, queries, targets]  # (images, inner queries)
            assert mass.min() > 0.9, (site.name, h, mass.min().item())
    # Timm's plain initialisation: no key gets much more than its 1/65 share.
    assert max(plain[s.name][:, :, p:, :].max().item() for s in sites) < 0.1


def test_attention_distance_at_init_is_much_smaller_with_conv_init(images):
    distances = {}
    for k in (0, 3):
        sites, store = attention_of(vit(conv_init=k), images)
        distances[k] = np.mean([mean_attention_distance(store[s.name], s.grid, s.patch_size, s.prefix_tokens).numpy()
                                for s in sites])
    # Plain: about uniform over an 8x8 grid of 4-px patches (~14 px); conv init: one patch away or less.
    assert distances[0] > 10 and distances[3] < 0.3 * distances[0], distances


def test_nine_heads_cover_the_3x3_offsets_and_fewer_heads_take_the_nearest(images):
    model = vit(conv_init=3, embed_dim=144, num_heads=9)
    sites, store = attention_of(model, images)
    attn, query = store[sites[0].name][0], 1 + 4 * 8 + 4  # a central patch
    looked_at = {divmod(int(attn[h, query, 1:].argmax()), 8) for h in range(9)}
    assert looked_at == {(4 + dr, 4 + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
    assert kernel_offsets(3)[:5] == [(0, 0), (-1, 0), (0, -1), (0, 1), (1, 0)]  # what 4 heads take (and 5)
    assert len(set(kernel_offsets(5))) == 25 and kernel_offsets(1) == [(0, 0)]
    sites, store = attention_of(vit(conv_init=1), images)  # more heads than offsets: all on their own patch
    attn = store[sites[0].name][0]
    assert all(int(attn[h, query, 1:].argmax()) == query - 1 for h in range(4))


def test_the_content_term_keeps_timms_init_and_the_fused_path_adds_the_bias(images):
    plain, conv = vit(), vit(conv_init=3)
    assert torch.equal(plain.blocks[0].attn.qkv.weight, conv.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        for blk in conv.blocks:
            blk.attn.fused_attn = True
        fused = conv(images)
        for blk in conv.blocks:
            blk.attn.fused_attn = False
        explicit = conv(images)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused, plain(images), atol=1e-3)


def test_bias_tables_learn_without_weight_decay_and_combine_with_spatial_entropy(images):
    model = vit(conv_init=3).train()
    with SpatialEntropyProbe(model) as probe:
        logits = model(images[:4])
        (logits.logsumexp(1).mean() + probe.loss()).backward()
    grads = [blk.attn.rel_pos.relative_position_bias_table.grad for blk in model.blocks]
    assert grads[0] is not None and grads[0].abs().sum() > 0
    # The class token's row has no bias and the head reads only the class token, so the last block's
    # patch-to-patch bias (like the rest of its patch path) gets no gradient in a class-token ViT.
    assert grads[-1].abs().sum() == 0
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.blocks[0].attn.rel_pos.relative_position_bias_table)] == 0
    assert decay[id(model.blocks[0].attn.qkv.weight)] == 0.05


def small_config(**overrides):
    values = dict(model="vit_nano_patch4_32", model_args={"depth": 2}, epochs=1, batch_size=32, warmup_epochs=0.5,
                  conv_init=3, data=DataConfig(num_train=64, num_val=32))
    return TrainConfig.from_dict(dict(**{**values, **overrides}))


def test_a_run_saves_the_trained_tables_and_loads_them_back(tmp_path, images):
    result = train(small_config(), tmp_path / "run", progress=False)
    init, trained = (load_file(str(tmp_path / "run" / "init.safetensors")),
                     load_file(str(tmp_path / "run" / "model.safetensors")))
    key = f"blocks.0.attn.{TABLE}"
    assert key in trained and not torch.equal(init[key], trained[key])  # trained, and saved
    subject = subject_from_run(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(subject.model(images), result.model.eval()(images))
    assert len(subject.anatomy.attention) == 2  # still visible to the attention analyses


def test_resumed_conv_init_run_equals_the_uninterrupted_one(tmp_path):
    cfg = small_config(epochs=2)
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after_epoch=0)
    train(cfg, tmp_path / "cut", progress=False, resume=True)
    full, cut = (load_file(str(tmp_path / "full" / "model.safetensors")),
                 load_file(str(tmp_path / "cut" / "model.safetensors")))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("model, kernel, message", [
    ("resnet20_cifar", "3",
     "conv init needs timm attention over a patch grid, and resnet20_cifar has none; use a vitlab ViT"),
    ("mixer_nano_patch8_32", "3", "and mixer_nano_patch8_32 has none"),
    ("vit_nano_patch4_32", "4", "conv_init is an odd kernel size such as 3"),
    ("vit_nano_patch8_32", "5",
     "a 5x5 conv init does not fit the 4x4 patch grid of vit_nano_patch8_32; use a kernel size of at most 3"),
])
def test_bad_conv_init_is_one_line_before_any_run_is_written(tmp_path, capsys, model, kernel, message):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", model, "--conv-init", kernel, "--batch-size", "32", "--num-train", "32",
                            "--num-val", "32", "--out", str(out)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())  # no half-made run: the same --out works at once


def test_bad_strength_is_refused():
    with pytest.raises(VitlabError, match="conv_init_strength must be a positive number"):
        small_config(conv_init_strength=0.0).validate()
    with pytest.raises(VitlabError, match="conv init takes an odd kernel size"):
        apply_conv_init(create_model("vit_nano_patch4_32", depth=1), 0)
    assert TrainConfig().conv_init_strength == DEFAULT_STRENGTH


def test_cli_trains_with_conv_init_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    out = tmp_path / "run"
    code, text, _ = run_cli(["train", "--model", "vit_nano_patch4_32", "--conv-init", "3", "--conv-init-strength", "4",
                             "--data", f"imagefolder:{folder}", "--image-size", "16", "--epochs", "1",
                             "--batch-size", "8", "--out", str(out)], capsys)
    assert code == 0 and "val acc" in text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["conv_init"] == 3 and saved["conv_init_strength"] == 4.0 and saved["model_args"]["img_size"] == 16
    table = load_file(str(out / "init.safetensors"))[f"blocks.0.attn.{TABLE}"]
    assert table.shape == (7 * 7, 4) and table.max() == 4.0  # a 4x4 grid at 16 px; alpha at each head's offset
