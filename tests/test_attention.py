"""Tests for vitlab.analysis.attention (mean attention distance, Raghu et al. 2021)."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from vitlab.analysis.attention import (
    AttentionDistance,
    AttentionDistanceResult,
    mean_attention_distance,
    token_positions,
)
from vitlab.analysis.results import AnalysisResult

G, P = 14, 16  # the reference anchors' 14x14 grid of 16-px patches
N = G * G
UNIFORM_PX = 116.49
CLS30_PX = 81.54


# ---- constructed attention patterns (patch block only; prefix tokens added by _with_prefix) ----


def _uniform(n: int = N) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=torch.float64)


def _self_only(n: int = N) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _left_neighbour(gh: int = G, gw: int = G) -> torch.Tensor:
    """Each query attends to its left neighbour; the first column, having none, to its right one."""
    a = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            a[r * gw + c, r * gw + (c - 1 if c > 0 else c + 1)] = 1.0
    return a


def _with_prefix(patch_block: torch.Tensor, prefix: int, prefix_mass: float = 0.0) -> torch.Tensor:
    """(T, T) attention: patch rows get ``prefix_mass`` spread over the prefix keys and the rest
    as ``patch_block``; prefix rows are arbitrary (uniform) since they must be ignored."""
    n = patch_block.shape[0]
    t = prefix + n
    a = torch.full((t, t), 1.0 / t, dtype=torch.float64)
    a[prefix:, prefix:] = (1.0 - prefix_mass) * patch_block
    if prefix:
        a[prefix:, :prefix] = prefix_mass / prefix
    return a


def _batch(*patterns: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """(batch, heads, T, T) with one head per pattern."""
    return torch.stack(patterns).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


def _random_attention(b: int, h: int, t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, h, t, t, generator=gen, dtype=torch.float64), dim=-1)


def _brute_force(attn, gh, gw, ph, pw, prefix, renormalize):
    """Direct loop over images, heads, queries and keys."""
    b, h = attn.shape[:2]
    out = []
    for head in range(h):
        total = 0.0
        for img in range(b):
            for q in range(gh * gw):
                row = [float(attn[img, head, prefix + q, prefix + k]) for k in range(gh * gw)]
                mass = sum(row)
                if renormalize:
                    row = [v / mass for v in row]
                qy, qx = (q // gw) * ph, (q % gw) * pw
                for k, v in enumerate(row):
                    ky, kx = (k // gw) * ph, (k % gw) * pw
                    total += v * math.hypot(qy - ky, qx - kx)
        out.append(total / (b * gh * gw))
    return torch.tensor(out, dtype=torch.float64)


# ---- token_positions ----


def test_token_positions_row_major_pixels():
    pos = token_positions((2, 3), (8, 10))
    assert pos.shape == (6, 2) and pos.dtype == torch.float64
    # token 4 = row 1, col 1; neighbours differ by one patch size along each axis
    assert torch.equal(pos[1] - pos[0], torch.tensor([0.0, 10.0], dtype=torch.float64))
    assert torch.equal(pos[3] - pos[0], torch.tensor([8.0, 0.0], dtype=torch.float64))
    assert torch.equal(token_positions(14, 16), token_positions((14, 14), (16, 16)))


# ---- the reference anchors ----


def test_anchor_uniform():
    d = mean_attention_distance(_batch(_with_prefix(_uniform(), 1)), G, P)
    assert d.shape == (1,) and d.dtype == torch.float64
    assert d.item() == pytest.approx(UNIFORM_PX, abs=0.01)
    # 7.2808 patch units in the reference
    assert d.item() / P == pytest.approx(7.2808, abs=1e-4)


def test_anchor_self_only_is_zero():
    d = mean_attention_distance(_batch(_with_prefix(_self_only(), 1)), G, P)
    assert d.item() == 0.0


def test_anchor_one_neighbour_is_one_patch():
    d = mean_attention_distance(_batch(_with_prefix(_left_neighbour(), 1)), G, P)
    assert d.item() == pytest.approx(16.0, abs=1e-12)


def test_anchor_class_token_mass_with_and_without_renormalisation():
    attn = _batch(_with_prefix(_uniform(), 1, prefix_mass=0.3))
    raw = mean_attention_distance(attn, G, P, renormalize=False)
    renorm = mean_attention_distance(attn, G, P, renormalize=True)
    assert raw.item() == pytest.approx(CLS30_PX, abs=0.01)
    assert renorm.item() == pytest.approx(UNIFORM_PX, abs=0.01)
    assert raw.item() == pytest.approx(0.7 * renorm.item(), rel=1e-12)


def test_renormalize_irrelevant_when_no_prefix_mass():
    attn = _random_attention(2, 3, N + 1, seed=0)
    attn[..., 0] = 0  # no mass on the class token, then rows sum to 1 over patches again
    attn = attn / attn.sum(-1, keepdim=True)
    a = mean_attention_distance(attn, G, P, renormalize=True)
    b = mean_attention_distance(attn, G, P, renormalize=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_heads_with_different_patterns():
    attn = _batch(
        _with_prefix(_uniform(), 1),
        _with_prefix(_self_only(), 1),
        _with_prefix(_left_neighbour(), 1),
        _with_prefix(_uniform(), 1, prefix_mass=0.3),
        batch=3,
    )
    raw = mean_attention_distance(attn, G, P, renormalize=False)
    assert raw.shape == (4,)
    np.testing.assert_allclose(raw.numpy(), [UNIFORM_PX, 0.0, 16.0, CLS30_PX], atol=0.01)
    renorm = mean_attention_distance(attn, G, P)
    np.testing.assert_allclose(renorm.numpy(), [UNIFORM_PX, 0.0, 16.0, UNIFORM_PX], atol=0.01)


def test_float32_and_bfloat16_inputs_computed_in_float64():
    attn = _batch(_with_prefix(_uniform(), 1)).float()
    d32 = mean_attention_distance(attn, G, P)
    assert d32.dtype == torch.float64
    assert d32.item() == pytest.approx(UNIFORM_PX, abs=0.01)
    dbf = mean_attention_distance(_batch(_with_prefix(_self_only(), 1)).bfloat16(), G, P)
    assert dbf.dtype == torch.float64 and dbf.item() == 0.0


def test_all_zero_row_gives_no_nan():
    attn = _batch(_with_prefix(_uniform(), 1))
    attn[:, :, 1:, :] = 0
    attn[:, :, 1:, 0] = 1.0  # every patch query puts all its mass on the class token
    d = mean_attention_distance(attn, G, P, renormalize=True)
    assert torch.isfinite(d).all() and d.item() == 0.0


def test_gradient_input_is_not_tracked():
    attn = _random_attention(1, 2, N + 1, seed=1).requires_grad_()
    d = mean_attention_distance(attn, G, P)
    assert not d.requires_grad


# ---- prefix tokens and grids ----


def test_no_prefix_tokens():
    attn = _batch(_uniform(), _left_neighbour())
    d = mean_attention_distance(attn, G, P, prefix_tokens=0)
    np.testing.assert_allclose(d.numpy(), [UNIFORM_PX, 16.0], atol=0.01)


def test_two_prefix_tokens_deit():
    attn = _batch(
        _with_prefix(_uniform(), 2, prefix_mass=0.3),
        _with_prefix(_left_neighbour(), 2, prefix_mass=0.5),
    )
    raw = mean_attention_distance(attn, G, P, prefix_tokens=2, renormalize=False)
    np.testing.assert_allclose(raw.numpy(), [CLS30_PX, 8.0], atol=0.01)
    renorm = mean_attention_distance(attn, G, P, prefix_tokens=2)
    np.testing.assert_allclose(renorm.numpy(), [UNIFORM_PX, 16.0], atol=0.01)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_non_square_grid_matches_brute_force(prefix, renormalize):
    gh, gw, ph, pw = 4, 6, 8, 12
    attn = _random_attention(2, 3, prefix + gh * gw, seed=prefix)
    got = mean_attention_distance(attn, (gh, gw), (ph, pw), prefix_tokens=prefix, renormalize=renormalize)
    want = _brute_force(attn, gh, gw, ph, pw, prefix, renormalize)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


# ---- errors ----


@pytest.mark.parametrize(
    "shape, match",
    [
        ((197, 197), r"4-D .*got shape \(197, 197\)"),
        ((2, 3, 197, 196), r"square"),
        ((2, 3, 196, 196), r"196 tokens but expected 197 \(1 prefix \+ 14x14 grid"),
    ],
)
def test_shape_errors(shape, match):
    with pytest.raises(ValueError, match=match) as info:
        mean_attention_distance(torch.zeros(shape), G, P)
    assert "\n" not in str(info.value)


def test_token_count_error_names_prefix():
    with pytest.raises(ValueError, match=r"expected 198 \(2 prefix \+ 14x14 grid = 196 patches\)"):
        mean_attention_distance(torch.zeros(1, 1, 197, 197), G, P, prefix_tokens=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        token_positions(0, 16)
    with pytest.raises(ValueError, match="patch_px"):
        token_positions(14, (16, 16, 16))
    with pytest.raises(ValueError, match="prefix_tokens"):
        AttentionDistance(14, 16, prefix_tokens=-1)


# ---- streaming accumulator ----


def test_accumulator_batch_invariance_and_layer_order():
    batches = [_random_attention(b, 3, N + 1, seed=10 + i) for i, b in enumerate([2, 3, 1])]
    acc = AttentionDistance(G, P)
    for attn in batches:
        acc.add("blocks.1", attn)
        acc.add("blocks.0", attn.flip(-1))  # a different pattern for a second layer
    out = acc.compute()
    assert list(out) == ["blocks.1", "blocks.0"]  # first-seen order
    full = torch.cat(batches)
    torch.testing.assert_close(out["blocks.1"], mean_attention_distance(full, G, P), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out["blocks.0"], mean_attention_distance(full.flip(-1), G, P), rtol=0, atol=1e-12
    )
    # the sums are float64 tensors a distributed caller can all-reduce
    assert acc.distance_sums["blocks.1"].dtype == torch.float64
    assert acc.query_counts["blocks.1"].tolist() == [6 * N] * 3


def test_accumulator_options_and_hook_use():
    acc = AttentionDistance((14, 14), (16, 16), prefix_tokens=2, renormalize=False)
    block = torch.nn.Identity()
    block.register_forward_hook(lambda mod, inp, out: acc.add("blocks.0", out))
    block(_batch(_with_prefix(_uniform(), 2, prefix_mass=0.3)).requires_grad_())
    assert acc.compute()["blocks.0"].item() == pytest.approx(CLS30_PX, abs=0.01)


def test_accumulator_errors_and_reset():
    acc = AttentionDistance(G, P)
    with pytest.raises(ValueError, match="no attention added"):
        acc.result("m")
    with pytest.raises(ValueError, match="197"):
        acc.add("b0", torch.zeros(1, 2, 50, 50))
    acc.add("b0", _random_attention(1, 2, N + 1, seed=0))
    with pytest.raises(ValueError, match="2 heads before, got 3"):
        acc.add("b0", _random_attention(1, 3, N + 1, seed=0))
    acc.add("b1", _random_attention(1, 3, N + 1, seed=0))
    with pytest.raises(ValueError, match="different head counts"):
        acc.result("m")
    acc.reset()
    assert acc.compute() == {}


# ---- result object ----


def _result() -> AttentionDistanceResult:
    acc = AttentionDistance(G, P)
    acc.add("blocks.0", _batch(_with_prefix(_uniform(), 1), _with_prefix(_self_only(), 1),
                               _with_prefix(_left_neighbour(), 1)))
    acc.add("blocks.1", _batch(_with_prefix(_left_neighbour(), 1), _with_prefix(_uniform(), 1),
                               _with_prefix(_self_only(), 1)))
    return acc.result("toy_vit")


def test_result_fields_and_protocol():
    res = _result()
    assert isinstance(res, AnalysisResult) and res.kind == "attention_distance"
    assert res.layers == ["blocks.0", "blocks.1"]
    assert res.distances.shape == (2, 3) and res.distances.dtype == np.float64
    assert res.patch_px == 16 and res.image_px == 224
    np.testing.assert_allclose(res.distances[0], [UNIFORM_PX, 0.0, 16.0], atol=0.01)  # head order kept
    assert res.uniform_distance() == pytest.approx(UNIFORM_PX, abs=0.01)


def test_to_dict_json_and_heads_sorted():
    d = _result().to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["model"] == "toy_vit" and back["layers"] == ["blocks.0", "blocks.1"]
    assert back["patch_px"] == 16 and back["image_px"] == 224
    for row in back["distances"]:
        assert row == sorted(row)
        np.testing.assert_allclose(row, [0.0, 16.0, UNIFORM_PX], atol=0.01)


def test_result_rejects_mismatched_shape():
    with pytest.raises(ValueError, match="layers=2"):
        AttentionDistanceResult("m", ["a", "b"], np.zeros((3, 4)), patch_px=16)


def test_non_square_result_has_no_image_px():
    acc = AttentionDistance((4, 6), 16)
    acc.add("b0", _random_attention(1, 2, 25, seed=0))
    res = acc.result("m")
    assert res.image_px is None and res.uniform_distance() is None
    json.dumps(res.to_dict())


def test_plot_runs_on_agg():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    _result().plot(ax)
    assert ax.get_xlabel() == "layer (depth)"
    assert ax.get_ylabel() == "mean attention distance (px)"
    assert len(ax.collections[0].get_offsets()) == 6  # one dot per head
    uniform = [ln for ln in ax.lines if ln.get_label() == "uniform attention"]
    assert len(uniform) == 1 and uniform[0].get_ydata()[0] == pytest.approx(UNIFORM_PX, abs=0.01)
    fig.canvas.draw()
    plt.close(fig)


def test_plot_many_layers_thins_ticks_and_skips_uniform_line():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    res = AttentionDistanceResult(
        "deep", [f"blocks.{i}" for i in range(32)], rng.uniform(0, 120, (32, 16)), patch_px=16
    )
    fig, ax = plt.subplots()
    res.plot(ax)
    assert len(ax.get_xticks()) <= 12
    assert not [ln for ln in ax.lines if ln.get_label() == "uniform attention"]
    fig.canvas.draw()
    plt.close(fig)
