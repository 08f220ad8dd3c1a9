"""QnA-ViT: exact counts, the QnA layer against its definition, anatomy, capture, training."""

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import vitlab.models.qna  # noqa: F401  (registers the models)
from vitlab import VitlabError, count_parameters, create_model
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.qna import LocalSelfAttention, QnALayer, QnAViT
from vitlab.train import DataConfig, TrainConfig, train

# ../shared/reference/models.md (224, 1000 classes); tiny_32 is vitlab's own (32, 10 classes).
COUNTS = {
    "qna_vit_tiny": 15_715_560,
    "qna_vit_small": 24_971_560,
    "qna_vit_base": 55_670_008,
    "qna_vit_tiny_32": 15_178_506,
}


@pytest.mark.parametrize("name,expected", sorted(COUNTS.items()))
def test_parameter_counts(name, expected):
    assert count_parameters(name) == expected


def test_counts_with_other_class_numbers():
    # Only the classifier depends on the classes: 512 * (1000 - 100) weights and 900 biases.
    assert count_parameters("qna_vit_tiny", num_classes=100) == 15_715_560 - 513 * 900


def _layer(stride: int) -> QnALayer:
    torch.manual_seed(0)
    layer = QnALayer(8, 8 * stride, num_heads=2 * stride, stride=stride).double()
    with torch.no_grad():  # both start near zero; make them matter
        layer.rel_pos_bias.normal_()
        layer.query_scale.normal_()
    return layer


def _by_hand(layer: QnALayer, x: torch.Tensor) -> torch.Tensor:
    """The paper's definition, one output position, query and head at a time."""
    b, h, w, _ = x.shape
    s, p, ks, nh, hd = layer.stride, layer.padding, layer.kernel_size, layer.num_heads, layer.head_dim
    q, k, v = layer.queries(), layer.key(x), layer.value(x)
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    out = torch.zeros(b, ho, wo, nh * hd, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            for head in range(nh):
                sl = slice(head * hd, (head + 1) * hd)
                for query in range(layer.num_queries):
                    logits, values = [], []
                    for dy in range(ks):
                        for dx in range(ks):
                            y, xx = i * s - p + dy, j * s - p + dx
                            if 0 <= y < h and 0 <= xx < w:  # outside the image: not attended
                                bias = layer.rel_pos_bias[query, head, dy, dx]
                                logits.append(k[:, y, xx, sl] @ q[query, head] + bias)
                                values.append(v[:, y, xx, sl] * layer.query_scale[query, head, dy, dx])
                    weights = torch.stack(logits, 1).softmax(1)
                    out[:, i, j, sl] += (weights[..., None] * torch.stack(values, 1)).sum(1)
    return layer.proj(out)


@pytest.mark.parametrize("stride", [1, 2])
def test_qna_layer_matches_its_definition(stride):
    layer = _layer(stride)
    x = torch.randn(2, 5, 4, 8, dtype=torch.double)
    out = layer(x)
    assert out.shape == (2, 5 if stride == 1 else 3, 4 if stride == 1 else 2, 8 * stride)
    torch.testing.assert_close(out, _by_hand(layer, x))
    torch.testing.assert_close(layer.forward_unfold(x), out)  # the materialised-window reference


def test_qna_layer_is_shift_invariant_like_a_convolution():
    layer = _layer(1)
    x = torch.randn(1, 8, 8, 8, dtype=torch.double)
    shifted = layer(torch.roll(x, shifts=(2, 1), dims=(1, 2)))
    # away from the borders (where windows are cut), shifting the input shifts the output
    torch.testing.assert_close(shifted[:, 3:7, 2:7], layer(x)[:, 1:5, 1:6])


def test_qna_layer_is_stable_for_large_logits_and_under_autocast():
    layer = _layer(1).float()
    x = torch.randn(2, 6, 6, 8)
    assert layer._convolution_form_is_exact(layer.logits(x))  # ordinary logits: the fast form
    with torch.no_grad():
        layer.key.weight.mul_(1e3)  # logits in the thousands: one shift per image would underflow
    assert not layer._convolution_form_is_exact(layer.logits(x))  # so the exact window form runs
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer.forward_unfold(x), atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert torch.isfinite(low).all()


def test_qna_attention_maps_are_window_softmaxes():
    layer = _layer(1)
    x = torch.randn(2, 5, 4, 8, dtype=torch.double)
    probs = layer.attention_probs(x)
    assert probs.shape == (2, layer.num_queries * layer.num_heads, 20, 20)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 20, dtype=torch.double))
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1)
    outside = (pos[:, None] - pos[None]).abs().amax(-1) > 1  # farther than the 3x3 window
    assert (probs[..., outside] == 0).all() and (probs[..., ~outside] > 0).all()
    assert _layer(2).attention_probs(x).shape == (2, 8, 6, 20)  # stride 2: not square


def test_tiny_32_forward_backward_and_shapes():
    model = create_model("qna_vit_tiny_32", num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 2, 2, 512) and model.num_features == 512
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


def test_tiny_224_forward_backward():
    model = create_model("qna_vit_tiny")
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_structure_follows_the_official_model():
    with torch.device("meta"):
        model = create_model("qna_vit_tiny", drop_path_rate=0.1)
    kinds = [[type(b.attn).__name__[0] + str(b.attn.stride if isinstance(b.attn, QnALayer) else "")
              for b in stage.blocks] for stage in model.stages]
    # Q1: stride-1 QnA, Q2: stride-2 QnA (downsampling), L: global self-attention
    assert kinds == [["Q1", "Q1", "Q2"], ["Q1", "Q1", "Q1", "Q2"], ["L"] * 4 + ["Q1", "Q1", "Q2"], ["L", "L"]]
    assert [s.grid_size for s in model.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    blocks = [b for stage in model.stages for b in stage.blocks]
    rates = [b.drop_path2.drop_prob if hasattr(b.drop_path2, "drop_prob") else 0.0 for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    downsampling = [b for b in blocks if isinstance(b.attn, QnALayer) and b.attn.stride == 2]
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in downsampling)  # none on the QnA branch
    # the official optimiser leaves position biases and query mixing weights undecayed
    with torch.device("meta"):
        model = create_model("qna_vit_tiny_32")
    groups = create_optimizer_v2(model, "adamw", weight_decay=0.05).param_groups
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = ("rel_pos_bias", "query_scale", "relative_position_bias_table")
    assert undecayed == {id(p) for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(names)}


def test_anatomy():
    model = create_model("qna_vit_tiny_32")
    a = anatomy(model)
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size, a.image_size) == (
        "qna", 17, (16, 16), 0, (2, 2), (32, 32))
    assert len(set(a.layer_labels)) == len(a.layers)
    # 7 stride-1 QnA layers (heads: 2 learned queries x heads) and 6 global self-attention blocks
    assert [(s.label, s.num_heads, s.grid, s.recompute is not None) for s in a.attention] == [
        ("1.1", 16, (16, 16), True), ("1.2", 16, (16, 16), True), ("2.1", 32, (8, 8), True),
        ("2.2", 32, (8, 8), True), ("2.3", 32, (8, 8), True)] + [
        (f"3.{i}", 8, (4, 4), False) for i in range(1, 5)] + [("3.5", 64, (4, 4), True), ("3.6", 64, (4, 4), True),
                                                             ("4.1", 16, (2, 2), False), ("4.2", 16, (2, 2), False)]
    with torch.device("meta"):
        big = anatomy(create_model("qna_vit_tiny"))
    # at 224 the 56x56 and 28x28 QnA grids are too large for dense maps: only stage 3 QnA is a site
    assert [(s.label, s.grid, s.patch_size) for s in big.attention] == [
        (f"3.{i}", (14, 14), (16, 16)) for i in range(1, 7)] + [("4.1", (7, 7), (32, 32)), ("4.2", (7, 7), (32, 32))]


def test_capture_layers_and_attention():
    torch.manual_seed(0)
    model = create_model("qna_vit_tiny_32").eval()
    a = anatomy(model)
    lsa_modules = [m for m in model.modules() if isinstance(m, LocalSelfAttention)]
    fused = [m.fused_attn for m in lsa_modules]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    layers, attn = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn), torch.no_grad():
        logits = model(x)
        assert not any(m.fused_attn for m in lsa_modules)
    assert [m.fused_attn for m in lsa_modules] == fused  # restored on exit
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert layers["stages.0.blocks.0"].shape == (2, 16, 16, 64) and layers["stages.3.blocks.1"].shape == (2, 2, 2, 512)
    for site in a.attention:
        tokens = site.grid[0] * site.grid[1]
        probs = attn[site.name]
        assert probs.shape == (2, site.num_heads, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))

    # global self-attention, first block of stage 3, recomputed by hand from the stage input
    blk = model.stages[2].blocks[0]
    h = blk.norm1(layers["stages.1.blocks.3"]).flatten(1, 2)
    q, k, _ = blk.attn.qkv(h).view(2, 16, 3, 8, -1).permute(2, 0, 3, 1, 4)
    manual = (q @ k.transpose(-2, -1) * blk.attn.scale + blk.attn.relative_position_bias()).softmax(-1)
    torch.testing.assert_close(attn["stages.2.blocks.0.attn"], manual.detach(), atol=1e-5, rtol=1e-4)

    # QnA, first block: each query's softmax over the 3x3 neighbourhood of every token
    qna = model.stages[0].blocks[0].attn
    with torch.no_grad():
        keys = qna.key(model.stages[0].blocks[0].norm1(layers["patch_embed"])).view(2, 16, 16, 8, 8)
        logits = torch.einsum("byxhd,qhd->bqhyx", keys, qna.queries())
        logits = F.pad(logits, (1, 1, 1, 1), value=float("-inf"))
        for y, xx in [(0, 0), (0, 7), (5, 15), (9, 9)]:
            window = logits[..., y:y + 3, xx:xx + 3] + qna.rel_pos_bias
            manual = window.flatten(-2).softmax(-1).view(2, 16, 3, 3)
            dense = attn["stages.0.blocks.0.attn"][:, :, y * 16 + xx].view(2, 16, 16, 16)
            dense = F.pad(dense, (1, 1, 1, 1))[..., y:y + 3, xx:xx + 3]
            torch.testing.assert_close(dense, manual, atol=1e-5, rtol=1e-4)


def test_wrong_input_size_is_refused_and_img_size_can_be_overridden():
    with pytest.raises(VitlabError, match=r"qna_vit_tiny_32 takes 32x32 images, got 64x64"):
        create_model("qna_vit_tiny_32")(torch.randn(1, 3, 64, 64))
    with torch.device("meta"):
        model = create_model("qna_vit_tiny", img_size=64)
    assert model.default_cfg["input_size"] == (3, 224, 224)
    assert isinstance(model, QnAViT)
    # self-attention windows larger than their stage grid shrink to it (as in Swin)
    assert [s.lsa_window for s in model.stages][2:] == [4, 2]
    with pytest.raises(VitlabError, match="not divisible by the patch size 4"):
        create_model("qna_vit_tiny", img_size=30)


def test_short_training_run(tmp_path):
    # qna_vit_tiny_32 with one block of each kind per stage, to keep the CPU test short
    cfg = TrainConfig(model="qna_vit_tiny_32", epochs=1, batch_size=16,
                      model_args={"qna_depths": [1, 1, 1, 0], "lsa_depths": [0, 0, 1, 1]},
                      data=DataConfig(num_train=32, num_val=16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and 0 <= result.val_acc <= 1
    assert (tmp_path / "run" / "model.safetensors").exists()
