"""CvT (Wu et al. 2021): exact counts, the official quirks, any input size, anatomy, capture, training."""

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab.models.cvt  # noqa: F401  (registers the models)
from vitlab import count_parameters, create_model
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.cvt import ConvAttention, Cvt, checkpoint_filter_fn
from vitlab.train import DataConfig, TrainConfig, train

# Official configurations (microsoft/CvT, experiments/imagenet/cvt/*.yaml): widths, depths, and
# the first-stage embedding kernel (later stages: 3x3). cvt_13_32 embeds every stage with 3x3.
CONFIGS = {
    "cvt_13": ((64, 192, 384), (1, 2, 10), 7),
    "cvt_21": ((64, 192, 384), (1, 4, 16), 7),
    "cvt_w24": ((192, 768, 1024), (2, 2, 20), 7),
    "cvt_13_32": ((64, 192, 384), (1, 2, 10), 3),
}
# ../shared/reference/models.md (224, 1000 classes). CvT-W24 has no reference count: its number
# is our derivation from the official configuration (derived_count below; the paper says 277M).
COUNTS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392, "cvt_13_32": 19_608_650}


def derived_count(dims, depths, first_kernel, num_classes, in_chans=3):
    """The parameter count of a CvT, written out from the official code's layers."""
    total, chans = 0, in_chans
    for stage, (d, depth) in enumerate(zip(dims, depths)):
        k = first_kernel if stage == 0 else 3
        total += chans * d * k * k + d + 2 * d  # embedding conv (with bias) + LayerNorm
        block = 2 * d  # norm1
        block += 3 * (d * 9 + 2 * d)  # depthwise 3x3 conv (no bias) + BatchNorm for q, k, v
        block += 3 * (d * d + d) + (d * d + d)  # proj_q/k/v (bias) + output projection
        block += 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # norm2 + MLP (ratio 4)
        total += depth * block
        chans = d
    return total + dims[-1] + 2 * dims[-1] + dims[-1] * num_classes + num_classes  # cls token, norm, head


@pytest.fixture(scope="module")
def cvt13_32():
    torch.manual_seed(0)
    return create_model("cvt_13_32")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_exact_parameter_counts(name):
    num_classes = 10 if name.endswith("_32") else 1000
    assert count_parameters(name) == COUNTS[name]
    assert derived_count(*CONFIGS[name], num_classes) == COUNTS[name]


def test_count_follows_class_count_and_pooling():
    assert count_parameters("cvt_13_32", num_classes=100) == COUNTS["cvt_13_32"] + 90 * 385
    # the official no-class-token configuration: average pooling, one token vector fewer
    assert count_parameters("cvt_13", class_token=False, global_pool="avg") == COUNTS["cvt_13"] - 384


def test_official_quirks(cvt13_32):
    model = cvt13_32
    assert not any("pos" in name for name, _ in model.named_parameters())  # no position embedding
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]  # class token: last stage
    for stage, dim, heads in zip(model.stages, (64, 192, 384), (1, 3, 6)):
        attn = stage.blocks[0].attn
        assert attn.num_heads == heads and attn.scale == dim**-0.5  # full stage width, not head width
        assert attn.conv_proj_q.conv.stride == (1, 1)
        assert attn.conv_proj_k.conv.stride == attn.conv_proj_v.conv.stride == (2, 2)
        assert attn.conv_proj_k.conv.groups == dim and attn.conv_proj_k.conv.bias is None  # depthwise
        assert isinstance(stage.blocks[0].mlp.act, timm.layers.QuickGELU)
    assert model.token_grids() == [(16, 16), (8, 8), (4, 4)]
    with torch.device("meta"):
        assert create_model("cvt_13").token_grids() == [(56, 56), (28, 28), (14, 14)]


def test_drop_path_follows_the_official_per_stage_rule():
    with torch.device("meta"):
        model = create_model("cvt_13_32", drop_path_rate=0.1)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for s in model.stages[:2] for b in s.blocks)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in model.stages[2].blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_paper_resolution_forward_backward():
    torch.manual_seed(0)
    model = create_model("cvt_13")
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # no position embedding: the 224 model takes any size (here 32x32 and a non-square image)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
        assert model.forward_features(torch.randn(2, 3, 64, 96)).shape == (2, 1 + 4 * 6, 384)


def test_32_forward_backward_and_shapes(cvt13_32):
    model = cvt13_32.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        assert feats.shape == (2, 1 + 16, 384)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
    assert model.num_features == 384 and model.get_classifier().out_features == 10


def test_any_input_size_is_accepted(cvt13_32):
    assert anatomy(cvt13_32).image_size is None  # no size guard in create_model: no position embedding
    model = cvt13_32.eval()
    with torch.no_grad():
        for size in [(48, 40), (64, 64)]:
            assert model(torch.randn(2, 3, *size)).shape == (2, 10)


def test_reset_classifier(cvt13_32):
    model = cvt13_32.eval()
    try:
        model.reset_classifier(5, global_pool="avg")
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
            model.reset_classifier(0)
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    finally:
        model.reset_classifier(10, global_pool="token")
    with torch.device("meta"), pytest.raises(ValueError, match="cannot pool"):
        create_model("cvt_13_32", class_token=False, global_pool="avg").reset_classifier(5, global_pool="token")


@pytest.mark.parametrize("name,grid,patch,last", [("cvt_13_32", (16, 16), (2, 2), "s3.b10"),
                                                   ("cvt_21", (56, 56), (4, 4), "s3.b16")])
def test_anatomy(name, grid, patch, last):
    with torch.device("meta"):
        a = anatomy(create_model(name))
    n_layers = 1 + sum(CONFIGS[name][1])  # the embedding, then every block
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size) == ("cvt", n_layers, grid, 0, patch)
    assert a.attention == [] and not a.has_attention  # k/v are subsampled: maps are not square
    assert a.layer_labels[:4] == ["embed", "s1.b1", "s2.b1", "s2.b2"] and a.layer_labels[-1] == last
    assert a.layers[0].kind == "embed" and len(set(a.layer_labels)) == len(a.layers)


def _randomise_batchnorm(model):
    # Fresh BatchNorms are near identities in eval mode; random statistics make the check real.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _by_hand_attention(attn, x, size):
    """softmax(q k^T / sqrt(stage width)) and the attention output, from F calls, not the modules."""
    b, n, c = x.shape
    prefix, grid = x[:, : n - size[0] * size[1]], x[:, n - size[0] * size[1]:].transpose(1, 2).reshape(b, c, *size)

    def project(conv_proj, linear, stride):
        bn = conv_proj.bn
        y = F.conv2d(grid, conv_proj.conv.weight, stride=stride, padding=1, groups=c)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        y = linear(torch.cat([prefix, y.flatten(2).transpose(1, 2)], dim=1))
        return y.reshape(b, -1, attn.num_heads, c // attn.num_heads).transpose(1, 2)

    q, k, v = (project(attn.conv_proj_q, attn.proj_q, 1), project(attn.conv_proj_k, attn.proj_k, 2),
               project(attn.conv_proj_v, attn.proj_v, 2))
    probs = (q @ k.transpose(-2, -1) / c**0.5).softmax(-1)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    return probs, out


def test_capture_layers_and_attention_probabilities(cvt13_32):
    model = cvt13_32.eval()
    _randomise_batchnorm(model)
    attns = [m for m in model.modules() if isinstance(m, ConvAttention)]
    assert all(m.fused_attn for m in attns)  # built with fused attention
    a = anatomy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    names = ["stages.0.blocks.0.attn", "stages.2.blocks.0.attn"]
    seen = {}
    hook = model.stages[2].blocks[0].attn.register_forward_hook(lambda m, i, o: seen.update(inp=i, out=o))
    layers, probs = Store(), Store()
    try:
        with Capture(model, a.layer_names, layers, names, probs), torch.no_grad():
            logits = model(x)
            assert not any(m.fused_attn for m in (model.get_submodule(n) for n in names))
    finally:
        hook.remove()
    assert all(m.fused_attn for m in attns)  # restored on exit
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)  # the explicit path is the same model

    # every block output arrives, in depth order: 16x16 tokens, 8x8, then a class token + 4x4
    assert list(layers.keys()) == a.layer_names
    assert layers["stages.0.patch_embed"].shape == (2, 64, 16, 16)
    assert layers["stages.0.blocks.0"].shape == (2, 256, 64)
    assert layers["stages.1.blocks.1"].shape == (2, 64, 192)
    assert layers["stages.2.blocks.9"].shape == (2, 17, 384)

    # probabilities: queries on the stage grid, keys on the 2x-subsampled grid (class token on both)
    p0, p2 = probs["stages.0.blocks.0.attn"], probs["stages.2.blocks.0.attn"]
    assert p0.shape == (2, 1, 256, 64) and p2.shape == (2, 6, 17, 5)
    for p in (p0, p2):
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    attn = model.stages[2].blocks[0].attn
    with torch.no_grad():
        manual, out = _by_hand_attention(attn, seen["inp"][0], seen["inp"][1])
    torch.testing.assert_close(p2, manual, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)


def test_official_checkpoint_names_load(cvt13_32):
    # Official names are ours with stageN. for stages.N.; every key maps, none is left over.
    official = {k.replace("stages.", "stage", 1) if k.startswith("stages.") else k: v.clone()
                for k, v in cvt13_32.state_dict().items()}
    assert "stage2.cls_token" in official and "stage0.blocks.0.attn.conv_proj_q.bn.running_var" in official
    assert isinstance(cvt13_32, Cvt)
    cvt13_32.load_state_dict(checkpoint_filter_fn({"state_dict": official}, cvt13_32), strict=True)


def test_cvt_13_32_trains(tmp_path):
    cfg = TrainConfig(model="cvt_13_32", epochs=1, batch_size=16, data=DataConfig(num_train=32, num_val=16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and (tmp_path / "run" / "model.safetensors").exists()


def test_class_names_follow_the_papers_casing_and_the_old_ones_still_import():
    from vitlab.models.cvt import CvT, CvTBlock, CvtBlock, CvTStage, CvtStage

    assert (Cvt, CvtBlock, CvtStage) == (CvT, CvTBlock, CvTStage)
    assert type(create_model("cvt_13_32")).__name__ == "CvT"
