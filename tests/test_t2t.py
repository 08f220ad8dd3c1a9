"""T2T-ViT: exact parameter counts, the official quirks, shapes, anatomy, capture, errors, training."""

import math

import pytest
import timm
import torch

import vitlab.models.t2t  # noqa: F401  (registers the T2T-ViT models)
from vitlab import VitlabError, count_parameters, create_model, list_models
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.t2t import T2TViT, TokenPerformer, sinusoid_position_table
from vitlab.train import DataConfig, TrainConfig, train

# ../shared/reference/models.md (official code, frozen parameters included), 224 pixels, 1000 classes.
REFERENCE_COUNTS = {
    "t2t_vit_7": 4_310_222,
    "t2t_vit_14": 21_545_550,
    "t2t_vit_24": 64_105_934,
    "t2t_vit_t_14": 21_541_070,
}
NAMES_224 = ["t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24",
             "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24"]
NAMES_32 = ["t2t_vit_7_32", "t2t_vit_14_32", "t2t_vit_t_14_32"]


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_COUNTS.items()))
def test_reference_parameter_counts(name, expected):
    assert count_parameters(name, num_classes=1000) == expected


def test_t2t_vit_14_trainable_count_and_frozen_parameters():
    with torch.device("meta"):
        model = create_model("t2t_vit_14")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 21_465_806
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # the sinusoid position embedding (197 x 384) and the two Performers' 32 x 64 random features
    assert frozen == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    assert 21_545_550 - 21_465_806 == 197 * 384 + 2 * 32 * 64


def test_every_name_is_registered():
    assert set(NAMES_224 + NAMES_32) <= set(list_models("t2t*"))
    model = timm.create_model("t2t_vit_7_32", num_classes=5)  # timm's registry builds it too
    assert isinstance(model, T2TViT) and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.get_pretrained_cfg("t2t_vit_14").input_size == (3, 224, 224)


def test_soft_splits_and_grids():
    t2t = create_model("t2t_vit_t_14", depth=1).tokens_to_token
    splits = (t2t.soft_split0, t2t.soft_split1, t2t.soft_split2)
    assert [(u.kernel_size, u.stride, u.padding) for u in splits] == [(7, 4, 2), (3, 2, 1), (3, 2, 1)]
    assert t2t.grids == [(56, 56), (28, 28), (14, 14)] and t2t.strides == [4, 8, 16]
    small = create_model("t2t_vit_7_32", depth=1).tokens_to_token
    assert small.grids == [(32, 32), (16, 16), (8, 8)] and small.strides == [1, 2, 4]
    # non-square images keep their aspect ratio (the official code assumed square grids)
    wide = create_model("t2t_vit_7_32", depth=1, img_size=(32, 48))
    assert wide.tokens_to_token.grids[-1] == (8, 12)
    assert wide(torch.randn(1, 3, 32, 48)).shape == (1, 10)


def test_sinusoid_position_embedding_is_the_official_table():
    table = sinusoid_position_table(5, 8)[0]
    assert table.shape == (5, 8)
    for pos in range(5):
        for j in range(8):
            angle = pos / 10000 ** (2 * (j // 2) / 8)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6)
    model = create_model("t2t_vit_7_32", depth=1)
    torch.testing.assert_close(model.pos_embed.data, sinusoid_position_table(65, 256))


def test_performer_details():
    model = create_model("t2t_vit_7", depth=1)
    first, second = model.tokens_to_token.attention1, model.tokens_to_token.attention2
    assert (first.kqv.in_features, second.kqv.in_features) == (3 * 7 * 7, 64 * 3 * 3)
    assert first.kqv.bias is not None and first.kqv.out_features == 3 * 64
    w = first.w
    assert w.shape == (32, 64) and not w.requires_grad  # m = token_dim * kernel ratio 0.5
    # orthogonal rows, each of norm sqrt(m)
    torch.testing.assert_close(w @ w.t(), 32 * torch.eye(32), atol=1e-4, rtol=1e-4)
    assert first.eps == 1e-8 and first.dp.p == 0.1 and first.mlp[-1].p == 0.1


def test_performer_attention_weights_are_normalised():
    # With every value vector equal to c, a normalised attention returns c for every token.
    torch.manual_seed(0)
    layer = TokenPerformer(dim=12, out_dim=8).eval()
    c = torch.randn(8)
    with torch.no_grad():
        layer.kqv.weight[16:] = 0
        layer.kqv.bias[16:] = c
    seen = {}
    layer.proj.register_forward_pre_hook(lambda m, args: seen.setdefault("y", args[0]))
    layer(torch.randn(2, 10, 12))
    torch.testing.assert_close(seen["y"], c.expand(2, 10, 8), atol=1e-5, rtol=1e-5)


def test_token_transformer_quirks():
    model = create_model("t2t_vit_t_14", depth=1)
    attn1, attn2 = model.tokens_to_token.attention1.attn, model.tokens_to_token.attention2.attn
    # attention scaled by the input width, not by the head width (64)
    assert attn1.scale == 147**-0.5 and attn2.scale == 576**-0.5
    assert attn1.qkv.bias is None and attn1.num_heads == 1
    # the residual around attention is v (the input is 147 wide, the output 64)
    layer = model.tokens_to_token.attention1.eval()
    x = torch.randn(2, 16, 147)
    with torch.no_grad():
        q, k, v = layer.attn.qkv(layer.norm1(x)).split(64, dim=-1)
        y = v + layer.attn.proj(((q @ k.transpose(1, 2)) * 147**-0.5).softmax(-1) @ v)
        expected = y + layer.mlp(layer.norm2(y))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_backbone_block_is_the_official_one():
    model = create_model("t2t_vit_14", depth=2)
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None
    assert blk.mlp.fc1.out_features == 3 * 384 and blk.attn.num_heads == 6
    assert blk.norm1.eps == 1e-5  # torch's LayerNorm, as officially


@pytest.mark.parametrize("name", NAMES_32)
def test_32x32_variants_forward_and_backward(name):
    torch.manual_seed(0)
    # the width-384 variants get a 2-block backbone to keep the test fast (their counts are pinned above)
    model = create_model(name, num_classes=7, **({} if name == "t2t_vit_7_32" else {"depth": 2}))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_paper_resolution_forward_and_backward():
    torch.manual_seed(0)
    model = create_model("t2t_vit_7")
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_paper_recipe_at_32x32_leaves_a_2x2_grid():
    # the issue asks every model to run at 32x32: the paper's splits then give 2x2 tokens
    model = create_model("t2t_vit_t_14", img_size=32, depth=1)
    assert model.grid_size == (2, 2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_transformer_t2t_at_paper_resolution():
    # the Transformer T2T layers attend over 56x56 and 28x28 grids; a one-block backbone keeps it cheap
    model = create_model("t2t_vit_t_14", depth=1, num_classes=3)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 3)
    out.sum().backward()


def test_heads_and_shapes():
    model = create_model("t2t_vit_7_32", depth=2, drop_rate=0.1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 256) and model.num_features == 256
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert model.get_classifier().out_features == 10
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1) and model.pos_drop.p == 0.1
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


CASES = {
    # name: (layers, grid, patch size, image size, attention sites, first site grid)
    "t2t_vit_7": (2 + 1 + 7, (14, 14), (16, 16), (224, 224), 7, (14, 14)),
    "t2t_vit_t_14": (2 + 1 + 14, (14, 14), (16, 16), (224, 224), 2 + 14, (56, 56)),
    "t2t_vit_7_32": (2 + 1 + 7, (8, 8), (4, 4), (32, 32), 7, (8, 8)),
    "t2t_vit_t_14_32": (2 + 1 + 14, (8, 8), (4, 4), (32, 32), 2 + 14, (32, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_anatomy(name):
    n_layers, grid, patch, image, n_sites, first_grid = CASES[name]
    with torch.device("meta"):
        model = create_model(name)
    a = anatomy(model)
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size, a.image_size) == (
        "t2t", n_layers, grid, 1, patch, image)
    assert [layer.kind for layer in a.layers[:3]] == ["stem", "stem", "embed"]
    assert len(set(a.layer_labels)) == len(a.layers)
    assert len(a.attention) == n_sites and a.attention[0].grid == first_grid
    for site in a.attention:
        model.get_submodule(site.name)  # every path exists
    if "_t_" in name:  # Transformer T2T layers: square over their own grid, no prefix
        t2t1, t2t2 = a.attention[:2]
        assert (t2t1.num_heads, t2t1.prefix_tokens, t2t2.grid) == (1, 0, (first_grid[0] // 2,) * 2)
        assert t2t2.patch_size == (2 * t2t1.patch_size[0],) * 2


def test_capture_on_transformer_t2t():
    torch.manual_seed(0)
    model = create_model("t2t_vit_t_14_32", depth=2).eval()
    a = anatomy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_logits = model(x)
    layers, attn = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn), torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)  # capture changes nothing
    assert model.blocks[0].attn.fused_attn == model.tokens_to_token.attention1.attn.fused_attn  # restored

    assert layers["tokens_to_token.attention1"].shape == (2, 32 * 32, 64)
    assert layers["tokens_to_token.attention2"].shape == (2, 16 * 16, 64)
    assert layers["pos_drop"].shape == layers["blocks.1"].shape == (2, 65, 384)
    for site in a.attention:
        probs = attn[site.name]
        tokens = site.prefix_tokens + site.grid[0] * site.grid[1]
        assert probs.shape == (2, site.num_heads, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))

    with torch.no_grad():
        # first T2T layer: one head, scaled by its input width (27 = 3 channels x 3x3 split)
        t2t = model.tokens_to_token
        tokens = t2t.soft_split0(x).transpose(1, 2)
        q, k, _ = t2t.attention1.attn.qkv(t2t.attention1.norm1(tokens)).split(64, dim=-1)
        manual = ((q @ k.transpose(1, 2)) * 27**-0.5).softmax(-1)[:, None]
        torch.testing.assert_close(attn["tokens_to_token.attention1.attn"], manual, atol=1e-5, rtol=1e-4)
        # first backbone block, from the embedding rebuilt by hand
        h = torch.cat([model.cls_token.expand(2, -1, -1), t2t(x)], dim=1) + model.pos_embed
        torch.testing.assert_close(layers["pos_drop"], h, atol=1e-5, rtol=1e-5)
        blk = model.blocks[0]
        qkv = blk.attn.qkv(blk.norm1(h)).reshape(2, 65, 3, 6, 64).permute(2, 0, 3, 1, 4)
        manual = (qkv[0] @ qkv[1].transpose(-2, -1) * 64**-0.5).softmax(-1)
        torch.testing.assert_close(attn["blocks.0.attn"], manual, atol=1e-5, rtol=1e-4)


def test_capture_on_performer_model_has_backbone_sites_only():
    model = create_model("t2t_vit_7_32", depth=2).eval()
    a = anatomy(model)
    assert a.attention_names == ["blocks.0.attn", "blocks.1.attn"]
    attn = Store()
    with Capture(model, (), None, a.attention, attn), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert attn["blocks.1.attn"].shape == (2, 4, 65, 65)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("t2t_vit_7_32", depth=1)
    with pytest.raises(VitlabError, match=r"t2t_vit_7_32 takes 32x32 images, got 64x64"):
        model(torch.randn(1, 3, 64, 64))
    model = create_model("t2t_vit_7", depth=1)
    with pytest.raises(VitlabError, match=r"t2t_vit_7 takes 224x224 images, got 32x32.*img_size=32"):
        model(torch.randn(1, 3, 32, 32))


def test_train_smallest_32x32_variant(tmp_path):
    data = DataConfig(num_train=32, num_val=16)
    cfg = TrainConfig(model="t2t_vit_7_32", epochs=1, batch_size=16, data=data)
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and 0 <= result.val_acc <= 1
    assert (tmp_path / "run" / "model.safetensors").exists()
