"""Entry sparsity fast paths (dynamics.sparsity) against a plain float64 reference: np.sort and math.fsum.

Covers the float32 sort of exactly-float32 float64 values, the unscaled / power-of-two-scaled float64 sums,
the cached centred rank weights over several chunks, the numpy row sums of the induced ∞-norm and the torch
sums used off the CPU (run here on CPU tensors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynamics
from dynamics import NonFiniteError
from dynamics import sparsity as sp


def reference(M: np.ndarray) -> tuple[float, float, float]:
    """(gini, hoyer, induced inf-norm) of one matrix from the definitions: exact float64 sorts and fsum."""
    a = np.sort(np.abs(np.asarray(M, dtype=np.float64)).ravel())
    n = a.size
    peak = a[-1]
    if peak == 0.0 or n == 1:
        g = h = 0.0
    else:
        y = a / peak  # scaled by the peak only to keep the squares in range
        weights = np.arange(1 - n, n, 2, dtype=np.float64)  # 2i - n - 1, i = 1 .. n
        l1 = math.fsum(y.tolist())
        num = math.fsum((weights * y).tolist())  # products rounded once each, summed exactly
        g = min(max(num / (n * l1), 0.0), (n - 1) / n) if a[0] < peak else 0.0
        root = math.sqrt(n)
        h = min(max((root - l1 / math.sqrt(math.fsum((y * y).tolist()))) / (root - 1.0), 0.0), 1.0)
    rows = np.abs(np.asarray(M, dtype=np.float64)).reshape(-1, np.shape(M)[-1])
    inf = max(math.fsum(r.tolist()) for r in rows)
    return g, h, inf


def assert_matches(M, rel: float = 1e-13) -> None:
    """entry_metrics and the three single functions of ``M`` (numpy or torch, (m, n) or (B, m, n)) vs the reference."""
    arr = M.numpy() if isinstance(M, torch.Tensor) else np.asarray(M)
    batch = arr.reshape(-1, *arr.shape[-2:])
    expected = np.array([reference(m) for m in batch]).T.reshape(3, *arr.shape[:-2])
    got = sp.entry_metrics(M.clone() if isinstance(M, torch.Tensor) else M)
    for row, key in zip(expected, sp.ENTRY_METRICS, strict=True):
        np.testing.assert_allclose(got[key], row, rtol=rel, atol=1e-300, err_msg=key)
    np.testing.assert_allclose(dynamics.gini(M), expected[0], rtol=rel, atol=1e-300)
    np.testing.assert_allclose(dynamics.hoyer_sparsity(M), expected[1], rtol=rel, atol=1e-15)
    np.testing.assert_allclose(dynamics.induced_inf_norm(M), expected[2], rtol=rel, atol=1e-300)


def float32_update(rng: np.random.Generator, shape: tuple[int, ...], *, exact: bool) -> np.ndarray:
    """float64 difference of two float32 weights: exactly float32-valued for a small multiplicative step (Sterbenz),
    generally not for an additive one (entries cross zero)."""
    w0 = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if exact:
        w1 = (w0 * np.float32(1 - 1e-3)).astype(np.float32)
    else:
        w1 = (w0 + rng.standard_normal(shape).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    return w1.astype(np.float64) - w0.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_batches(dtype):
    rng = np.random.default_rng(0)
    assert_matches(rng.standard_normal((5, 17, 9)).astype(dtype))
    assert_matches((rng.exponential(size=(3, 40, 30)) ** 4).astype(dtype))
    assert_matches(torch.from_numpy(rng.standard_normal((2, 2, 8, 6)).astype(dtype)))


def test_embedding_shape_float32_and_updates():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((50304, 96)) * 0.02).astype(np.float32)
    assert_matches(w)
    for exact in (True, False):
        upd = float32_update(rng, (50304, 96), exact=exact)
        assert (sp._exactly_float32(np.abs(upd)) is not None) == exact
        assert_matches(upd)


def test_exactly_float32_check():
    x = np.abs(np.random.default_rng(2).standard_normal(200_000).astype(np.float32)).astype(np.float64)
    narrow = sp._exactly_float32(x)
    assert narrow is not None and narrow.dtype == np.float32 and np.array_equal(narrow, x)
    for bad in (1.0 + 2.0**-40, 1e-50, 1e300, 2.0**-149 * 1.5):  # extra bits, under / over float32's range
        y = x.copy()
        y[-1] = bad  # in the last step of the check
        assert sp._exactly_float32(y) is None
    y = x.copy()
    y[5] = 2.0**-149  # the smallest float32 subnormal is a float32
    assert sp._exactly_float32(y) is not None


def test_sorted_gives_the_float64_order_either_way():
    rng = np.random.default_rng(3)
    for exact in (True, False):
        a = np.abs(float32_update(rng, (3, 7000), exact=exact))
        got = sp._sorted(torch.from_numpy(a.copy()))
        assert got.dtype == (torch.float32 if exact else torch.float64)
        np.testing.assert_array_equal(got.numpy().astype(np.float64), np.sort(a, axis=-1))


def test_ties_zeros_and_equal_entries():
    rng = np.random.default_rng(4)
    assert_matches(rng.integers(-3, 4, (6, 50, 20)).astype(np.float64))
    assert_matches(rng.integers(-2, 3, (4, 33, 31)).astype(np.float32) * np.float32(0.1))
    sparse = np.zeros((4, 300, 70))
    sparse[rng.random(sparse.shape) < 0.01] = 1.5
    sparse[0] = 0.0
    assert_matches(sparse)
    equal = np.where(rng.random((3, 301, 7)) < 0.5, -0.37, 0.37)
    got = sp.entry_metrics(equal)
    np.testing.assert_array_equal(got["gini"], 0.0)  # every |x| equal: exactly 0
    np.testing.assert_allclose(got["hoyer_sparsity"], 0.0, atol=1e-15)
    one = np.zeros((2, 1, 1))
    one[1] = -4.0
    assert_matches(one)  # n = 1 -> 0


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320, 1e150, 1e-150, 2.0**300, 2.0**-300])
def test_extreme_magnitudes(scale):
    rng = np.random.default_rng(5)
    M = rng.standard_normal((3, 20, 15)) * scale
    assert_matches(M)
    mixed = rng.standard_normal((2, 9, 11))
    mixed[0] *= scale  # rows of a batch scaled differently
    mixed[1, 0, 0] = scale  # one huge / tiny entry among ordinary ones
    assert_matches(mixed)


def test_largest_doubles():
    M = np.full((4, 5), 3.5e307)  # row sums still finite; their squares would overflow unscaled
    M[0, :3] = -1e307
    M[1, 1] = 5e-324
    assert_matches(M)


def test_many_chunks(monkeypatch):
    """Chunked sums and rank weights (full chunks, a short last one, cached and fresh weights) vs the reference."""
    rng = np.random.default_rng(6)
    M = rng.standard_normal((2, 70, 53))
    for chunk in (7, 1000, 1024):
        monkeypatch.setattr(sp, "_CHUNK", chunk)
        monkeypatch.setattr(sp, "_CACHED_WEIGHTS", 500)
        sp._remembered_rank_weights.cache_clear()
        assert_matches(M)
        assert_matches(M.astype(np.float32))
        assert_matches(np.abs(float32_update(rng, (3, 41, 37), exact=True)))
    sp._remembered_rank_weights.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_sums_match_numpy_sums(dtype):
    """The torch path (what runs off the CPU) gives the same sums as the numpy one, scaled or not."""
    rng = np.random.default_rng(7)
    for scale in (1.0, 1e-300, 1e300):
        if dtype == torch.float32 and scale != 1.0:
            continue
        x = torch.from_numpy(np.sort(np.abs(rng.standard_normal((3, 5000))) * scale, axis=-1)).to(dtype)
        for ranked in (True, False):
            want = sp._sums_numpy(x.numpy(), ranked)
            got = sp._sums_torch(x, ranked)
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_rank_weights_are_the_centred_integers():
    w = sp._rank_weights(5, torch.device("cpu"))
    np.testing.assert_array_equal(w.numpy(), [-4, -2, 0, 2, 4])
    assert sp._rank_weights(sp._CACHED_WEIGHTS + 1, torch.device("cpu")).sum() == 0


def test_non_finite_refused_and_input_untouched():
    M = np.ones((3, 4))
    M[1, 2] = np.nan
    with pytest.raises(NonFiniteError):
        sp.entry_metrics(M)
    M[1, 2] = np.inf
    with pytest.raises(NonFiniteError):
        dynamics.gini(M.astype(np.float32))
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((2, 30, 20)))
    before = x.clone()
    sp.entry_metrics(x)
    assert torch.equal(x, before)  # only the module's own |M| is sorted in place
