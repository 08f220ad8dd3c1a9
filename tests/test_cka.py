"""Tests of vitlab.analysis.cka: anchors, HSIC estimators, invariances, the minibatch accumulator,
the float32 large-mean trap, errors and the result object."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vitlab.analysis.cka import (  # noqa: E402
    CKAResult,
    MinibatchCKA,
    center_gram,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    hsic,
    linear_cka,
    rbf_cka,
)
from vitlab.analysis.results import AnalysisResult  # noqa: E402


@pytest.fixture(scope="module")
def anchor_xy() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def hsic1_direct(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """HSIC_1 written exactly as in the reference (Song et al. 2012), float64."""
    n = k.shape[0]
    k = k.double().clone()
    l_ = l_.double().clone()
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    term = (
        torch.trace(k @ l_)
        + (one.T @ k @ one) * (one.T @ l_ @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one.T @ k @ l_ @ one)
    )
    return term.squeeze() / (n * (n - 3))


def unbiased_cka_reference(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Ratio of summed HSIC_1 over batches, from float64 Grams of the flattened features."""
    kk = kl = ll = 0.0
    for x, y in zip(xs, ys):
        k = gram_linear(x.double())
        l_ = gram_linear(y.double())
        kl += float(hsic1_direct(k, l_))
        kk += float(hsic1_direct(k, k))
        ll += float(hsic1_direct(l_, l_))
    return kl / np.sqrt(kk * ll)


def random_features(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- anchors -------------------------------------------------------------------------------------


def test_linear_cka_anchor(anchor_xy):
    x, y = anchor_xy
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=1e-5)


def test_debiased_linear_cka_anchor(anchor_xy):
    x, y = anchor_xy
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=1e-5)


def test_rbf_cka_anchor(anchor_xy):
    x, y = anchor_xy
    assert rbf_cka(x, y, sigma_frac=0.5) == pytest.approx(0.65483, abs=1e-5)


def test_rbf_bandwidth_uses_median_over_full_squared_distance_matrix(anchor_xy):
    x, _ = anchor_xy
    xt = torch.tensor(x)
    sq = torch.cdist(xt, xt) ** 2
    sigma2 = 0.25 * float(np.median(sq.numpy()))  # (0.5 * median distance)^2, diagonal included
    torch.testing.assert_close(gram_rbf(x, 0.5), torch.exp(-sq / (2 * sigma2)), rtol=1e-10, atol=1e-12)


def test_tensor_and_numpy_inputs_agree(anchor_xy):
    x, y = anchor_xy
    as_tensor = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    assert as_tensor == pytest.approx(linear_cka(x, y), abs=1e-6)


# --- HSIC and centring ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 7, 50])
def test_unbiased_hsic_equals_direct_hsic1(n):
    k = gram_linear(random_features(1, n, 13))
    l_ = gram_linear(random_features(2, n, 5) + 2.0)
    # A symmetric, indefinite "Gram" too: the identity is algebraic, not about PSD matrices.
    a = random_features(3, n, n)
    m = a + a.T
    for g1, g2 in [(k, l_), (k, k), (l_, m), (m, m)]:
        expected = hsic1_direct(g1, g2)
        got = hsic(g1, g2, unbiased=True)
        assert got.dtype == torch.float64 and got.ndim == 0
        assert float(got) == pytest.approx(float(expected), rel=1e-10, abs=1e-12)


def test_biased_hsic_matches_trace_formula():
    n = 20
    k = gram_linear(random_features(4, n, 6))
    l_ = gram_linear(random_features(5, n, 9))
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    expected = torch.trace(k @ h @ l_ @ h) / (n - 1) ** 2
    assert float(hsic(k, l_, unbiased=False)) == pytest.approx(float(expected), rel=1e-12)


def test_center_gram_properties():
    n = 9
    k = gram_linear(random_features(6, n, 4).float())  # float32 input: centring still in float64
    biased = center_gram(k)
    assert biased.dtype == torch.float64
    torch.testing.assert_close(biased.sum(0), torch.zeros(n, dtype=torch.float64), atol=1e-10, rtol=0)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    torch.testing.assert_close(biased, h @ k.double() @ h)

    # Zero row sums of U(K) hold for symmetric K; a float32 matmul is symmetric only to ~1e-8.
    k = (k.double() + k.double().T) / 2
    u = center_gram(k, unbiased=True)
    assert u.dtype == torch.float64
    assert torch.all(torch.diagonal(u) == 0)
    # U-centred matrices have zero row and column sums.
    torch.testing.assert_close(u.sum(0), torch.zeros(n, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(u.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-10, rtol=0)
    # The input's diagonal must not matter.
    k2 = k + torch.diag(torch.arange(n, dtype=torch.float64))
    torch.testing.assert_close(center_gram(k2, unbiased=True), u)


def test_gram_linear_flattens_per_example():
    x = random_features(7, 6, 3, 4)
    flat = x.reshape(6, 12)
    torch.testing.assert_close(gram_linear(x), flat @ flat.T)


# --- invariances ---------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_invariances(debiased):
    x = random_features(10, 40, 8)
    y = random_features(11, 40, 6) + x[:, :6]
    base = linear_cka(x, y, debiased=debiased)
    q, _ = torch.linalg.qr(random_features(12, 8, 8))
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    # A non-isotropic invertible map changes CKA.
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y, debiased=debiased) - base) > 1e-2


def test_cka_of_representation_with_itself_is_one():
    x = random_features(13, 30, 4, 5)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    k = gram_linear(x)
    assert cka_from_grams(k, k, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_debiased_cka_equals_ratio_of_unbiased_hsic(anchor_xy):
    x, y = (torch.tensor(a) for a in anchor_xy)
    k, l_ = gram_linear(x), gram_linear(y)
    expected = float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-12)


# --- errors of the functional API ----------------------------------------------------------------


def test_functional_errors():
    x = random_features(14, 10, 3)
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="at least 4 examples"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 4 examples"):
        hsic(gram_linear(x[:3]), gram_linear(x[:3]))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        linear_cka(bad, x)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        rbf_cka(x, bad)
    with pytest.raises(ValueError, match="square"):
        center_gram(x)


# --- MinibatchCKA --------------------------------------------------------------------------------


def test_minibatch_single_batch_equals_unbiased_hsic_ratio():
    n = 16
    a = {"a0": random_features(20, n, 5, 7), "a1": random_features(21, n, 12)}
    mixed = (a["a0"].reshape(n, -1) @ random_features(24, 35, 48)).reshape(n, 3, 4, 4)
    b = {"b0": random_features(22, n, 3, 4, 4) + mixed, "b1": random_features(23, n, 10)}
    acc = MinibatchCKA(["a0", "a1"], ["b0", "b1"])
    acc.update(a, b)
    got = acc.compute()
    assert got.dtype == torch.float64 and got.shape == (2, 2)
    for i, la in enumerate(["a0", "a1"]):
        for j, lb in enumerate(["b0", "b1"]):
            k, l_ = gram_linear(a[la]), gram_linear(b[lb])
            expected = hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))
            assert float(got[i, j]) == pytest.approx(float(expected), rel=1e-10)
    assert acc.num_batches == 1


def test_minibatch_several_batches_equals_summed_hsic_ratio():
    n, batches = 12, 4
    xs = [random_features(30 + i, n, 4, 6) + 2.0 for i in range(batches)]
    ys = [x.reshape(n, -1)[:, :10] * 2 + random_features(40 + i, n, 10) for i, x in enumerate(xs)]
    acc = MinibatchCKA(["x"], ["y"])
    for x, y in zip(xs, ys):
        acc.add(0, "x", x)
        acc.add(1, "y", y)
        acc.end_batch()
    expected = unbiased_cka_reference(xs, ys)
    assert float(acc.compute()[0, 0]) == pytest.approx(expected, rel=1e-10)
    # The summed ratio is not the mean of per-batch CKAs, so this test can tell them apart.
    per_batch = np.mean([unbiased_cka_reference([x], [y]) for x, y in zip(xs, ys)])
    assert abs(per_batch - expected) > 1e-6
    assert acc.num_batches == batches


def test_minibatch_self_comparison_symmetric_with_unit_diagonal():
    n = 10
    acc = MinibatchCKA(["l0", "l1", "l2"])
    for b in range(3):
        base = random_features(50 + b, n, 8)
        feats = {"l0": base, "l1": torch.tanh(base @ random_features(60, 8, 8)), "l2": random_features(70 + b, n, 2, 3)}
        acc.update(feats)
    m = acc.compute()
    assert m.shape == (3, 3)
    assert torch.equal(m, m.T)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(3, dtype=torch.float64), atol=1e-15, rtol=0)
    assert not torch.allclose(m, torch.ones(3, 3, dtype=torch.float64))
    assert acc.layers_b == ["l0", "l1", "l2"]


def test_minibatch_self_comparison_matches_two_model_form():
    n = 8
    batches = [{"p": random_features(80 + b, n, 6), "q": random_features(90 + b, n, 3, 2)} for b in range(2)]
    one = MinibatchCKA(["p", "q"])
    two = MinibatchCKA(["p", "q"], ["p", "q"])
    for feats in batches:
        one.update(feats)
        two.update(feats, feats)
    torch.testing.assert_close(one.compute(), two.compute(), rtol=1e-12, atol=1e-12)


def test_minibatch_different_feature_shapes_two_models():
    n = 9
    g = torch.Generator().manual_seed(5)
    a = {"tok": torch.randn(n, 5, 7, generator=g), "conv": torch.randn(n, 3, 4, 4, generator=g)}
    b = {"vec": torch.randn(n, 10, generator=g), "conv": torch.randn(n, 3, 4, 4, generator=g)}
    acc = MinibatchCKA(["tok", "conv"], ["vec", "conv"])
    acc.update(a, b)
    m = acc.compute()
    assert m.shape == (2, 2) and torch.isfinite(m).all()
    for i, la in enumerate(["tok", "conv"]):
        for j, lb in enumerate(["vec", "conv"]):
            expected = unbiased_cka_reference([a[la]], [b[lb]])
            assert float(m[i, j]) == pytest.approx(expected, rel=1e-5)


def test_minibatch_from_forward_hooks_matches_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    names = ["0", "1", "3"]
    hooked = MinibatchCKA(names)
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            hooked.add(0, name, output)
            captured[name] = output.clone()

        return fn

    for name in names:
        model.get_submodule(name).register_forward_hook(hook(name))
    direct = MinibatchCKA(names)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 6, 6, generator=gen))
            hooked.end_batch()
            direct.update(captured)
    assert hooked.num_batches == 2
    torch.testing.assert_close(hooked.compute(), direct.compute(), rtol=0, atol=0)
    torch.testing.assert_close(torch.diagonal(hooked.compute()), torch.ones(3, dtype=torch.float64))


def test_minibatch_float64_input_stays_float64():
    n = 20
    x = random_features(100, n, 300)
    y = x[:, :100] + random_features(101, n, 100)
    acc = MinibatchCKA(["x"], ["y"])
    acc.update({"x": x}, {"y": y})
    # A float32 Gram would be off at ~1e-7 relative; float64 input must not be downcast.
    assert float(acc.compute()[0, 0]) == pytest.approx(unbiased_cka_reference([x], [y]), rel=1e-12)
    lossy = MinibatchCKA(["x"], ["y"])
    lossy.update({"x": x.float()}, {"y": y.float()})
    assert float(lossy.compute()[0, 0]) != pytest.approx(unbiased_cka_reference([x], [y]), rel=1e-12)


def test_minibatch_bfloat16_input():
    n = 32
    x = random_features(102, n, 64)
    y = x @ random_features(103, 64, 64) + random_features(104, n, 64)
    acc = MinibatchCKA(["x"], ["y"])
    acc.update({"x": x.bfloat16()}, {"y": y.bfloat16()})
    assert float(acc.compute()[0, 0]) == pytest.approx(unbiased_cka_reference([x], [y]), abs=2e-2)


def test_minibatch_sums_can_be_all_reduced():
    """Summing two ranks' HSIC tensors gives the same CKA as one accumulator over all batches."""
    n = 6
    batches = [({"a": random_features(110 + b, n, 4)}, {"b": random_features(120 + b, n, 3)}) for b in range(4)]
    whole, rank0, rank1 = (MinibatchCKA(["a"], ["b"]) for _ in range(3))
    for i, (fa, fb) in enumerate(batches):
        whole.update(fa, fb)
        (rank0 if i % 2 == 0 else rank1).update(fa, fb)
    for attr in ("hsic_ab", "hsic_aa", "hsic_bb"):
        setattr(rank0, attr, getattr(rank0, attr) + getattr(rank1, attr))
    torch.testing.assert_close(rank0.compute(), whole.compute(), rtol=1e-12, atol=0)


def test_float32_large_mean_precision_trap():
    """n=128 examples of 151k float32 features, mean 3, std 0.5: the uncentred Gram cancels badly."""
    n, d = 128, 151_000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.5 + 3.0
    assert x.dtype == torch.float32

    acc = MinibatchCKA(["x"])
    acc.update({"x": x})

    xd = x.double()
    xd -= xd.mean(0)
    k64 = xd @ xd.T
    reference = float(hsic(k64, k64))
    # E[HSIC_1(K, K)] = ||Cov||_F^2 = d * std^4 = 9437.5; the reference doc's draw gave 9367.
    assert 9000 < reference < 9900
    assert float(acc.hsic_aa[0]) == pytest.approx(reference, rel=1e-5)
    assert float(acc.compute()[0, 0]) == pytest.approx(1.0, abs=1e-12)

    # The trap: the direct HSIC_1 formula on the uncentred float32 Gram, all in float32.
    k32 = x @ x.T
    naive = float(hsic1_direct_float32(k32))
    assert not np.isfinite(naive) or abs(naive - reference) > 0.5 * reference


def hsic1_direct_float32(k: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K, K) by the direct formula, kept in float32 throughout (what not to do)."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    term = torch.trace(k @ k) + (one.T @ k @ one) ** 2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one.T @ k @ k @ one)
    return term.squeeze() / (n * (n - 3))


# --- MinibatchCKA errors -------------------------------------------------------------------------


def test_minibatch_unequal_batch_sizes_between_layers():
    acc = MinibatchCKA(["a", "b"])
    acc.add(0, "a", random_features(130, 8, 3))
    acc.add(0, "b", random_features(131, 7, 3))
    with pytest.raises(ValueError, match=r"equal batch sizes; drop the last incomplete batch \(drop_last=True\)"):
        acc.end_batch()


def test_minibatch_unequal_batch_sizes_across_batches():
    acc = MinibatchCKA(["a"], ["b"])
    acc.update({"a": random_features(132, 8, 3)}, {"b": random_features(133, 8, 2)})
    with pytest.raises(ValueError, match=r"drop_last=True"):
        acc.update({"a": random_features(134, 5, 3)}, {"b": random_features(135, 5, 2)})
    assert acc.num_batches == 1


def test_minibatch_missing_layer():
    acc = MinibatchCKA(["a"], ["b", "c"])
    acc.add(0, "a", random_features(136, 8, 3))
    acc.add(1, "b", random_features(137, 8, 3))
    with pytest.raises(ValueError, match=r"'c' of model B was not added"):
        acc.end_batch()
    with pytest.raises(ValueError, match="was not added"):
        MinibatchCKA(["a", "z"]).update({"a": random_features(138, 8, 3)})


def test_minibatch_too_few_examples():
    acc = MinibatchCKA(["a"])
    acc.add(0, "a", random_features(139, 3, 5))
    with pytest.raises(ValueError, match="at least 4 examples, got n=3"):
        acc.end_batch()


def test_minibatch_misuse_errors():
    acc = MinibatchCKA(["blocks.0", "blocks.1"])
    with pytest.raises(ValueError, match="no batches"):
        acc.compute()
    with pytest.raises(ValueError, match="unknown layer 'blocks.2'.*did you mean"):
        acc.add(0, "blocks.2", random_features(140, 8, 3))
    with pytest.raises(ValueError, match="itself"):
        acc.add(1, "blocks.0", random_features(141, 8, 3))
    acc.add(0, "blocks.0", random_features(142, 8, 3))
    with pytest.raises(ValueError, match="already added"):
        acc.add(0, "blocks.0", random_features(143, 8, 3))
    bad = random_features(144, 8, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(0, "blocks.1", bad)
    with pytest.raises(ValueError, match="duplicate"):
        MinibatchCKA(["a", "a"])


# --- CKAResult -----------------------------------------------------------------------------------


def make_result(la: int, lb: int) -> CKAResult:
    matrix = np.linspace(0, 1, la * lb).reshape(la, lb)
    matrix[0, 0] = np.nan
    layers_a = [f"blocks.{i}" for i in range(la)]
    return CKAResult("vit_s16", "resnet50", layers_a, [f"layer{i}" for i in range(lb)], matrix)


def test_result_from_accumulator_and_to_dict_is_json():
    acc = MinibatchCKA(["a", "b"], ["c"])
    acc.update({"a": random_features(150, 6, 3), "b": random_features(151, 6, 4)}, {"c": random_features(152, 6, 2)})
    res = acc.result("model_x", "model_y")
    assert isinstance(res, AnalysisResult) and res.kind == "cka"
    assert res.matrix.dtype == np.float64 and res.matrix.shape == (2, 1)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(d) == {"model_a", "model_b", "layers_a", "layers_b", "matrix"}
    assert d["layers_a"] == ["a", "b"] and d["layers_b"] == ["c"] and d["model_b"] == "model_y"
    assert np.allclose(d["matrix"], acc.compute().numpy())
    # NaN (constant layer) becomes null, so the JSON stays strict.
    assert json.loads(json.dumps(make_result(2, 3).to_dict(), allow_nan=False))["matrix"][0][0] is None


def test_result_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        CKAResult("a", "b", ["x", "y"], ["z"], np.zeros((1, 2)))


def test_plot_sets_layer_tick_labels():
    res = make_result(3, 4)
    fig, ax = plt.subplots()
    try:
        res.plot(ax)
        assert [t.get_text() for t in ax.get_xticklabels()] == res.layers_b
        assert [t.get_text() for t in ax.get_yticklabels()] == res.layers_a
        assert "resnet50" in ax.get_xlabel() and "vit_s16" in ax.get_ylabel()
        im = ax.images[0]
        assert im.get_clim() == (0.0, 1.0) and im.origin == "lower"
        assert len(fig.axes) == 2  # the colorbar
    finally:
        plt.close(fig)


def test_plot_thins_many_tick_labels():
    res = make_result(40, 24)
    fig, ax = plt.subplots()
    try:
        res.plot(ax, colorbar=False)
        ylabels = [t.get_text() for t in ax.get_yticklabels()]
        xlabels = [t.get_text() for t in ax.get_xticklabels()]
        assert 4 <= len(ylabels) <= 12 and 4 <= len(xlabels) <= 12
        assert ylabels[0] == "blocks.0" and ylabels[-1] == "blocks.39" and set(ylabels) <= set(res.layers_a)
        assert xlabels[-1] == "layer23" and set(xlabels) <= set(res.layers_b)
        assert list(ax.get_yticks()) == [res.layers_a.index(name) for name in ylabels]
        assert len(fig.axes) == 1
    finally:
        plt.close(fig)
