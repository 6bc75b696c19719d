"""Spectrum, singular-value routes (direct / Gram / factored), dtypes and input errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import dynamics
from dynamics import (
    DynamicsError,
    DynamicsWarning,
    EmptyMatrixError,
    NonFiniteError,
    ShapeError,
    Spectrum,
)
from dynamics.spectra import GRAM_MIN_SIGMA_RATIO


def with_spectrum(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """An m x n float64 matrix with singular values s (len min(m, n))."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * s) @ v.T


# --------------------------------------------------------------------------- Spectrum


def test_spectrum_fields_and_types():
    s = dynamics.spectrum(np.diag([3.0, 2.0, 1.0]).astype(np.float32))
    assert s.shape == (3, 3) and s.dtype == "float32" and s.method == "direct"
    assert s.values.dtype == np.float64 and s.values.shape == (3,)
    np.testing.assert_allclose(s.values, [3, 2, 1], rtol=1e-12)
    assert s.batch_shape == () and s.k == 3
    assert isinstance(s.effective_rank(), float)
    assert isinstance(s.numerical_rank(), int)


def test_spectrum_is_immutable():
    s = dynamics.spectrum(np.eye(3))
    with pytest.raises(ValueError):
        s.values[0] = 5.0
    with pytest.raises(AttributeError):
        s.shape = (4, 4)  # type: ignore[misc]


@pytest.mark.parametrize(
    "values, shape, exc",
    [
        ([1.0, 2.0], (2, 2), DynamicsError),  # ascending
        ([1.0, -1.0], (2, 2), DynamicsError),  # negative
        ([1.0, np.nan], (2, 2), NonFiniteError),
        ([3.0, 2.0, 1.0], (2, 5), ShapeError),  # more values than min(m, n)
        ([1.0], (0, 3), ShapeError),
        ([], (2, 2), ShapeError),
    ],
)
def test_spectrum_rejects_bad_values(values, shape, exc):
    with pytest.raises(exc):
        Spectrum(np.array(values), shape)


def test_spectrum_rejects_unknown_dtype():
    with pytest.raises(DynamicsError, match="dtype"):
        Spectrum(np.array([1.0]), (1, 1), dtype="float99")


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_to_dict_from_dict_round_trip_through_json(batch):
    rng = np.random.default_rng(1)
    M = rng.standard_normal(batch + (7, 4)).astype(np.float32)
    s = dynamics.spectrum(M)
    d = json.loads(json.dumps(s.to_dict()))
    s2 = Spectrum.from_dict(d)
    assert s2 == s
    assert (
        s2.metrics() == s.metrics()
        if not batch
        else all(np.array_equal(s2.metrics()[k], v) for k, v in s.metrics().items())
    )


def test_stored_spectrum_recomputes_metrics_without_matrix():
    M = np.random.default_rng(2).standard_normal((20, 8))
    stored = dynamics.spectrum(M).to_dict()
    del M
    s = Spectrum.from_dict(stored)
    assert dynamics.effective_rank(s) == s.effective_rank()
    assert set(dynamics.spectrum_metrics(s)) >= {"effective_rank", "condition_number"}


def test_from_dict_errors():
    with pytest.raises(DynamicsError, match="lacks"):
        Spectrum.from_dict({"values": [1.0]})
    with pytest.raises(DynamicsError, match="version"):
        Spectrum.from_dict({"values": [1.0], "shape": [1, 1], "dtype": "float64", "version": 99})


def test_batch_indexing_and_len():
    M = np.random.default_rng(3).standard_normal((4, 5, 6))
    s = dynamics.spectrum(M)
    assert len(s) == 4 and s.batch_shape == (4,)
    one = s[2]
    assert one.batch_shape == () and one == dynamics.spectrum(M[2], method=s.method)
    assert s[1:3].batch_shape == (2,)
    with pytest.raises(IndexError):
        s[0, 0]
    with pytest.raises(TypeError):
        one[0]


def test_equality_distinguishes_fields():
    a = Spectrum(np.array([2.0, 1.0]), (2, 2))
    assert a == Spectrum(np.array([2.0, 1.0]), (2, 2))
    assert a != Spectrum(np.array([2.0, 1.0]), (2, 3))
    assert a != Spectrum(np.array([2.0, 1.0]), (2, 2), dtype="float32")
    assert a != Spectrum(np.array([2.0, 0.5]), (2, 2))


# --------------------------------------------------------------------------- inputs


def test_numpy_torch_and_list_inputs_agree():
    M = np.random.default_rng(4).standard_normal((6, 4))
    a = dynamics.singular_values(M)
    b = dynamics.singular_values(torch.from_numpy(M))
    c = dynamics.singular_values(M.tolist())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, np.linalg.svd(M, compute_uv=False), rtol=1e-12)


def test_non_contiguous_and_grad_inputs():
    M = np.random.default_rng(5).standard_normal((8, 6))
    np.testing.assert_allclose(dynamics.singular_values(M[::-1, ::2]), np.linalg.svd(M[::-1, ::2], compute_uv=False))
    t = torch.randn(5, 3, requires_grad=True)
    assert dynamics.effective_rank(t) > 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(4, 4), (40, 4), (3, 4, 4)])
def test_non_finite_input_raises_not_nan(bad, shape):
    M = np.ones(shape)
    M.flat[5] = bad
    for x in (M, torch.from_numpy(M), torch.from_numpy(M).to(torch.bfloat16)):
        with pytest.raises(NonFiniteError, match="non-finite") as info:
            dynamics.spectrum(x)
        assert isinstance(info.value, ValueError)
        assert "spectrum()" in str(info.value) and "`M`" in str(info.value)


def test_overflowing_sum_is_not_mistaken_for_nan():
    M = np.full((3, 3), 1e308) * np.eye(3)
    M[0, 1] = 1e308  # sum overflows, entries are finite
    s = dynamics.spectrum(M)
    assert np.all(np.isfinite(s.values))


def test_huge_entries_fall_back_from_gram_to_direct():
    M = with_spectrum(40, 4, np.array([4.0, 3.0, 2.0, 1.0])) * 1e200  # s**2 overflows
    s = dynamics.spectrum(M)
    assert s.method == "direct"
    np.testing.assert_allclose(s.values, [4e200, 3e200, 2e200, 1e200], rtol=1e-12)


@pytest.mark.parametrize("method", ["auto", "gram"])
def test_tiny_entries_do_not_underflow_in_gram(method):
    M = with_spectrum(40, 4, np.array([4.0, 3.0, 2.0, 1.0])) * 1e-200  # s**2 underflows
    s = dynamics.spectrum(M, method=method)
    assert s.method == "direct"
    np.testing.assert_allclose(s.values, [4e-200, 3e-200, 2e-200, 1e-200], rtol=1e-12)
    assert dynamics.effective_rank(np.full((1, 2), 1.7e-284)) == 1.0


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (0, 2, 2)])
def test_empty_matrix_raises(shape):
    with pytest.raises(EmptyMatrixError, match="empty"):
        dynamics.spectrum(np.zeros(shape))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_wrong_ndim_names_argument_expected_and_got(shape):
    with pytest.raises(ShapeError) as info:
        dynamics.effective_rank(np.ones(shape))
    msg = str(info.value)
    assert "effective_rank()" in msg and "`M`" in msg and "(m, n)" in msg
    assert str(shape) in msg
    if shape == (5,):
        assert "reshape(1, -1)" in msg


def test_complex_and_non_numeric_rejected():
    with pytest.raises(DynamicsError, match="real"):
        dynamics.spectrum(np.ones((2, 2), dtype=complex))
    with pytest.raises(DynamicsError):
        dynamics.spectrum(np.array([["a", "b"]]))
    with pytest.raises(DynamicsError, match="method"):
        dynamics.spectrum(np.eye(2), method="fast")


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_is_upcast_and_dtype_recorded(dtype):
    t = torch.randn(12, 5).to(dtype)
    s = dynamics.spectrum(t)
    assert s.dtype == str(dtype).replace("torch.", "")
    ref = np.linalg.svd(t.double().numpy(), compute_uv=False)  # exact values of the input
    np.testing.assert_allclose(s.values, ref, rtol=1e-9)


def test_default_tol_uses_original_dtype_eps():
    M = torch.diag(torch.tensor([1.0, 1e-3]))
    assert dynamics.numerical_rank(M) == 2  # float32: tol = 2 * 1.2e-7
    assert dynamics.numerical_rank(M.to(torch.bfloat16)) == 1  # bf16: tol = 2 * 7.8e-3
    s = dynamics.spectrum(M.to(torch.bfloat16))
    assert s.default_tol() == pytest.approx(float(s.values[0]) * 2 * 2.0**-7)


def test_integer_input_is_computed_in_float64():
    s = dynamics.spectrum(np.array([[2, 0], [0, 1]]))
    np.testing.assert_allclose(s.values, [2, 1])
    assert s.eps == np.finfo(np.float64).eps


# --------------------------------------------------------------------------- routes


def test_auto_route_choice():
    rng = np.random.default_rng(6)
    assert dynamics.spectrum(rng.standard_normal((50, 50))).method == "direct"
    assert dynamics.spectrum(rng.standard_normal((60, 50))).method == "direct"
    assert dynamics.spectrum(rng.standard_normal((100, 50))).method == "gram"
    assert dynamics.spectrum(rng.standard_normal((20, 200))).method == "gram"


@pytest.mark.parametrize("shape", [(400, 40), (40, 400), (300, 12)])
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4 * 0.999])
def test_gram_route_matches_direct_within_documented_tolerance(shape, cond):
    k = min(shape)
    s_true = np.logspace(0, -np.log10(cond), k) if cond > 1 else np.ones(k)
    M = with_spectrum(*shape, s_true)
    g = dynamics.spectrum(M, method="auto")
    d = dynamics.spectrum(M, method="direct")
    assert g.method == "gram" and d.method == "direct"
    np.testing.assert_allclose(g.values, d.values, rtol=1e-7, atol=0)
    assert g.condition_number() == pytest.approx(d.condition_number(), rel=1e-7)
    assert g.numerical_rank() == d.numerical_rank() == k


def test_auto_falls_back_to_direct_for_ill_conditioned_and_rank_deficient():
    s_true = np.array([1.0, 1e-1, 1e-6, 1e-9])
    M = with_spectrum(200, 4, s_true)
    s = dynamics.spectrum(M)
    assert s.method == "direct"
    np.testing.assert_allclose(s.values, s_true, rtol=1e-6)
    assert s.condition_number() == pytest.approx(1e9, rel=1e-6)
    low = with_spectrum(200, 4, np.array([1.0, 0.5, 0.0, 0.0]))
    spec = dynamics.spectrum(low)
    assert spec.method == "direct" and spec.numerical_rank() == 2


def test_batch_mixing_routes_reports_it():
    good = with_spectrum(100, 5, np.linspace(2, 1, 5))
    bad = with_spectrum(100, 5, np.array([1, 1e-2, 1e-5, 1e-7, 1e-9]))
    s = dynamics.spectrum(np.stack([good, bad, good]))
    assert s.method == "gram+direct"
    np.testing.assert_allclose(s.values[1], [1, 1e-2, 1e-5, 1e-7, 1e-9], rtol=1e-5)
    np.testing.assert_allclose(s.values[0], np.linspace(2, 1, 5), rtol=1e-9)


def test_forced_gram_on_ill_conditioned_warns():
    M = with_spectrum(50, 5, np.array([1, 1e-2, 1e-5, 1e-7, 1e-9]))
    with pytest.warns(DynamicsWarning, match="ill-conditioned"):
        s = dynamics.spectrum(M, method="gram")
    assert s.method == "gram"
    assert s.values[-1] < GRAM_MIN_SIGMA_RATIO * s.values[0]


def test_forced_direct_never_uses_gram():
    M = np.random.default_rng(7).standard_normal((300, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dynamics.spectrum(M, method="direct").method == "direct"


def test_product_spectrum_matches_direct_route():
    rng = np.random.default_rng(8)
    L, R = rng.standard_normal((30, 4)), rng.standard_normal((4, 25))
    s = dynamics.product_spectrum(L, R, scale=-2.5)
    assert s.method == "factored" and s.shape == (30, 25) and s.values.shape == (4,)
    ref = np.linalg.svd(-2.5 * L @ R, compute_uv=False)
    np.testing.assert_allclose(s.values, ref[:4], rtol=1e-10)
    np.testing.assert_allclose(dynamics.singular_values(s), ref, atol=1e-10)
    assert s.condition_number() == np.inf
    assert s.numerical_rank() == 4


def test_product_spectrum_batched_and_broadcast():
    rng = np.random.default_rng(9)
    L, R = rng.standard_normal((3, 10, 2)), rng.standard_normal((2, 8))
    s = dynamics.product_spectrum(L, R)
    assert s.batch_shape == (3,)
    for i in range(3):
        np.testing.assert_allclose(s.values[i], np.linalg.svd(L[i] @ R, compute_uv=False)[:2], rtol=1e-10)
    with pytest.raises(ShapeError, match="inner"):
        dynamics.product_spectrum(L, R.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_agrees_with_cpu_float64():
    M = torch.randn(4, 300, 200)
    cpu = dynamics.spectrum(M)
    gpu = dynamics.spectrum(M.cuda())
    assert gpu.method == "direct"
    smax = cpu.values[..., :1]
    assert np.all(np.abs(gpu.values - cpu.values) <= 1e-5 * smax)
    np.testing.assert_allclose(gpu.effective_rank(), cpu.effective_rank(), rtol=1e-5)
    with pytest.raises(NonFiniteError):
        dynamics.spectrum(torch.full((3, 3), float("nan"), device="cuda"))
