"""Linear CKA, debiased CKA, SVCCA/PWCCA against plain numpy reference formulas.

The references are written here independently of :mod:`dynamics` (float64 numpy, explicit
centring and normalisation) so the faster code paths (unscaled products, blocked batches,
shared cross products, singular values only) are checked value by value.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dynamics.similarity as sim
from dynamics.activations import debiased_linear_cka, linear_and_debiased_cka, linear_cka, linear_cka_against
from dynamics.validation import DynamicsError


def _ref_grams(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The n x n Gram matrices of the centred views, each view scaled to unit Frobenius norm (float64, scale safe)."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    xc = xc / np.linalg.norm(xc)
    yc = yc / np.linalg.norm(yc)
    return xc @ xc.T, yc @ yc.T


def _ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA via normalised n x n Gram matrices."""
    k, l_ = _ref_grams(x, y)
    return float(np.sum(k * l_) / (np.linalg.norm(k) * np.linalg.norm(l_)))


def _ref_hsic1(k: np.ndarray, l_: np.ndarray) -> float:
    n = k.shape[0]
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    one = np.ones(n)
    t = (
        np.trace(k @ l_)
        + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ l_ @ one)
    )
    return float(t / (n * (n - 3)))


def _ref_debiased(x: np.ndarray, y: np.ndarray) -> float:
    k, l_ = _ref_grams(x, y)
    return _ref_hsic1(k, l_) / np.sqrt(_ref_hsic1(k, k) * _ref_hsic1(l_, l_))


def _ref_basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis of the centred column space (by SVD) and the singular values kept."""
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    r = int(np.sum(s > s[0] * max(x.shape) * np.finfo(float).eps))
    return u[:, :r], s[:r]


def _ref_svcca(x: np.ndarray, y: np.ndarray, keep: float) -> float:
    ks = []
    bases = []
    for z in (x, y):
        b, s = _ref_basis(z)
        frac = np.cumsum(s**2) / np.sum(s**2)
        ks.append(min(int(np.searchsorted(frac, keep - 1e-12)) + 1, len(s)))
        bases.append(b)
    rho = np.linalg.svd(bases[0][:, : ks[0]].T @ bases[1][:, : ks[1]], compute_uv=False)
    return float(np.clip(rho, 0, 1).mean())


def _ref_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    b1, _ = _ref_basis(x)
    b2, _ = _ref_basis(y)
    u, rho, _ = np.linalg.svd(b1.T @ b2, full_matrices=False)
    h = b1 @ u  # canonical variates of X, (n, c)
    alpha = np.abs(h.T @ (x - x.mean(axis=0))).sum(axis=1)
    return float(np.sum(alpha * np.clip(rho, 0, 1)) / alpha.sum())


def _pair(rng: np.random.Generator, b: int, n: int, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((b, n, p))
    y = (
        x[..., :q] @ rng.standard_normal((q, q)) * 0.5 + rng.standard_normal((b, n, q))
        if q <= p
        else rng.standard_normal((b, n, q))
    )
    return x, y


@pytest.mark.parametrize("shape", [(12, 256, 96), (3, 512, 384), (2, 40, 300)])
@pytest.mark.parametrize("route", ["auto", "features", "tokens"])
def test_linear_cka_matches_reference(shape: tuple[int, int, int], route: str) -> None:
    rng = np.random.default_rng(sum(shape))
    b, n, p = shape
    x, y = _pair(rng, b, n, p, p // 2)
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y), route=route)
    want = np.array([_ref_cka(x[i], y[i]) for i in range(b)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(2, 40, 300), (3, 200, 30)])
@pytest.mark.parametrize("route", ["auto", "features", "tokens"])
def test_debiased_cka_matches_reference_on_either_route(shape: tuple[int, int, int], route: str) -> None:
    """Both routes (feature-space products, n x n kernels) give the reference value; 'auto' takes the kernels when
    there are fewer tokens than features, the products otherwise."""
    rng = np.random.default_rng(sum(shape))
    b, n, p = shape
    x, y = _pair(rng, b, n, p, p // 2)
    got = debiased_linear_cka(torch.from_numpy(x), torch.from_numpy(y), route=route)
    np.testing.assert_allclose(got, [_ref_debiased(x[i], y[i]) for i in range(b)], rtol=1e-10, atol=0)
    cheaper = "tokens" if n < p else "features"
    assert np.array_equal(debiased_linear_cka(x, y), debiased_linear_cka(x, y, route=cheaper))
    with pytest.raises(DynamicsError, match="route"):
        debiased_linear_cka(x, y, route="kernel")


@pytest.mark.parametrize("scale", [1e150, 1e-150, 1e100, 1.0])
def test_cka_extreme_magnitudes(scale: float) -> None:
    rng = np.random.default_rng(1)
    x, y = _pair(rng, 3, 200, 30, 20)
    x, y = x * scale, y * scale
    want = np.array([_ref_cka(x[i] / scale, y[i] / scale) for i in range(3)])
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    want_d = np.array([_ref_debiased(x[i] / scale, y[i] / scale) for i in range(3)])
    for route in ("features", "tokens"):
        got_d = debiased_linear_cka(torch.from_numpy(x), torch.from_numpy(y), route=route)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-10)


def test_cka_mixed_magnitudes_in_one_batch() -> None:
    rng = np.random.default_rng(2)
    x, y = _pair(rng, 4, 100, 16, 16)
    x[0] *= 1e140
    y[1] *= 1e-140
    got = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    want = [_ref_cka(x[0] / 1e140, y[0]), _ref_cka(x[1], y[1] * 1e140), _ref_cka(x[2], y[2]), _ref_cka(x[3], y[3])]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cka_rank_deficient_constant_columns_and_offset() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 64)) + 1e5  # rank 4, large offset
    x[:, 7] = 3.0  # constant column
    y = np.tanh(x[:, :40] * 1e-5) + 0.1 * rng.standard_normal((500, 40))
    got = linear_cka(x, y)
    assert got == pytest.approx(_ref_cka(x, y), rel=1e-12)
    assert debiased_linear_cka(x, y) == pytest.approx(_ref_debiased(x, y), rel=1e-9)


def test_cka_blocked_batch_matches_per_matrix() -> None:
    rng = np.random.default_rng(4)
    x, y = _pair(rng, 12, 2048, 96, 96)  # more than one block
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    got = linear_cka(tx, ty)
    each = np.array([linear_cka(tx[i], ty[i]) for i in range(12)])
    np.testing.assert_allclose(got, each, rtol=1e-13)
    np.testing.assert_allclose(got, [_ref_cka(x[i], y[i]) for i in range(12)], rtol=1e-12)
    got_d = debiased_linear_cka(tx[:3], ty[:3])
    np.testing.assert_allclose(got_d, [_ref_debiased(x[i], y[i]) for i in range(3)], rtol=1e-10)


@pytest.mark.parametrize("shape", [(12, 2048, 96), (3, 64, 200), (2, 40, 40), (30, 7)])
def test_linear_and_debiased_cka_together_are_the_two_functions_bit_for_bit(shape: tuple[int, ...]) -> None:
    """One centring and one set of products for both: the same numbers as the two public functions, on either
    route ('auto' picks features for many tokens, tokens for many features), over several blocks, unbatched."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape)
    y = 0.5 * x + rng.standard_normal(shape)
    biased, debiased = linear_and_debiased_cka(x, y)
    assert np.array_equal(biased, np.asarray(linear_cka(x, y)))
    assert np.array_equal(debiased, np.asarray(debiased_linear_cka(x, y)))
    assert biased.shape == debiased.shape == shape[:-2]


def test_linear_and_debiased_cka_together_raise_as_either_would() -> None:
    rng = np.random.default_rng(12)
    x, y = _pair(rng, 4, 64, 8, 8)
    x[2] = 1.5  # constant view
    with pytest.raises(DynamicsError, match="constant"):
        linear_and_debiased_cka(x, y)
    with pytest.raises(DynamicsError, match="at least 4 rows"):
        linear_and_debiased_cka(rng.standard_normal((3, 5)), rng.standard_normal((3, 5)))


@pytest.mark.parametrize("shape", [(12, 2048, 96), (3, 64, 200), (30, 7)])
def test_linear_cka_against_several_views_is_each_call_bit_for_bit(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape)
    ys = [0.5 * x + rng.standard_normal(shape), rng.standard_normal(shape)]
    got = linear_cka_against(x, ys)
    assert len(got) == 2
    for g, y in zip(got, ys):
        assert np.array_equal(g, np.asarray(linear_cka(x, y)))
    other = rng.standard_normal((*shape[:-1], 5))  # another feature count: one call each, the same numbers
    mixed = linear_cka_against(x, [ys[0], other])
    assert np.array_equal(mixed[1], np.asarray(linear_cka(x, other)))
    assert linear_cka_against(x, []) == []
    ys[1][...] = 3.0  # a constant view raises as linear_cka does
    with pytest.raises(DynamicsError, match="`Y` is constant"):
        linear_cka_against(x, ys)


def test_cka_broadcast_batch() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 64, 8))
    y = rng.standard_normal((64, 5))
    got = linear_cka(x, y)
    np.testing.assert_allclose(got, [_ref_cka(x[i], y) for i in range(3)], rtol=1e-12)


@pytest.mark.parametrize("which", ["X", "Y"])
def test_cka_constant_view_raises(which: str) -> None:
    rng = np.random.default_rng(6)
    x, y = _pair(rng, 12, 2048, 96, 96)
    target = x if which == "X" else y
    target[7] = 2.5  # one constant layer in a later block
    with pytest.raises(DynamicsError, match=f"`{which}` is constant"):
        linear_cka(x, y)
    for route in ("features", "tokens"):
        with pytest.raises(DynamicsError, match=f"`{which}` with itself"):
            debiased_linear_cka(x, y, route=route)


def test_cka_constant_in_both_reports_x_first() -> None:
    rng = np.random.default_rng(7)
    x, y = _pair(rng, 12, 2048, 96, 96)
    x[10] = 1.0
    y[0] = 1.0
    with pytest.raises(DynamicsError, match="`X` is constant"):
        linear_cka(x, y)


@pytest.mark.parametrize("keep", [0.5, 0.99, 1.0])
def test_cca_matches_reference(keep: float) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2048, 96))
    y = x @ rng.standard_normal((96, 96)) * 0.3 + rng.standard_normal((2048, 96))
    sim._BASES.clear()
    got = sim.cca_metrics(x, y, keep=keep)
    assert got["svcca"] == pytest.approx(_ref_svcca(x, y, keep), rel=1e-10)
    assert got["pwcca"] == pytest.approx(_ref_pwcca(x, y), rel=1e-10)
    assert sim.svcca(x, y, keep=keep) == pytest.approx(got["svcca"], rel=1e-13)
    assert sim.pwcca(x, y) == pytest.approx(got["pwcca"], rel=1e-13)


def test_cca_rank_deficient() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((800, 5)) @ rng.standard_normal((5, 40))
    y = np.concatenate([x[:, :10] + 0.1 * rng.standard_normal((800, 10)), rng.standard_normal((800, 10))], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim._BASES.clear()
        got = sim.cca_metrics(x, y)
        rho = sim.canonical_correlations(x, y)
    assert len(rho) == 5
    assert got["svcca"] == pytest.approx(_ref_svcca(x, y, sim.SVCCA_KEEP), rel=1e-9)
    assert got["pwcca"] == pytest.approx(_ref_pwcca(x, y), rel=1e-9)


def test_cached_basis_keys_on_content() -> None:
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.standard_normal((300, 12)))
    sim._BASES.clear()
    first = sim._cached_basis(x, "X", "t")
    same = sim._cached_basis(x.clone(), "X", "t")  # equal content, another tensor: hit
    assert same is first
    changed = x.clone()
    changed[17, 3] += 1e-12
    other = sim._cached_basis(changed, "X", "t")  # different content: miss
    assert other is not first
    assert len(sim._BASES) == 2
    reshaped = sim._cached_basis(x.reshape(600, 6), "X", "t")  # same bytes, other shape: miss
    assert reshaped[0].shape[0] == 600
    strided = torch.from_numpy(np.asfortranarray(x.numpy()))  # same values, other memory layout: hit
    assert sim._cached_basis(strided, "X", "t") is first
    sim._BASES.clear()


def test_cca_constant_view_raises() -> None:
    x = np.random.default_rng(11).standard_normal((500, 8))
    with pytest.raises(DynamicsError, match="constant"):
        sim.cca_metrics(x, np.ones((500, 8)))
    with pytest.raises(DynamicsError, match="constant"):
        sim.svcca(np.full((500, 8), 3.0), x)
