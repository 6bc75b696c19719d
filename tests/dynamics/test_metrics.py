"""Metric definitions: exact edge cases and closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynamics
from dynamics import DynamicsError, NonFiniteError, Spectrum

SCALAR_METRICS = [
    dynamics.effective_rank,
    dynamics.proportional_effective_rank,
    dynamics.stable_rank,
    dynamics.numerical_rank,
    dynamics.condition_number,
    dynamics.truncated_condition_number,
    dynamics.spectral_entropy,
    dynamics.participation_ratio,
]


def metrics_of(M, **kw):
    return dynamics.spectrum_metrics(M, **kw)


def assert_no_nan(d):
    for k, v in d.items():
        assert not np.any(np.isnan(v)), k


def orthogonal(n, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 9), (9, 4), (1, 5), (5, 1)])
def test_zero_matrix_documented_values(shape):
    m = metrics_of(np.zeros(shape))
    assert_no_nan(m)
    assert m["effective_rank"] == 0.0
    assert m["proportional_effective_rank"] == 0.0
    assert m["stable_rank"] == 0.0
    assert m["numerical_rank"] == 0
    assert m["condition_number"] == math.inf and m["log10_condition_number"] == math.inf
    assert m["truncated_condition_number"] == math.inf
    assert m["spectral_entropy"] == 0.0
    assert m["participation_ratio"] == 0.0
    assert m["top_1_energy"] == 0.0 and dynamics.tail_energy(np.zeros(shape), 1) == 0.0


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 6)])
def test_rank_one(shape):
    rng = np.random.default_rng(1)
    M = np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    m = metrics_of(M)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-12)
    assert m["stable_rank"] == pytest.approx(1.0, abs=1e-12)
    assert m["numerical_rank"] == 1
    assert m["condition_number"] > 1e12  # s_k is rounding noise or exactly 0
    assert m["truncated_condition_number"] == 1.0
    assert m["spectral_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert m["top_1_energy"] == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_identity_and_orthogonal_closed_forms(n):
    for M in (np.eye(n), orthogonal(n, seed=n), 3.5 * orthogonal(n, seed=n + 1)):
        m = metrics_of(M)
        assert m["effective_rank"] == pytest.approx(n, rel=1e-12)
        assert m["proportional_effective_rank"] == pytest.approx(1.0, rel=1e-12)
        assert m["stable_rank"] == pytest.approx(n, rel=1e-12)
        assert m["participation_ratio"] == pytest.approx(n, rel=1e-12)
        assert m["numerical_rank"] == n
        assert m["condition_number"] == pytest.approx(1.0, rel=1e-12)
        assert m["log10_condition_number"] == pytest.approx(0.0, abs=1e-12)
        expected_entropy = 0.0 if n == 1 else 1.0
        assert m["spectral_entropy"] == pytest.approx(expected_entropy, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1)])
def test_single_row_and_column(shape):
    M = np.arange(1.0, 1.0 + np.prod(shape)).reshape(shape)
    m = metrics_of(M)
    assert m["sigma_max"] == pytest.approx(np.linalg.norm(M))
    assert m["effective_rank"] == 1.0
    assert m["proportional_effective_rank"] == 1.0
    assert m["stable_rank"] == 1.0
    assert m["numerical_rank"] == 1
    assert m["condition_number"] == 1.0
    assert m["spectral_entropy"] == 0.0  # k = 1: defined as 0 (ln 1 = 0)


def test_duplicated_singular_values():
    M = np.diag([3.0, 3.0, 1.0, 1.0])
    p = np.array([3, 3, 1, 1]) / 8
    h = -(p * np.log(p)).sum()
    m = metrics_of(M)
    assert m["effective_rank"] == pytest.approx(math.exp(h), rel=1e-12)
    assert m["spectral_entropy"] == pytest.approx(h / math.log(4), rel=1e-12)
    assert m["stable_rank"] == pytest.approx(20 / 9, rel=1e-12)
    assert m["participation_ratio"] == pytest.approx(20**2 / (81 * 2 + 2), rel=1e-12)
    assert m["condition_number"] == pytest.approx(3.0)
    assert m["top_1_energy"] == pytest.approx(9 / 20)
    assert dynamics.top_k_energy(M, 2) == pytest.approx(18 / 20)
    assert dynamics.tail_energy(M, 2) == pytest.approx(2 / 20)


def test_exact_zero_singular_value_gives_inf_not_nan():
    M = np.diag([2.0, 1.0, 0.0])
    m = metrics_of(M)
    assert_no_nan(m)
    assert m["condition_number"] == math.inf
    assert m["truncated_condition_number"] == 2.0
    assert m["log10_truncated_condition_number"] == pytest.approx(math.log10(2))
    assert m["numerical_rank"] == 2
    assert m["effective_rank"] == pytest.approx(math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)))
    assert m["proportional_effective_rank"] == pytest.approx(m["effective_rank"] / 3)
    assert m["sigma_min"] == 0.0


def test_effective_rank_of_k_equal_values_is_k():
    for k in (1, 2, 5):
        M = np.diag([1.0] * k + [0.0] * (6 - k))
        assert dynamics.effective_rank(M) == pytest.approx(k, rel=1e-12)


def test_condition_number_closed_form_and_log10():
    M = np.diag([100.0, 10.0, 0.1])
    assert dynamics.condition_number(M) == pytest.approx(1000.0)
    assert dynamics.condition_number(M, log10=True) == pytest.approx(3.0)


# --------------------------------------------------------------------------- options


def test_numerical_rank_tol_and_rtol():
    M = np.diag([1.0, 0.5, 1e-3, 1e-9])
    assert dynamics.numerical_rank(M) == 4  # default float64 tol ~ 1e-15
    assert dynamics.numerical_rank(M, tol=1e-6) == 3
    assert dynamics.numerical_rank(M, rtol=0.1) == 2
    assert dynamics.numerical_rank(M, tol=0) == 4
    assert dynamics.numerical_rank(M, tol=10.0) == 0
    assert dynamics.truncated_condition_number(M, tol=1e-6) == pytest.approx(1000.0)
    assert dynamics.truncated_condition_number(M, tol=10.0) == math.inf
    with pytest.raises(DynamicsError, match="at most one"):
        dynamics.numerical_rank(M, tol=1e-3, rtol=1e-3)
    with pytest.raises(DynamicsError, match="`tol`"):
        dynamics.numerical_rank(M, tol=-1.0)
    with pytest.raises(DynamicsError, match="`tol`"):
        dynamics.numerical_rank(M, tol=float("nan"))


def test_batch_tolerance_array():
    M = np.stack([np.diag([1.0, 0.1]), np.diag([1.0, 0.01])])
    np.testing.assert_array_equal(dynamics.numerical_rank(M, tol=[0.05, 0.05]), [2, 1])
    with pytest.raises(DynamicsError):
        dynamics.numerical_rank(M, tol=[0.1, 0.2, 0.3])


def test_top_k_energy_arguments():
    M = np.diag([2.0, 1.0])
    assert dynamics.top_k_energy(M, 5) == 1.0
    assert dynamics.tail_energy(M, 5) == 0.0
    assert dynamics.top_k_energy(M, 1) + dynamics.tail_energy(M, 1) == pytest.approx(1.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DynamicsError, match="`k`"):
            dynamics.top_k_energy(M, bad)
    assert set(metrics_of(M, top_k=(1, 3))) >= {"top_1_energy", "top_3_energy"}


def test_tail_energy_keeps_small_tails():
    M = np.diag([1.0, 1e-10])
    assert dynamics.tail_energy(M, 1) == pytest.approx(1e-20, rel=1e-6)


# --------------------------------------------------------------------------- return types


def test_single_matrix_returns_python_scalars():
    m = metrics_of(np.random.default_rng(2).standard_normal((5, 4)))
    for key, v in m.items():
        assert type(v) is (int if key == "numerical_rank" else float), key


def test_batch_returns_arrays_of_batch_shape():
    M = torch.randn(2, 3, 6, 4)
    m = metrics_of(M)
    for key, v in m.items():
        assert isinstance(v, np.ndarray) and v.shape == (2, 3), key
    assert m["numerical_rank"].dtype == np.int64
    for i in range(2):
        for j in range(3):
            assert m["effective_rank"][i, j] == pytest.approx(dynamics.effective_rank(M[i, j]), rel=1e-12)


@pytest.mark.parametrize("fn", SCALAR_METRICS)
def test_every_metric_accepts_spectrum_numpy_and_torch(fn):
    M = np.random.default_rng(3).standard_normal((7, 5))
    a, b, c = fn(M), fn(torch.from_numpy(M)), fn(dynamics.spectrum(M))
    assert a == b == c


@pytest.mark.parametrize("fn", SCALAR_METRICS)
def test_every_metric_rejects_nan(fn):
    M = np.eye(3)
    M[1, 1] = np.nan
    with pytest.raises(NonFiniteError, match=fn.__name__):
        fn(M)


def test_torch_svdvals_nan_pitfall_is_caught():
    M = torch.eye(4)
    M[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        dynamics.numerical_rank(M)


def test_spectrum_metrics_keys_and_consistency():
    M = np.random.default_rng(4).standard_normal((10, 6))
    m = metrics_of(M)
    s = dynamics.spectrum(M)
    assert m["effective_rank"] == s.effective_rank()
    assert m["spectral_entropy"] == pytest.approx(math.log(m["effective_rank"]) / math.log(6))
    assert m["proportional_effective_rank"] == pytest.approx(m["effective_rank"] / 6)
    assert m["log10_condition_number"] == pytest.approx(math.log10(m["condition_number"]))
    assert set(m) == {
        "effective_rank",
        "proportional_effective_rank",
        "stable_rank",
        "numerical_rank",
        "condition_number",
        "log10_condition_number",
        "truncated_condition_number",
        "log10_truncated_condition_number",
        "spectral_entropy",
        "participation_ratio",
        "sigma_max",
        "sigma_min",
        "spectral_norm",
        "frobenius_norm",
        "nuclear_norm",
        "top_1_energy",
        "top_10_energy",
    }


@pytest.mark.parametrize("method", ["direct", "gram", "auto"])
def test_norms_from_the_spectrum_match_torch(method):
    M = torch.randn(3, 40, 7, dtype=torch.float64)  # tall: the Gram route applies
    m = dynamics.spectrum_metrics(M, method=method)
    for key, ord_ in (("frobenius_norm", "fro"), ("nuclear_norm", "nuc"), ("spectral_norm", 2)):
        np.testing.assert_allclose(m[key], torch.linalg.matrix_norm(M, ord=ord_).numpy(), rtol=1e-12, err_msg=key)
    np.testing.assert_array_equal(m["spectral_norm"], m["sigma_max"])
    s = dynamics.spectrum(M[0])
    assert s.frobenius_norm() == pytest.approx(float(torch.linalg.matrix_norm(M[0])), rel=1e-12)
    assert s.nuclear_norm() == pytest.approx(float(torch.linalg.matrix_norm(M[0], ord="nuc")), rel=1e-12)
    assert s.spectral_norm() == s.sigma_max()


def test_norms_of_factored_zero_and_huge_spectra():
    rng = np.random.default_rng(11)
    L, R = rng.standard_normal((30, 3)), rng.standard_normal((3, 20))
    f = dynamics.product_spectrum(L, R)  # 3 stored values, 17 implied zeros
    for key, ord_ in (("frobenius_norm", "fro"), ("nuclear_norm", "nuc"), ("spectral_norm", 2)):
        assert f.metrics()[key] == pytest.approx(np.linalg.norm(L @ R, ord_), rel=1e-12), key
    zero = metrics_of(np.zeros((4, 3)))
    assert zero["frobenius_norm"] == zero["nuclear_norm"] == zero["spectral_norm"] == 0.0
    huge = Spectrum(np.array([4e200, 3e200]), (2, 2))  # the squares overflow float64; the norm does not
    assert huge.frobenius_norm() == pytest.approx(5e200, rel=1e-15)
    assert huge.nuclear_norm() == pytest.approx(7e200, rel=1e-15)


def test_factored_spectrum_implied_zeros():
    s = Spectrum(np.array([2.0, 1.0]), (5, 4), method="factored")
    full = Spectrum(np.array([2.0, 1.0, 0.0, 0.0]), (5, 4))
    for key, v in s.metrics().items():
        assert v == full.metrics()[key], key
