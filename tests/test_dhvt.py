"""DHVT: exact parameter counts, the official block semantics, anatomy, capture and a training run."""

import pytest
import timm
import torch
import torch.nn as nn

import vitlab.models.dhvt  # noqa: F401  (registers the models)
from vitlab import VitlabError, count_parameters, create_model
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.dhvt import DAFF, DHVT, SOPE, HeadInteractionAttention
from vitlab.train import DataConfig, TrainConfig, train

# ../shared/reference/models.md (counted as sum(p.numel() for p in model.parameters())).
REFERENCE_COUNTS = {
    ("dhvt_tiny_patch4_32", 100): 6_008_650,
    ("dhvt_small_patch2_32", 100): 22_766_698,
    ("dhvt_small_patch16_224", 1000): 24_040_606,
}
# The other variants, pinned so that a change to a shared block cannot go unnoticed.
OTHER_COUNTS = {
    ("dhvt_tiny_patch2_32", 100): 5_845_162,
    ("dhvt_small_patch4_32", 100): 23_425_450,
    ("dhvt_tiny_patch16_224", 1000): 6_267_334,
}


@pytest.mark.parametrize("name,classes,expected", [(*k, v) for k, v in {**REFERENCE_COUNTS, **OTHER_COUNTS}.items()])
def test_parameter_counts(name, classes, expected):
    assert count_parameters(name, num_classes=classes) == expected


def test_default_config_is_the_papers():
    assert timm.get_pretrained_cfg("dhvt_tiny_patch4_32").num_classes == 100
    assert timm.get_pretrained_cfg("dhvt_small_patch16_224").input_size == (3, 224, 224)
    with torch.device("meta"):
        model = create_model("dhvt_small_patch2_32")
    assert model.num_classes == 100 and model.patch_embed.grid_size == (16, 16)
    assert [blk.attn.num_heads for blk in model.blocks] == [8] * 12
    # plain BatchNorm (SyncBatchNorm in the official code), no position embedding
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any("pos_embed" in n for n, _ in model.named_parameters() if not n.startswith("blocks."))


@pytest.mark.parametrize("patch,widths,ends_with_gelu", [(2, [192], True), (4, [96, 192], False),
                                                         (16, [24, 48, 96, 192], False)])
def test_sope_structure(patch, widths, ends_with_gelu):
    embed = SOPE(img_size=32 if patch < 16 else 224, patch_size=patch, embed_dim=192)
    convs = [m for m in embed.proj.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert isinstance(embed.proj[-1], nn.GELU) == ends_with_gelu
    with pytest.raises(ValueError, match="power-of-two"):
        SOPE(patch_size=6)


@pytest.mark.parametrize("name", ["dhvt_tiny_patch4_32", "dhvt_tiny_patch2_32", "dhvt_small_patch4_32",
                                  "dhvt_small_patch2_32"])
def test_forward_backward_32(name):
    # two blocks: the full depth only repeats them (the counts above check the full models)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, depth=2, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_backward_224_and_shapes():
    model = create_model("dhvt_tiny_patch16_224", depth=2)
    x = torch.randn(2, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 14 * 14, 192)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    out = model.forward_head(feats)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reset_classifier():
    model = create_model("dhvt_tiny_patch4_32", depth=1)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("dhvt_tiny_patch16_224", depth=1)
    with pytest.raises(VitlabError, match="takes 224x224 images, got 32x32"):
        model(torch.randn(1, 3, 32, 32))


def _official_hi_mhsa(attn: HeadInteractionAttention, x: torch.Tensor) -> torch.Tensor:
    """HI-MHSA as the official code orders it: head tokens appended after the patches."""
    B, T, C = x.shape
    h = attn.num_heads
    tokens = torch.cat([x, attn.head_tokens(x)], dim=1)
    q, k, v = attn.qkv(tokens).reshape(B, T + h, 3, h, C // h).permute(2, 0, 3, 1, 4)
    out = attn.proj((((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v).transpose(1, 2).reshape(B, T + h, C))
    cls_token, patches, ht = out.split([1, T - 1, h], dim=1)
    return torch.cat([cls_token + ht.mean(1, keepdim=True), patches], dim=1)


@pytest.mark.parametrize("fused", [True, False])
def test_head_tokens_first_equals_official_order(fused):
    torch.manual_seed(0)
    attn = HeadInteractionAttention(dim=48, num_heads=4).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 1 + 16, 48)
    torch.testing.assert_close(attn(x), _official_hi_mhsa(attn, x), atol=1e-5, rtol=1e-5)


def test_head_tokens_average_each_heads_slice():
    torch.manual_seed(0)
    attn = HeadInteractionAttention(dim=12, num_heads=3)
    x = torch.randn(1, 5, 12)
    ht = attn.head_tokens(x)
    assert ht.shape == (1, 3, 12)
    # head token 1 depends only on channels 4..7 (head 1's slice), averaged over all tokens
    y = x.clone()
    y[..., :4] += 1.0
    y[..., 8:] -= 1.0
    torch.testing.assert_close(attn.head_tokens(y)[:, 1], ht[:, 1])


def test_daff_rescales_class_token_without_convolving_it():
    torch.manual_seed(0)
    daff = DAFF(dim=16, hidden_dim=64, grid_size=(4, 4)).eval()
    x = torch.randn(2, 1 + 16, 16)
    out = daff(x)
    assert out.shape == x.shape
    # the class token is scaled channel-wise by a weight computed from the patches alone
    patches_out = out[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
    weight = daff.excitation(daff.act(daff.compress(patches_out.mean(dim=(2, 3)))))
    torch.testing.assert_close(out[:, 0], x[:, 0] * weight)
    x2 = x.clone()
    x2[:, 0] += 5.0  # the patch tokens never see the class token
    torch.testing.assert_close(daff(x2)[:, 1:], out[:, 1:])


def test_anatomy():
    with torch.device("meta"):
        model = create_model("dhvt_tiny_patch4_32")
    a = anatomy(model)
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size, a.image_size) == (
        "dhvt", 13, (8, 8), 1, (4, 4), (32, 32))
    assert len(a.attention) == 12
    assert all(site.prefix_tokens == 1 + 4 and site.grid == (8, 8) for site in a.attention)
    assert len(set(a.layer_labels)) == len(a.layers)


def test_capture_layers_and_attention():
    torch.manual_seed(0)
    model = create_model("dhvt_tiny_patch4_32", depth=2).eval()
    assert all(blk.attn.fused_attn for blk in model.blocks)
    a = anatomy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    layers, attn = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn), torch.no_grad():
        logits = model(x)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # restored on exit
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    assert [tuple(layers[n].shape) for n in a.layer_names] == [(2, 65, 192)] * 3
    site = a.attention[1]
    tokens = site.prefix_tokens + site.grid[0] * site.grid[1]
    probs = attn[site.name]
    assert probs.shape == (2, 4, tokens, tokens) == (2, 4, 69, 69)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # recompute block 2's probabilities by hand from the captured output of block 1
    blk = model.blocks[1]
    with torch.no_grad():
        h = blk.norm1(layers["blocks.0"])
        seq = torch.cat([h[:, :1], blk.attn.head_tokens(h), h[:, 1:]], dim=1)
        q, k, _ = blk.attn.qkv(seq).reshape(2, tokens, 3, 4, 48).permute(2, 0, 3, 1, 4)
        manual = (q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1)
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=1e-4)


def test_drop_path_rates_grow_linearly():
    model = DHVT(depth=3, drop_path_rate=0.2)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert [blk.drop_path.drop_prob for blk in model.blocks[1:]] == pytest.approx([0.1, 0.2])


def test_trains_one_epoch(tmp_path):
    cfg = TrainConfig(model="dhvt_tiny_patch4_32", model_args={"depth": 2}, epochs=1, batch_size=16,
                      data=DataConfig(num_train=32, num_val=16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and 0 <= result.val_acc <= 1
    assert (tmp_path / "run" / "model.safetensors").exists()
