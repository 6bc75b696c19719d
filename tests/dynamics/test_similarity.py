"""SVCCA and PWCCA: invariances, independent data, brute-force CCA, and the tokens >> features rule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import dynamics
from dynamics import DynamicsError, DynamicsWarning, NonFiniteError, ShapeError
from dynamics import similarity as sim


def inv_sqrt(S):
    """S^(-1/2) of a symmetric positive definite matrix (scipy reference)."""
    return np.real(scipy.linalg.inv(scipy.linalg.sqrtm(S)))


def brute_cca(X, Y):
    """Textbook CCA from covariance matrices: rho = svd(Sxx^-1/2 Sxy Syy^-1/2); variates h_i = Xc Sxx^-1/2 u_i."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    ix, iy = inv_sqrt(Xc.T @ Xc), inv_sqrt(Yc.T @ Yc)
    U, rho, _ = np.linalg.svd(ix @ (Xc.T @ Yc) @ iy, full_matrices=False)
    H = Xc @ ix @ U
    return rho, H / np.linalg.norm(H, axis=0), Xc


def brute_pwcca(X, Y):
    rho, H, Xc = brute_cca(X, Y)
    alpha = np.abs(H.T @ Xc).sum(axis=1)  # sum_j |<h_i, x_j>|
    return float((alpha / alpha.sum()) @ rho)


def brute_svcca(X, Y, keep=0.99):
    def reduce(Z):
        Zc = Z - Z.mean(0)
        U, s, _ = np.linalg.svd(Zc, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(frac >= keep)) + 1
        return U[:, :k] * s[:k]

    rho, _, _ = brute_cca(reduce(X), reduce(Y))
    return float(rho.mean())


def correlated_views(n=600, p=6, q=9, noise=1.0, seed=0):
    """Two views sharing a latent signal of unequal strength per direction, plus independent noise."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, p)) * np.linspace(3.0, 0.3, p)
    X = Z @ rng.standard_normal((p, p)) + 0.3 * noise * rng.standard_normal((n, p))
    Y = Z @ rng.standard_normal((p, q)) + noise * rng.standard_normal((n, q))
    return X, Y


# --------------------------------------------------------------------------- known answers


def test_orthogonal_transform_and_scale_give_one():
    X = np.random.default_rng(1).standard_normal((500, 12)) * np.linspace(4, 1, 12) + 3.0
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((12, 12)))
    Y = 7.5 * X @ Q - 2.0
    for a, b in ((X, Y), (Y, X)):
        assert dynamics.svcca(a, b) == pytest.approx(1.0, abs=1e-6)
        assert dynamics.pwcca(a, b) == pytest.approx(1.0, abs=1e-6)


def test_general_invertible_transform_gives_one():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((800, 10))
    A = rng.standard_normal((10, 10)) + 3 * np.eye(10)  # invertible, not orthogonal
    assert np.linalg.cond(A) < 1e3
    Y = X @ A
    for a, b in ((X, Y), (Y, X)):
        assert dynamics.pwcca(a, b) == pytest.approx(1.0, abs=1e-6)
        assert dynamics.svcca(a, b, keep=1.0) == pytest.approx(1.0, abs=1e-6)  # every direction kept
    # a wider map of full column rank: Y has 15 features spanning the same 10-dim space (rank-deficient view)
    Y2 = X @ rng.standard_normal((10, 15))
    assert dynamics.pwcca(X, Y2) == pytest.approx(1.0, abs=1e-6)
    assert dynamics.pwcca(Y2, X) == pytest.approx(1.0, abs=1e-6)
    rho = sim.canonical_correlations(X, np.hstack([X, X[:, :3]]))  # duplicated columns: rank 10, not 13
    assert rho.shape == (10,) and np.allclose(rho, 1.0, atol=1e-9)


@pytest.mark.parametrize("p, q", [(10, 10), (4, 16)])
def test_independent_data_is_near_zero(p, q):
    """Unrelated views: every canonical correlation is at most about sqrt(p/n) + sqrt(q/n) (Wachter)."""
    n = 4000
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    bound = 1.5 * (math.sqrt(p / n) + math.sqrt(q / n))  # 0.15 for 4000 x 10 and 10
    assert sim.canonical_correlations(X, Y).max() < bound
    assert 0 <= dynamics.svcca(X, Y) < bound
    assert 0 <= dynamics.pwcca(X, Y) < bound
    assert 0 <= dynamics.pwcca(Y, X) < bound


def test_canonical_correlations_and_pwcca_match_brute_force():
    X, Y = correlated_views()
    rho, _, _ = brute_cca(X, Y)
    np.testing.assert_allclose(sim.canonical_correlations(X, Y), rho, atol=1e-10)
    assert dynamics.pwcca(X, Y) == pytest.approx(brute_pwcca(X, Y), abs=1e-10)
    assert dynamics.pwcca(Y, X) == pytest.approx(brute_pwcca(Y, X), abs=1e-10)
    # the weighting matters: PWCCA is neither the plain mean nor symmetric here
    assert abs(dynamics.pwcca(X, Y) - rho.mean()) > 0.01
    assert abs(dynamics.pwcca(X, Y) - dynamics.pwcca(Y, X)) > 1e-3  # far above the 1e-10 agreement


def test_svcca_matches_brute_force_and_is_symmetric():
    X, Y = correlated_views(noise=0.5, seed=5)
    X = X * np.array([10, 5, 2, 1, 0.05, 0.01])  # two directions below 1% of the variance are dropped
    for keep in (0.99, 0.9, 1.0):
        got = dynamics.svcca(X, Y, keep=keep)
        assert got == pytest.approx(brute_svcca(X, Y, keep), abs=1e-10), keep
        assert dynamics.svcca(Y, X, keep=keep) == pytest.approx(got, abs=1e-12)
    assert dynamics.svcca(X, Y) != pytest.approx(dynamics.svcca(X, Y, keep=1.0), abs=1e-3)


def test_cca_metrics_is_both_in_one_call():
    X, Y = correlated_views(seed=6)
    m = sim.cca_metrics(X, Y)
    assert m == {"svcca": pytest.approx(dynamics.svcca(X, Y)), "pwcca": pytest.approx(dynamics.pwcca(X, Y))}
    assert 0 < m["svcca"] < 1 and 0 < m["pwcca"] < 1


def test_torch_float32_input_is_computed_in_float64_on_cpu():
    X, Y = correlated_views(seed=7)
    x, y = torch.from_numpy(X).float(), torch.from_numpy(Y).float()
    assert dynamics.pwcca(x, y) == pytest.approx(brute_pwcca(x.double().numpy(), y.double().numpy()), abs=1e-10)


# --------------------------------------------------------------------------- tokens >> features, bad input


def test_too_few_tokens_is_refused():
    rng = np.random.default_rng(8)
    for n, p, q in ((10, 10, 3), (8, 12, 2), (20, 3, 20)):
        X, Y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
        for f in (dynamics.svcca, dynamics.pwcca, sim.canonical_correlations):
            with pytest.raises(ShapeError, match="more tokens than features"):
                f(X, Y)


def test_few_tokens_per_feature_warn_and_enough_do_not():
    rng = np.random.default_rng(9)
    p = 8
    X, Y = rng.standard_normal((4 * p, p)), rng.standard_normal((4 * p, 3))
    for f in (dynamics.svcca, dynamics.pwcca):
        with pytest.warns(DynamicsWarning, match="inflated"):
            f(X, Y)
    n = int(sim.MIN_TOKENS_PER_FEATURE * p)
    X, Y = rng.standard_normal((n, p)), rng.standard_normal((n, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynamics.svcca(X, Y)
        dynamics.pwcca(X, Y)


def test_bad_input_is_refused_with_a_message():
    rng = np.random.default_rng(10)
    X, Y = rng.standard_normal((100, 4)), rng.standard_normal((100, 3))
    with pytest.raises(ShapeError, match="same size"):
        dynamics.svcca(X, Y[:90])
    with pytest.raises(ShapeError, match="2 dimensions"):
        dynamics.pwcca(X[None], Y[None])
    const = np.ones((100, 3))
    with pytest.raises(DynamicsError, match="constant"):
        dynamics.pwcca(X, const)
    with pytest.raises(DynamicsError, match="constant"):
        dynamics.svcca(const, Y)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError):
        dynamics.svcca(bad, Y)
    for keep in (0, 1.5, "x", -0.1):
        with pytest.raises(DynamicsError, match="keep"):
            dynamics.svcca(X, Y, keep=keep)
