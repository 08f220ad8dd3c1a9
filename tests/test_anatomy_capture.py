"""Anatomy and capture on vitlab's models and on stock timm models, fused attention included."""

import pytest
import timm
import torch

from vitlab import VitlabError
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store

CASES = {
    # name: (family, number of layers, grid, prefix tokens, patch size, attention modules)
    "vit_nano_patch4_32": ("vit", 7, (8, 8), 1, (4, 4), 6),
    "deit_tiny_distilled_patch16_224": ("vit", 13, (14, 14), 2, (16, 16), 12),
    "vit_tiny_patch16_224": ("vit", 13, (14, 14), 1, (16, 16), 12),
    "mixer_nano_patch4_32": ("mixer", 7, (8, 8), 0, (4, 4), 0),
    "mixer_s16_224": ("mixer", 9, (14, 14), 0, (16, 16), 0),
    "resnet20_cifar": ("resnet", 10, None, 0, None, 0),
    "resnet18": ("resnet", 9, None, 0, None, 0),
    "resnet18_cifar": ("resnet", 9, None, 0, None, 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_anatomy(name):
    family, n_layers, grid, prefix, patch, n_attn = CASES[name]
    a = anatomy(timm.create_model(name))
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size, len(a.attention)) == (
        family, n_layers, grid, prefix, patch, n_attn)
    assert len(set(a.layer_labels)) == len(a.layers)  # labels identify layers


def test_anatomy_refuses_unknown_family():
    with pytest.raises(VitlabError, match="cannot find the layers of Sequential"):
        anatomy(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_tiny_patch16_224"])
def test_capture_materialises_fused_attention(name):
    model = timm.create_model(name).eval()
    assert all(blk.attn.fused_attn for blk in model.blocks)  # built with fused attention
    a = anatomy(model)
    x = torch.randn(2, 3, *a.image_size)
    with torch.no_grad():
        expected_logits = model(x)
    attn, layers = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention_names, attn):
        with torch.no_grad():
            logits = model(x)
        assert not any(blk.attn.fused_attn for blk in model.blocks)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # restored on exit
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)  # capture changes nothing

    tokens = a.prefix_tokens + a.grid[0] * a.grid[1]
    probs = attn["blocks.0.attn"]
    assert probs.shape == (2, model.blocks[0].attn.num_heads, tokens, tokens)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # the captured probabilities are softmax(q k^T / sqrt(d)) of the first block, recomputed by hand
    blk = model.blocks[0]
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    qkv = blk.attn.qkv(blk.norm1(h)).reshape(2, tokens, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    manual = (qkv[0] @ qkv[1].transpose(-2, -1) * blk.attn.scale).softmax(-1)
    torch.testing.assert_close(probs, manual.detach(), atol=1e-5, rtol=1e-4)
    # layer outputs are the block outputs timm itself reports
    inter = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC", norm=False)
    assert layers["blocks.3"].shape == (2, tokens, model.embed_dim)
    if a.prefix_tokens == 1:
        torch.testing.assert_close(layers["blocks.3"][:, 1:], inter[3].detach(), atol=1e-5, rtol=1e-5)


def test_capture_removes_hooks_even_on_error():
    model = timm.create_model("vit_nano_patch4_32").eval()
    a = anatomy(model)

    def count_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    with pytest.raises(RuntimeError, match="boom"):
        with Capture(model, a.layer_names, lambda n, t: None, a.attention, lambda n, t: None):
            assert count_hooks() == len(a.layers) + len(a.attention)
            raise RuntimeError("boom")
    assert count_hooks() == 0
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_capture_unknown_layer_is_clear():
    model = timm.create_model("resnet20_cifar")
    with pytest.raises(VitlabError, match="has no layer 'layer9.0'"):
        with Capture(model, ["layer9.0"], lambda n, t: None):
            pass
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_cnn_layer_outputs_are_feature_maps():
    model = timm.create_model("resnet20_cifar").eval()
    a = anatomy(model)
    store = Store()
    with Capture(model, a.layer_names, store), torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    shapes = [tuple(store[name].shape) for name in a.layer_names]
    assert shapes[0] == (3, 16, 32, 32) and shapes[-1] == (3, 64, 8, 8)
