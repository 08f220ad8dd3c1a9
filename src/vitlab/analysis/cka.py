"""Centered kernel alignment (Kornblith et al. 2019) and its minibatch form (Nguyen, Raghu &
Kornblith 2021), as used by Raghu et al. 2021 to compare layers of ViTs and CNNs.

A representation of ``n`` examples is flattened per example to ``X`` of shape ``(n, d)`` (tokens x
dim, or channels x height x width). Its Gram matrix is ``K = X X^T`` (linear kernel) or
``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` (RBF kernel). With ``L`` the Gram of a second
representation of the same examples::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

CKA is invariant to orthogonal transforms and isotropic scaling of either representation, but not to
arbitrary invertible linear maps.

Two estimators of HSIC are provided:

* biased: ``HSIC_0 = <H K H, H L H> / (n-1)^2`` with the centring matrix ``H = I - 11^T / n``.
  This gives the standard CKA of Kornblith et al.
* unbiased (Song et al. 2012): zero the diagonals of ``K`` and ``L`` (``K~``, ``L~``), then
  ``HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``.
  Equivalently ``HSIC_1 = <U(K), U(L)> / (n(n-3))`` with the U-centring of Szekely & Rizzo::

      U(K)_ij = K~_ij - (sum_l K~_il) / (n-2) - (sum_k K~_kj) / (n-2)
                + (sum_kl K~_kl) / ((n-1)(n-2))          for i != j,   U(K)_ii = 0,

  which is a product of two matrices instead of a sum of large terms that cancel, so it is the
  numerically safer form. CKA from U-centred Grams is Kornblith et al.'s "debiased" CKA.

Minibatch CKA (:class:`MinibatchCKA`) sums ``HSIC_1`` over batches of equal size for each of the
three terms and divides only at the end. Because ``HSIC_1`` is unbiased, the sum estimates the
full-data HSIC without ever holding more than one batch's ``n x n`` Grams, so large evaluation sets
and many layers fit in memory.

Precision: with float32 features that have a large mean, the uncentred Gram is dominated by
``||mean||^2`` and the direct ``HSIC_1`` formula cancels to garbage (n=128, 151k features with mean 3
and std 0.5: true ``HSIC(K, K)`` ~ 9367, naive float32 ~ 0). ``HSIC_1`` does not change when the
same vector is subtracted from every example, so the accumulator subtracts the per-batch feature
mean before building the Gram, and does all centring and accumulation in float64.

Test anchors (NumPy ``np.random.seed(1337); X = np.random.randn(100, 10); Y = np.random.randn(100,
10) + X``): linear CKA 0.55761, debiased linear CKA 0.51346, RBF CKA (sigma_frac 0.5) 0.65483.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import VitlabError, closest_names
from .registry import Analysis, Context, Figure, Stream
from .results import to_jsonable

__all__ = [
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "hsic",
    "cka_from_grams",
    "linear_cka",
    "rbf_cka",
    "MinibatchCKA",
    "CKAResult",
]

# HSIC_1 divides by n(n-3) and U-centring by (n-1)(n-2).
_MIN_UNBIASED_N = 4

_BATCH_SIZE_HINT = "minibatch CKA needs equal batch sizes; drop the last incomplete batch (drop_last=True)"


def _f64_device(device: torch.device) -> torch.device:
    """Device on which float64 work for tensors living on ``device`` is done."""
    # MPS has no float64; the n x n Grams are small enough to move to the CPU.
    return torch.device("cpu") if device.type == "mps" else device


def _as_features(x: Any, name: str) -> Tensor:
    """``x`` (tensor or array-like, shape ``(n, ...)``) as a finite float64 ``(n, d)`` tensor."""
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 0:
        raise VitlabError(f"{name} must have a leading example dimension, got a scalar")
    t = t.reshape(t.shape[0], -1).to(device=_f64_device(t.device), dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise VitlabError(f"{name} contains non-finite values (NaN or inf)")
    return t


def _check_pair(x: Tensor, y: Tensor, debiased: bool) -> int:
    """Number of examples shared by ``x`` and ``y``; ValueError if they differ or are too few."""
    if x.shape[0] != y.shape[0]:
        raise VitlabError(f"x and y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if debiased and n < _MIN_UNBIASED_N:
        raise VitlabError(f"debiased CKA needs at least {_MIN_UNBIASED_N} examples, got n={n}")
    if n < 2:
        raise VitlabError(f"CKA needs at least 2 examples, got n={n}")
    return n


def _square(gram: Tensor, name: str) -> Tensor:
    """``gram`` as a float64 tensor, checked to be a square matrix."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise VitlabError(f"{name} must be a square (n, n) matrix, got shape {tuple(gram.shape)}")
    return gram.to(device=_f64_device(gram.device), dtype=torch.float64)


def gram_linear(x: Tensor) -> Tensor:
    """Linear-kernel Gram matrix ``X X^T`` of ``x`` flattened per example.

    Args:
        x: tensor of shape ``(n, ...)``; each example is flattened to a vector of length ``d``.

    Returns:
        ``(n, n)`` tensor in the dtype of ``x`` (float64 for non-floating input).
    """
    if x.ndim == 0:
        raise VitlabError("x must have a leading example dimension, got a scalar")
    flat = x.reshape(x.shape[0], -1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    return flat @ flat.T


def _median(values: Tensor) -> Tensor:
    """Median of all elements, averaging the two middle ones for an even count (as ``np.median``)."""
    flat = values.reshape(-1)
    m = flat.numel()
    # torch.median returns the lower middle value, and torch.quantile refuses > 2^24 elements.
    lower = torch.kthvalue(flat, (m + 1) // 2).values
    if m % 2:
        return lower
    return (lower + torch.kthvalue(flat, m // 2 + 1).values) / 2


def gram_rbf(x: Tensor | np.ndarray, sigma_frac: float = 0.5) -> Tensor:
    """RBF-kernel Gram matrix ``exp(-||x_i - x_j||^2 / (2 sigma^2))`` in float64.

    The bandwidth follows Kornblith et al.: ``sigma = sigma_frac * median distance``, where the
    median is taken over all ``n^2`` entries of the squared-distance matrix, zero diagonal included,
    and ``sigma^2 = sigma_frac^2 * median(squared distances)``. (Taking the median of distances
    instead changes the CKA anchor only at ~1e-9; excluding the diagonal changes it at ~1e-3.)

    Args:
        x: tensor or array of shape ``(n, ...)``, flattened per example.
        sigma_frac: bandwidth as a fraction of the median pairwise distance, > 0.

    Returns:
        float64 ``(n, n)`` Gram matrix.
    """
    if not sigma_frac > 0:
        raise VitlabError(f"sigma_frac must be > 0, got {sigma_frac}")
    feats = _as_features(x, "x")
    # Distances are translation invariant; centring first limits cancellation in |a|^2+|b|^2-2ab.
    feats = feats - feats.mean(0, keepdim=True)
    sq_norms = (feats * feats).sum(1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (feats @ feats.T)).clamp_min(0.0)
    sq_dist.fill_diagonal_(0.0)
    sq_median = _median(sq_dist)
    if not sq_median > 0:
        raise VitlabError("median pairwise distance is zero (too many identical examples); RBF bandwidth undefined")
    return torch.exp(-sq_dist / (2.0 * sigma_frac**2 * sq_median))


def center_gram(gram: Tensor, unbiased: bool = False) -> Tensor:
    """Centre a Gram matrix, in float64.

    Args:
        gram: ``(n, n)`` Gram matrix.
        unbiased: False gives ``H K H`` with ``H = I - 11^T / n``. True gives the U-centring of
            Szekely & Rizzo: the diagonal of ``K`` is zeroed, then row and column sums are removed
            with weight ``1/(n-2)``, the total sum added back with weight ``1/((n-1)(n-2))``, and
            the diagonal set to 0. Needs ``n >= 4`` (only unbiased HSIC uses it, which does).

    Returns:
        float64 ``(n, n)`` centred Gram. Differentiable with respect to ``gram``.
    """
    g = _square(gram, "gram")
    n = g.shape[0]
    if not unbiased:
        return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
    if n < _MIN_UNBIASED_N:
        raise VitlabError(f"unbiased centring needs at least {_MIN_UNBIASED_N} examples, got n={n}")
    # Subtracting the diagonal (instead of fill_diagonal_) keeps the input untouched and autograd happy.
    g = g - torch.diag_embed(torch.diagonal(g))
    u = g - g.sum(1, keepdim=True) / (n - 2) - g.sum(0, keepdim=True) / (n - 2) + g.sum() / ((n - 1) * (n - 2))
    return u - torch.diag_embed(torch.diagonal(u))


def hsic(gram_x: Tensor, gram_y: Tensor, unbiased: bool = True) -> Tensor:
    """Hilbert-Schmidt independence criterion of two Gram matrices over the same ``n`` examples.

    Args:
        gram_x: ``(n, n)`` Gram matrix ``K``.
        gram_y: ``(n, n)`` Gram matrix ``L``.
        unbiased: True (default) gives ``HSIC_1 = <U(K), U(L)> / (n(n-3))`` (needs ``n >= 4``);
            False gives the biased ``HSIC_0 = <HKH, HLH> / (n-1)^2``.

    Returns:
        float64 scalar tensor.
    """
    k = _square(gram_x, "gram_x")
    l_ = _square(gram_y, "gram_y")
    if k.shape != l_.shape:
        raise VitlabError(f"gram_x and gram_y must have the same shape, got {tuple(k.shape)} and {tuple(l_.shape)}")
    n = k.shape[0]
    if unbiased:
        if n < _MIN_UNBIASED_N:
            raise VitlabError(f"unbiased HSIC needs at least {_MIN_UNBIASED_N} examples, got n={n}")
        return (center_gram(k, True) * center_gram(l_, True)).sum() / (n * (n - 3))
    if n < 2:
        raise VitlabError(f"HSIC needs at least 2 examples, got n={n}")
    return (center_gram(k) * center_gram(l_)).sum() / ((n - 1) ** 2)


def cka_from_grams(gram_x: Tensor, gram_y: Tensor, debiased: bool = False) -> float:
    """CKA of two Gram matrices over the same examples.

    Args:
        gram_x: ``(n, n)`` Gram matrix ``K``.
        gram_y: ``(n, n)`` Gram matrix ``L``.
        debiased: False uses biased centring (standard CKA); True uses U-centring (debiased CKA,
            needs ``n >= 4``).

    Returns:
        CKA as a float; NaN if either Gram centres to zero (e.g. a constant representation).
    """
    kc = center_gram(gram_x, unbiased=debiased)
    lc = center_gram(gram_y, unbiased=debiased)
    if kc.shape != lc.shape:
        raise VitlabError(f"gram_x and gram_y must have the same shape, got {tuple(kc.shape)} and {tuple(lc.shape)}")
    # The normalisations of HSIC cancel in the ratio, so plain Frobenius products suffice.
    num = (kc * lc).sum()
    den = torch.sqrt((kc * kc).sum() * (lc * lc).sum())
    return float(num / den) if float(den) > 0 else float("nan")


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same ``n`` examples, in float64.

    Args:
        x: tensor or array of shape ``(n, ...)``, flattened per example.
        y: tensor or array of shape ``(n, ...)``, flattened per example; feature sizes may differ.
        debiased: False gives standard CKA (biased centring); True gives debiased CKA from
            U-centred Grams (Kornblith et al.), which needs ``n >= 4``.

    Returns:
        CKA as a float (1 for identical representations; NaN for a constant one).
    """
    fx, fy = _as_features(x, "x"), _as_features(y, "y")
    _check_pair(fx, fy, debiased)
    # Centring features does not change either estimator and keeps the Gram entries small.
    fx = fx - fx.mean(0, keepdim=True)
    fy = fy - fy.mean(0, keepdim=True)
    return cka_from_grams(fx @ fx.T, fy @ fy.T, debiased=debiased)


def rbf_cka(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, sigma_frac: float = 0.5, debiased: bool = False
) -> float:
    """RBF-kernel CKA between two representations of the same ``n`` examples, in float64.

    Args:
        x: tensor or array of shape ``(n, ...)``, flattened per example.
        y: tensor or array of shape ``(n, ...)``, flattened per example.
        sigma_frac: each kernel's bandwidth is ``sigma_frac`` times the median pairwise distance
            of its own representation (see :func:`gram_rbf` for the exact median convention).
        debiased: use U-centred Grams (needs ``n >= 4``).

    Returns:
        CKA as a float.
    """
    fx, fy = _as_features(x, "x"), _as_features(y, "y")
    _check_pair(fx, fy, debiased)
    return cka_from_grams(gram_rbf(fx, sigma_frac), gram_rbf(fy, sigma_frac), debiased=debiased)


class MinibatchCKA:
    """Streaming linear CKA between the layers of one or two models (Nguyen, Raghu & Kornblith 2021).

    For each batch, every layer's activation is reduced to its U-centred Gram as soon as it arrives
    (:meth:`add`, callable from a forward hook), so memory is bounded by ``n x n`` per layer, not by
    the activations or the data set. :meth:`end_batch` adds the unbiased HSIC of every layer pair to
    float64 running sums; :meth:`compute` divides at the end::

        CKA[i, j] = sum_b HSIC_1(K_i, L_j) / sqrt(sum_b HSIC_1(K_i, K_i) * sum_b HSIC_1(L_j, L_j))

    All batches must have the same size. The running sums are the tensor attributes
    ``hsic_ab`` ``(len(layers_a), len(layers_b))``, ``hsic_aa`` ``(len(layers_a),)`` and ``hsic_bb``
    ``(len(layers_b),)``; a distributed caller all-reduces (sums) each of them before
    :meth:`compute`. They live on the device of the first batch's features.

    Example::

        acc = MinibatchCKA(["blocks.0", "blocks.11"])           # one model against itself
        for images, _ in loader:                               # DataLoader(..., drop_last=True)
            feats = {name: get_activation(name, images) for name in acc.layers_a}
            acc.update(feats)
        result = acc.result("vit_b16", "vit_b16")

    Args:
        layers_a: layer names of model A (side 0).
        layers_b: layer names of model B (side 1), or None to compare model A with itself; then only
            model A's Grams are computed and the matrix is ``len(layers_a) x len(layers_a)``.
    """

    def __init__(self, layers_a: Sequence[str], layers_b: Sequence[str] | None = None) -> None:
        self.layers_a: list[str] = self._check_layers(layers_a, "layers_a")
        self.self_comparison: bool = layers_b is None
        self.layers_b: list[str] = list(self.layers_a) if layers_b is None else self._check_layers(layers_b, "layers_b")
        self._index = (
            {name: i for i, name in enumerate(self.layers_a)},
            {name: i for i, name in enumerate(self.layers_b)},
        )
        self.reset()

    @staticmethod
    def _check_layers(layers: Sequence[str], name: str) -> list[str]:
        if isinstance(layers, str):
            raise VitlabError(f"{name} must be a sequence of layer names, not a single string {layers!r}")
        out = [str(layer) for layer in layers]
        if not out:
            raise VitlabError(f"{name} must name at least one layer")
        dupes = sorted({layer for layer in out if out.count(layer) > 1})
        if dupes:
            raise VitlabError(f"{name} contains duplicate layer names: {', '.join(dupes)}")
        return out

    def reset(self) -> None:
        """Forget all accumulated batches and any partially added batch."""
        self.hsic_ab: Tensor = torch.zeros(len(self.layers_a), len(self.layers_b), dtype=torch.float64)
        self.hsic_aa: Tensor = torch.zeros(len(self.layers_a), dtype=torch.float64)
        self.hsic_bb: Tensor = torch.zeros(len(self.layers_b), dtype=torch.float64)
        self.num_batches: int = 0
        self._batch_size: int | None = None
        # Per side: layer -> (batch size, U-centred float64 Gram, or None when n is too small).
        self._grams: tuple[dict[str, tuple[int, Tensor | None]], dict[str, tuple[int, Tensor | None]]] = ({}, {})

    def _side_name(self, side: int) -> str:
        return "model A" if side == 0 else "model B"

    def add(self, side: int, layer: str, features: Tensor) -> None:
        """Reduce one layer's activation for the current batch to its U-centred Gram and keep that.

        Args:
            side: 0 for model A, 1 for model B (only 0 when comparing a model with itself).
            layer: a name from ``layers_a`` (side 0) or ``layers_b`` (side 1).
            features: activation of shape ``(n, ...)``, e.g. ``(n, tokens, dim)``, ``(n, C, H, W)``
                or ``(n, d)``; flattened per example. float64 input is processed in float64, any
                other dtype builds its Gram in float32.
        """
        if side not in (0, 1):
            raise VitlabError(f"side must be 0 (model A) or 1 (model B), got {side!r}")
        if side == 1 and self.self_comparison:
            raise VitlabError("this accumulator compares model A with itself (layers_b=None); add features with side=0")
        if layer not in self._index[side]:
            close = closest_names(str(layer), self._index[side])
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise VitlabError(f"unknown layer {layer!r} for {self._side_name(side)}{hint}")
        if layer in self._grams[side]:
            raise VitlabError(
                f"layer {layer!r} of {self._side_name(side)} was already added in this batch; "
                "call end_batch() between batches"
            )
        if not isinstance(features, Tensor):
            features = torch.as_tensor(np.asarray(features))
        if features.ndim == 0:
            raise VitlabError(f"features of layer {layer!r} must have a leading batch dimension, got a scalar")
        n = int(features.shape[0])
        if n < _MIN_UNBIASED_N:
            # Reported by end_batch, together with the other batch-size checks.
            self._grams[side][layer] = (n, None)
            return
        with torch.no_grad():
            flat = features.detach().reshape(n, -1)
            # float32 Grams are fast and, once the mean is removed, accurate enough; the
            # cancellation-prone centring below happens in float64.
            work = torch.float64 if flat.dtype == torch.float64 else torch.float32
            flat = flat.to(work)
            flat = flat - flat.mean(0, keepdim=True)
            gram = (flat @ flat.T).to(device=_f64_device(flat.device), dtype=torch.float64)
            if not bool(torch.isfinite(gram).all()):
                raise VitlabError(f"features of layer {layer!r} ({self._side_name(side)}) contain non-finite values")
            self._grams[side][layer] = (n, center_gram(gram, unbiased=True))

    def _stack(self, side: int, layers: list[str]) -> Tensor:
        """U-centred Grams of one side as a ``(layers, n*n)`` matrix."""
        return torch.stack([self._grams[side][layer][1].reshape(-1) for layer in layers])  # type: ignore[union-attr]

    def end_batch(self) -> None:
        """Add this batch's HSIC terms of all layer pairs to the running sums and start a new batch."""
        sides = (0,) if self.self_comparison else (0, 1)
        sizes: dict[str, int] = {}
        for side, layers in zip(sides, (self.layers_a, self.layers_b)):
            for layer in layers:
                if layer not in self._grams[side]:
                    raise VitlabError(f"layer {layer!r} of {self._side_name(side)} was not added in this batch")
                sizes[f"{layer!r} ({self._side_name(side)})"] = self._grams[side][layer][0]
        distinct = set(sizes.values())
        if len(distinct) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
            raise VitlabError(f"{_BATCH_SIZE_HINT}; batch sizes differ between layers ({detail})")
        n = distinct.pop()
        if self._batch_size is not None and n != self._batch_size:
            raise VitlabError(f"{_BATCH_SIZE_HINT}; got n={n} after earlier batches of n={self._batch_size}")
        if n < _MIN_UNBIASED_N:
            raise VitlabError(f"minibatch CKA needs batches of at least {_MIN_UNBIASED_N} examples, got n={n}")

        ua = self._stack(0, self.layers_a)
        ub = ua if self.self_comparison else self._stack(1, self.layers_b)
        scale = 1.0 / (n * (n - 3))
        # One matmul gives every pair's <U(K_i), U(L_j)>; the self terms are squared row norms.
        cross = ua @ ub.T
        self_a = (ua * ua).sum(1)
        self_b = self_a if self.self_comparison else (ub * ub).sum(1)
        if self.self_comparison:
            # Exact symmetry and an exact diagonal, whatever order the matmul summed in.
            cross = (cross + cross.T) / 2
            cross.diagonal().copy_(self_a)
        device = ua.device
        self.hsic_ab = self.hsic_ab.to(device) + cross * scale
        self.hsic_aa = self.hsic_aa.to(device) + self_a * scale
        self.hsic_bb = self.hsic_bb.to(device) + self_b * scale
        self.num_batches += 1
        self._batch_size = n
        self._grams = ({}, {})

    def update(self, feats_a: Mapping[str, Tensor], feats_b: Mapping[str, Tensor] | None = None) -> None:
        """Add one batch: every tracked layer of ``feats_a`` (and ``feats_b``), then :meth:`end_batch`.

        Keys not in ``layers_a`` / ``layers_b`` are ignored; a missing layer raises ValueError.
        """
        if self.self_comparison and feats_b is not None:
            raise VitlabError("this accumulator compares model A with itself (layers_b=None); pass only feats_a")
        if not self.self_comparison and feats_b is None:
            raise VitlabError("this accumulator compares two models; pass feats_b for model B")
        for side, feats, layers in ((0, feats_a, self.layers_a), (1, feats_b, self.layers_b)):
            if feats is None:
                continue
            for layer in layers:
                if layer in feats:
                    self.add(side, layer, feats[layer])
        self.end_batch()

    def all_reduce(self) -> None:
        """Add up the running sums of every process (under torchrun; a no-op otherwise)."""
        from ..distributed import all_reduce_fields

        all_reduce_fields(self, ("hsic_ab", "hsic_aa", "hsic_bb", "num_batches"))

    def compute(self) -> Tensor:
        """CKA matrix from the running sums: float64 CPU tensor ``(len(layers_a), len(layers_b))``.

        Entries are NaN for a layer whose activations were constant in every batch.
        """
        if self.num_batches == 0:
            raise VitlabError("no batches accumulated yet; call update() or add() + end_batch() first")
        den = torch.sqrt(self.hsic_aa[:, None] * self.hsic_bb[None, :])
        return (self.hsic_ab / den).cpu()

    def result(self, name_a: str, name_b: str) -> CKAResult:
        """The CKA matrix as a :class:`CKAResult` with model and layer names."""
        return CKAResult(
            model_a=name_a,
            model_b=name_b,
            layers_a=list(self.layers_a),
            layers_b=list(self.layers_b),
            matrix=self.compute().numpy(),
        )


# At most this many tick labels per axis, so names stay readable on a report-sized heatmap.
_MAX_TICKS = 12


def _tick_indices(count: int) -> list[int]:
    """Evenly thinned layer indices to label, always including the first and the last layer."""
    if count <= _MAX_TICKS:
        return list(range(count))
    step = math.ceil((count - 1) / (_MAX_TICKS - 1))
    idx = list(range(0, count, step))
    if idx[-1] != count - 1:
        # Drop the neighbour that would crowd the last label.
        if count - 1 - idx[-1] <= step / 2:
            idx.pop()
        idx.append(count - 1)
    return idx


@dataclass
class CKAResult:
    """CKA between every layer of model A (rows) and every layer of model B (columns)."""

    model_a: str
    model_b: str
    layers_a: list[str]
    layers_b: list[str]
    matrix: np.ndarray = field(repr=False)

    kind: ClassVar[str] = "cka"

    def __post_init__(self) -> None:
        self.layers_a = [str(layer) for layer in self.layers_a]
        self.layers_b = [str(layer) for layer in self.layers_b]
        if isinstance(self.matrix, Tensor):
            self.matrix = self.matrix.detach().cpu().numpy()
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        expected = (len(self.layers_a), len(self.layers_b))
        if self.matrix.shape != expected:
            raise VitlabError(f"CKA matrix has shape {self.matrix.shape}, expected {expected} (layers_a x layers_b)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with keys model_a, model_b, layers_a, layers_b and matrix (nested lists;
        NaN entries become None)."""
        return to_jsonable(
            {
                "model_a": self.model_a,
                "model_b": self.model_b,
                "layers_a": list(self.layers_a),
                "layers_b": list(self.layers_b),
                "matrix": self.matrix,
            }
        )

    def plot(self, ax: Any, colorbar: bool = True) -> None:
        """Heatmap in the style of Raghu et al.: layer index grows up (model A) and right (model B).

        Args:
            ax: matplotlib ``Axes``.
            colorbar: add a colorbar (range 0..1) next to ``ax``.
        """
        im = ax.imshow(
            self.matrix, origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest"
        )
        many = max(len(self.layers_a), len(self.layers_b)) > _MAX_TICKS
        fontsize = 6 if many else 7
        xs, ys = _tick_indices(len(self.layers_b)), _tick_indices(len(self.layers_a))
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [self.layers_b[i] for i in xs], rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize
        )
        ax.set_yticks(ys)
        ax.set_yticklabels([self.layers_a[i] for i in ys], fontsize=fontsize)
        ax.set_xlabel(f"{self.model_b} layer")
        ax.set_ylabel(f"{self.model_a} layer")
        ax.set_title(self.model_a if self.model_a == self.model_b else f"{self.model_a} vs {self.model_b}")
        if colorbar:
            cbar = ax.figure.colorbar(im, ax=ax)
            cbar.set_label("CKA")


# --- in the suite -------------------------------------------------------------------------------


def cka_key(a: str, b: str) -> str:
    """The results key of the CKA of models ``a`` and ``b``."""
    return f"{a} vs {b}"


class CKAStream(Stream):
    """Minibatch CKA of every layer of every model against every layer of every model.

    One accumulator spans the layers of all models, so each Gram is computed once per batch and
    every pair of models, a model with itself included, is a block of the same matrix.
    """

    def __init__(self, context: Context) -> None:
        self.subjects = context.subjects
        self.index = {s.name: i for i, s in enumerate(self.subjects)}
        self.cka = MinibatchCKA([f"{i}:{layer.name}" for i, s in enumerate(self.subjects)
                                 for layer in s.anatomy.layers])

    def layers(self, subject: str) -> list[str]:
        return list(self.subjects[self.index[subject]].anatomy.layer_names) if subject in self.index else []

    def on_layer(self, subject: str, layer: str, output: Tensor) -> None:
        self.cka.add(0, f"{self.index[subject]}:{layer}", output)

    def end_batch(self) -> None:
        self.cka.end_batch()

    def all_reduce(self) -> None:
        self.cka.all_reduce()

    def results(self) -> dict[str, CKAResult]:
        matrix = self.cka.compute().numpy()
        offsets = [0]
        for s in self.subjects:
            offsets.append(offsets[-1] + len(s.anatomy.layers))
        out = {}
        for i, a in enumerate(self.subjects):
            for j in range(i, len(self.subjects)):
                b = self.subjects[j]
                block = matrix[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
                out[cka_key(a.name, b.name)] = CKAResult(a.name, b.name, a.anatomy.layer_labels,
                                                         b.anatomy.layer_labels, block)
        return out


ANALYSIS = Analysis(
    name="cka",
    title="Representation similarity",
    caption="Linear CKA between the layers of two models.",
    paper="Kornblith et al. 2019; Raghu et al. 2021 (figures 1-2); Nguyen et al. 2021 (minibatch CKA)",
    needs=("layers",),
    stream=CKAStream,
    figures=(
        Figure(select=lambda key, r: r.model_a == r.model_b, width=4.6, height=4.0,
               title="Representation similarity within each model",
               caption="Linear CKA (minibatch, unbiased HSIC over {n} validation images) between every pair of layers "
                       "of one model, where a bright cell means two layers hold similar representations (Raghu et "
                       "al. found ViTs alike across depth and ResNets split into blocks by stage)."),
        Figure(select=lambda key, r: r.model_a != r.model_b, width=4.6, height=4.0,
               title="Representation similarity across models",
               caption="Linear CKA between the layers of two models (rows: first model, columns: second), where a "
                       "bright diagonal band means both compute similar representations in the same order and "
                       "brightness off it shows a layer matching another depth of the other model."),
    ),
)
