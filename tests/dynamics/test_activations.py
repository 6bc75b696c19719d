"""Activation effective rank (centred or not), anisotropy, linear CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamics
from dynamics import DynamicsError, ShapeError


def brute_anisotropy(X):
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = U @ U.T
    n = len(X)
    return (C.sum() - np.trace(C)) / (n * (n - 1))


def brute_cka(X, Y):
    """HSIC form with the n x n centring matrix (Kornblith et al. 2019, eq. for linear CKA)."""
    n = len(X)
    Hm = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda a, b: np.trace(a @ Hm @ b @ Hm)
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


# --------------------------------------------------------------------------- effective rank


def test_centring_removes_the_offset():
    rng = np.random.default_rng(0)
    tokens, feats = 200, 16
    noise = rng.standard_normal((tokens, 1)) @ rng.standard_normal((1, feats))  # rank 1
    X = noise - noise.mean(0) + 50.0 * rng.standard_normal(feats)  # + constant offset row
    centred = dynamics.activation_spectrum(X)
    raw = dynamics.activation_spectrum(X, center=False)
    assert centred.numerical_rank() == 1 and raw.numerical_rank() == 2
    assert dynamics.activation_effective_rank(X) == pytest.approx(1.0, abs=1e-9)
    assert 1.0 < dynamics.activation_effective_rank(X, center=False) < 2.0
    assert centred.shape == (tokens, feats) and centred.dtype == "float64"


def test_activation_spectrum_invariant_to_offset_and_matches_manual_centring():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    a = dynamics.activation_spectrum(X)
    b = dynamics.activation_spectrum(X + 7.0)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4)
    manual = X.astype(np.float64) - X.astype(np.float64).mean(0)
    np.testing.assert_allclose(a.values, np.linalg.svd(manual, compute_uv=False), rtol=1e-9)
    assert a.method == "gram"  # tokens >> features


def test_activation_effective_rank_batched_and_single_token():
    X = torch.randn(3, 64, 8)
    er = dynamics.activation_effective_rank(X)
    assert er.shape == (3,) and np.all((er > 1) & (er <= 8))
    assert dynamics.activation_effective_rank(torch.randn(1, 8)) == 0.0  # centred single token is 0


# --------------------------------------------------------------------------- anisotropy


def test_anisotropy_matches_pairwise_mean():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 7)) + 0.5
    assert dynamics.anisotropy(X) == pytest.approx(brute_anisotropy(X), rel=1e-12)
    assert dynamics.anisotropy(torch.from_numpy(X).float()) == pytest.approx(brute_anisotropy(X), rel=1e-5)


def test_anisotropy_closed_forms():
    assert dynamics.anisotropy(np.tile([1.0, 2.0, 3.0], (10, 1))) == pytest.approx(1.0)
    assert dynamics.anisotropy(np.eye(5)) == pytest.approx(0.0, abs=1e-15)
    assert dynamics.anisotropy(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)
    scaled = np.random.default_rng(3).standard_normal((20, 4))
    row_scale = np.random.default_rng(4).uniform(0.1, 10, (20, 1))
    assert dynamics.anisotropy(scaled * row_scale) == pytest.approx(dynamics.anisotropy(scaled))


def test_anisotropy_batched_and_large_n_without_n_by_n_matrix():
    X = torch.randn(2, 30, 5)
    a = dynamics.anisotropy(X)
    assert a.shape == (2,)
    assert a[1] == pytest.approx(brute_anisotropy(X[1].double().numpy()), rel=1e-9)
    big = torch.randn(200_000, 8) + 1.0  # an n x n float64 matrix would be 320 GB
    assert 0.4 < dynamics.anisotropy(big) < 0.6


def test_anisotropy_errors():
    with pytest.raises(DynamicsError, match="all-zero row"):
        dynamics.anisotropy(np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ShapeError, match="at least 2 rows"):
        dynamics.anisotropy(np.ones((1, 4)))


# --------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("n, p, q", [(200, 10, 6), (12, 40, 30), (30, 30, 30)])
def test_linear_cka_matches_hsic_definition_on_both_routes(n, p, q):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, p))
    Y = X[:, : min(p, q)] @ rng.standard_normal((min(p, q), q)) + rng.standard_normal((n, q))
    ref = brute_cka(X, Y)
    for route in ("auto", "features", "tokens"):
        assert dynamics.linear_cka(X, Y, route=route) == pytest.approx(ref, rel=1e-10)
    assert dynamics.linear_cka(Y, X) == pytest.approx(ref, rel=1e-10)


def test_linear_cka_invariances():
    rng = np.random.default_rng(6)
    X, Y = rng.standard_normal((100, 8)), rng.standard_normal((100, 5))
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    assert dynamics.linear_cka(X, X) == pytest.approx(1.0)
    base = dynamics.linear_cka(X, Y)
    assert dynamics.linear_cka(3.0 * X @ Q + 2.0, Y) == pytest.approx(base, rel=1e-10)
    assert 0.0 <= base <= 1.0


def test_linear_cka_batched_and_errors():
    X, Y = torch.randn(4, 50, 6), torch.randn(4, 50, 3)
    c = dynamics.linear_cka(X, Y)
    assert c.shape == (4,)
    assert c[2] == pytest.approx(dynamics.linear_cka(X[2], Y[2]), rel=1e-10)
    with pytest.raises(ShapeError, match="same size along axis -2"):
        dynamics.linear_cka(np.ones((5, 3)), np.ones((6, 3)))
    with pytest.raises(DynamicsError, match="constant"):
        dynamics.linear_cka(np.ones((5, 3)), np.random.default_rng(0).standard_normal((5, 3)))
    with pytest.raises(DynamicsError, match="route"):
        dynamics.linear_cka(X, Y, route="fast")
