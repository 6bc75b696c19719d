"""Update matrices: W_t - W_{t-lag}, per-merge and cumulative updates, LoRA s*B*A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamics
from dynamics import DynamicsError, NonFiniteError, ShapeError


def test_weight_update_types_and_values():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    d = dynamics.weight_update(a, b)
    assert isinstance(d, np.ndarray) and d.dtype == np.float32
    np.testing.assert_array_equal(d, (a.astype(np.float64) - b).astype(np.float32))
    t = dynamics.weight_update(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    hb = dynamics.weight_update(torch.ones(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16))
    assert hb.dtype == torch.float32  # never rounded to half precision


def test_weight_update_errors():
    with pytest.raises(ShapeError, match="same shape"):
        dynamics.weight_update(np.ones((3, 2)), np.ones((2, 3)))
    with pytest.raises(NonFiniteError, match="`old`"):
        dynamics.weight_update(np.ones((2, 2)), np.full((2, 2), np.nan))


def test_weight_updates_lag_and_stacking():
    W = [np.full((3, 2), float(t)) for t in range(5)]
    d1 = dynamics.weight_updates(W)
    assert d1.shape == (4, 3, 2) and np.all(d1 == 1.0)
    d2 = dynamics.weight_updates(np.stack(W), lag=2)
    assert d2.shape == (3, 3, 2) and np.all(d2 == 2.0)
    with pytest.raises(ShapeError, match="lag"):
        dynamics.weight_updates(W, lag=5)
    with pytest.raises(ShapeError, match="at least 2"):
        dynamics.weight_updates(W[:1])
    with pytest.raises(ShapeError, match="same shape"):
        dynamics.weight_updates([np.ones((2, 2)), np.ones((2, 3))])
    with pytest.raises(DynamicsError, match="`lag`"):
        dynamics.weight_updates(W, lag=0)


def test_merge_and_cumulative_updates_accumulate_rank():
    """Each ReLoRA cycle adds a rank-r update: per-merge updates have rank r,
    the cumulative update W_t - W_0 has rank min(t * r, d)."""
    rng = np.random.default_rng(1)
    d, r, cycles = 40, 3, 5
    W = [rng.standard_normal((d, d))]
    for _ in range(cycles):
        B, A = rng.standard_normal((d, r)), rng.standard_normal((r, d))
        W.append(W[-1] + 0.5 * B @ A)
    merges = dynamics.merge_updates(W)
    cumulative = dynamics.cumulative_updates(torch.from_numpy(np.stack(W)))
    assert merges.shape == (cycles, d, d) and isinstance(cumulative, torch.Tensor)
    np.testing.assert_array_equal(dynamics.numerical_rank(merges, rtol=1e-10), [r] * cycles)
    np.testing.assert_array_equal(dynamics.restart_updates(W), merges)  # the former name still works
    np.testing.assert_array_equal(
        dynamics.numerical_rank(cumulative, rtol=1e-10), [r * t for t in range(1, cycles + 1)]
    )
    er = dynamics.effective_rank(cumulative)
    assert np.all(np.diff(er) > 0)


def test_update_spectrum_records_weights_dtype():
    a = torch.randn(6, 4, dtype=torch.bfloat16)
    b = torch.randn(6, 4, dtype=torch.bfloat16)
    s = dynamics.update_spectrum(a, b)
    assert s.dtype == "bfloat16"
    ref = np.linalg.svd(a.double().numpy() - b.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.values, ref, rtol=1e-12)


@pytest.mark.parametrize("out_dim, r, in_dim", [(48, 4, 30), (30, 4, 48), (5, 8, 3), (20, 1, 20)])
def test_lora_update_spectrum_matches_dense(out_dim, r, in_dim):
    rng = np.random.default_rng(2)
    B, A = rng.standard_normal((out_dim, r)), rng.standard_normal((r, in_dim))
    s = dynamics.lora_update_spectrum(B, A, scale=2.0)
    dense = dynamics.lora_update(B, A, scale=2.0)
    np.testing.assert_allclose(dense, 2.0 * B @ A)
    ref = np.linalg.svd(dense, compute_uv=False)
    k = min(out_dim, in_dim, r)
    assert s.shape == (out_dim, in_dim) and s.values.shape == (k,) and s.method == "factored"
    np.testing.assert_allclose(s.values, ref[:k], rtol=1e-10)
    np.testing.assert_allclose(ref[k:], 0, atol=1e-10 * ref[0])
    assert s.effective_rank() == pytest.approx(dynamics.effective_rank(dense), rel=1e-8)
    assert s.proportional_effective_rank() == pytest.approx(dynamics.proportional_effective_rank(dense), rel=1e-8)


def test_lora_update_spectrum_scale_sign_batch_and_zero_b():
    rng = np.random.default_rng(3)
    B, A = torch.from_numpy(rng.standard_normal((4, 16, 2))), torch.from_numpy(rng.standard_normal((4, 2, 12)))
    pos = dynamics.lora_update_spectrum(B, A, scale=0.5)
    neg = dynamics.lora_update_spectrum(B, A, scale=-0.5)
    np.testing.assert_allclose(pos.values, neg.values)
    assert pos.batch_shape == (4,)
    zero = dynamics.lora_update_spectrum(torch.zeros(16, 2), torch.randn(2, 12), scale=2.0)
    assert zero.effective_rank() == 0.0 and zero.numerical_rank() == 0  # B = 0 at init


def test_lora_errors_name_factors():
    with pytest.raises(ShapeError, match=r"`B`.*\(\.\.\., out, r\)"):
        dynamics.lora_update_spectrum(np.ones((5, 3)), np.ones((2, 4)), scale=1.0)
    with pytest.raises(DynamicsError, match="scale"):
        dynamics.lora_update_spectrum(np.ones((5, 2)), np.ones((2, 4)), scale=float("inf"))
    with pytest.raises(TypeError):
        dynamics.lora_update(np.ones((5, 2)), np.ones((2, 4)))  # scale is required
