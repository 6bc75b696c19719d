"""Entry-wise metrics: Gini coefficient, Hoyer sparsity, induced ∞-norm (closed forms and brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynamics
from dynamics import EmptyMatrixError, NonFiniteError, ShapeError
from dynamics import sparsity as sp


def brute_gini(M):
    """Mean absolute difference over twice the mean: sum_ij |a_i - a_j| / (2 n sum a) (no sorting)."""
    a = np.abs(np.asarray(M, dtype=np.float64)).ravel()
    return np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum())


def brute_hoyer(M):
    x = np.asarray(M, dtype=np.float64).ravel()
    n = x.size
    return (math.sqrt(n) - np.abs(x).sum() / np.linalg.norm(x)) / (math.sqrt(n) - 1)


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (7, 5)])
def test_equal_magnitudes_give_zero(shape):
    signs = np.where(np.random.default_rng(0).random(shape) < 0.5, -1.0, 1.0)
    M = 0.37 * signs  # equal |entries|, mixed signs
    assert dynamics.gini(M) == 0.0
    assert dynamics.hoyer_sparsity(M) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("n", [2, 5, 64, 1000])
def test_one_hot(n):
    M = np.zeros((1, n))
    M[0, n // 3] = -2.5
    assert dynamics.gini(M) == pytest.approx((n - 1) / n, abs=1e-15)
    assert dynamics.gini(M.reshape(n, 1)) == pytest.approx((n - 1) / n, abs=1e-15)
    assert dynamics.hoyer_sparsity(M) == pytest.approx(1.0, abs=1e-15)


def test_hand_worked_values():
    # sorted |x| = 1,2,3,4; weights 2i-n-1 = -3,-1,1,3: (-3-2+3+12) / (4*10) = 0.25
    assert dynamics.gini([[4.0, -3.0], [2.0, 1.0]]) == pytest.approx(0.25, abs=1e-15)
    # sorted 0,0,1,3: (1 + 9) / (4*4) = 0.625
    assert dynamics.gini([[0.0, 3.0, 0.0, -1.0]]) == pytest.approx(0.625, abs=1e-15)
    # x = (0,0,3,4): l1 = 7, l2 = 5, sqrt(4) = 2: (2 - 7/5) / (2 - 1) = 0.6
    assert dynamics.hoyer_sparsity([[0.0, 0.0], [3.0, -4.0]]) == pytest.approx(0.6, abs=1e-15)
    # ||M||_inf: rows |1|+|-2| = 3, |3|+|0.5| = 3.5
    assert dynamics.induced_inf_norm([[1.0, -2.0], [3.0, 0.5]]) == 3.5


def test_zero_matrix_and_single_entry_are_defined_as_zero():
    for M in (np.zeros((3, 4)), [[0.0]], [[7.0]], [[-1e-300]]):
        assert dynamics.gini(M) == 0.0
        assert dynamics.hoyer_sparsity(M) == 0.0
    assert dynamics.induced_inf_norm(np.zeros((3, 4))) == 0.0
    assert dynamics.induced_inf_norm([[-7.0]]) == 7.0


def test_against_brute_force_on_random_matrices():
    rng = np.random.default_rng(1)
    for M in (rng.standard_normal((13, 9)), rng.exponential(size=(4, 50)) ** 3, rng.integers(-3, 4, (8, 8))):
        assert dynamics.gini(M) == pytest.approx(brute_gini(M), abs=1e-13)
        assert dynamics.hoyer_sparsity(M) == pytest.approx(brute_hoyer(M), abs=1e-13)
        assert dynamics.induced_inf_norm(M) == pytest.approx(np.abs(M).sum(1).max(), rel=1e-14)


def test_gaussian_entries_match_the_half_normal_closed_forms():
    """Gini of |N(0,1)| is sqrt(2) - 1; Hoyer tends to (sqrt(n) - sqrt(n)·sqrt(2/pi)) / (sqrt(n) - 1)."""
    M = np.random.default_rng(2).standard_normal((1000, 1000))
    n = M.size
    assert dynamics.gini(M) == pytest.approx(math.sqrt(2) - 1, abs=3e-3)  # the estimate varies by ~1e-3 at n = 10^6
    expected = (math.sqrt(n) - math.sqrt(n) * math.sqrt(2 / math.pi)) / (math.sqrt(n) - 1)
    assert dynamics.hoyer_sparsity(M) == pytest.approx(expected, abs=3e-3)


def test_induced_inf_norm_matches_torch():
    for M in (torch.randn(17, 5), torch.randn(3, 6, 40, dtype=torch.float64)):
        ref = torch.linalg.matrix_norm(M.double(), ord=math.inf).numpy()
        np.testing.assert_allclose(dynamics.induced_inf_norm(M), ref, rtol=1e-13)


# --------------------------------------------------------------------------- invariances, precision, batches


def test_scale_and_sign_invariant_without_overflow():
    M = np.random.default_rng(3).standard_normal((30, 20))
    g, h = dynamics.gini(M), dynamics.hoyer_sparsity(M)
    for c in (1e200, -1e-300, 3.0):
        assert dynamics.gini(c * M) == pytest.approx(g, abs=1e-14)
        assert dynamics.hoyer_sparsity(c * M) == pytest.approx(h, abs=1e-14)
    assert dynamics.induced_inf_norm(1e300 * np.ones((2, 3))) == pytest.approx(3e300)


def test_batches_match_a_loop():
    B = np.random.default_rng(4).standard_normal((3, 2, 6, 5))
    for f in (dynamics.gini, dynamics.hoyer_sparsity, dynamics.induced_inf_norm):
        out = f(B)
        assert out.shape == (3, 2)
        ref = np.array([[f(B[i, j]) for j in range(2)] for i in range(3)])
        np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-15)


def test_chunked_sums_equal_one_chunk(monkeypatch):
    M = np.random.default_rng(5).standard_normal((2, 41, 37)) ** 3
    whole = sp.entry_metrics(M)
    monkeypatch.setattr(sp, "_CHUNK", 7)  # many chunks, a short last one
    chunked = sp.entry_metrics(M)
    for key in sp.ENTRY_METRICS:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-13)
    np.testing.assert_allclose(chunked["gini"], [brute_gini(m) for m in M], atol=1e-13)


def test_dtypes_and_torch_inputs_agree():
    x32 = torch.randn(20, 30)
    ref = {k: v for k, v in sp.entry_metrics(x32.double().numpy()).items()}  # float64 path (int64-view sort)
    for x in (x32, x32.numpy(), x32.requires_grad_()):
        for key, v in sp.entry_metrics(x).items():
            assert v == pytest.approx(ref[key], rel=1e-13), key
    h = torch.randn(20, 30).to(torch.bfloat16)
    assert dynamics.gini(h) == pytest.approx(dynamics.gini(h.float()), rel=1e-13)
    assert dynamics.hoyer_sparsity(np.ones((3, 3), dtype=np.int64)) == 0.0


def test_entry_metrics_equal_the_single_functions():
    M = np.random.default_rng(6).laplace(size=(12, 7))
    m = sp.entry_metrics(M)
    assert set(m) == set(sp.ENTRY_METRICS) == {"gini", "hoyer_sparsity", "induced_inf_norm"}
    assert m["gini"] == dynamics.gini(M)
    assert m["hoyer_sparsity"] == pytest.approx(dynamics.hoyer_sparsity(M), abs=1e-15)
    assert m["induced_inf_norm"] == dynamics.induced_inf_norm(M)


def test_sparser_is_higher():
    rng = np.random.default_rng(7)
    dense = rng.standard_normal((50, 50))
    sparse = dense * (rng.random((50, 50)) < 0.05)
    assert dynamics.gini(sparse) > dynamics.gini(dense) + 0.3
    assert dynamics.hoyer_sparsity(sparse) > dynamics.hoyer_sparsity(dense) + 0.3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("f", [dynamics.gini, dynamics.hoyer_sparsity, dynamics.induced_inf_norm])
def test_bad_input_is_refused_with_a_message(f):
    bad = np.ones((3, 3))
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=f.__name__):
        f(bad)
    bad[1, 2] = np.inf
    with pytest.raises(NonFiniteError):
        f(bad)
    with pytest.raises(ShapeError, match="reshape"):
        f(np.ones(4))
    with pytest.raises(EmptyMatrixError):
        f(np.ones((0, 3)))
