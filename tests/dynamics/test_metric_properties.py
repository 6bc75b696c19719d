"""Property tests (hypothesis): invariances and the inequalities between metrics.

Established (proved in dynamics/metrics.py, checked here), rank = exact rank
(# non-zero computed singular values, = numerical_rank(tol=0)), k = min(m, n):

    1 <= stable_rank <= sum(s)/s_1 <= (sum s)^2/sum(s^2) <= effective_rank <= rank <= k
    1 <= participation_ratio <= rank
    numerical_rank(tol) <= rank, non-increasing in tol
    1 <= truncated_condition_number <= condition_number
    spectral_entropy == ln(effective_rank) / ln(k)
    stable_rank <= r + (k - r) * (tol / s_1)^2, r = numerical_rank(tol)

Falsified: effective_rank <= numerical_rank(tol) and stable_rank <=
numerical_rank(tol) for tol > 0 (explicit counterexamples below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import dynamics
from dynamics import Spectrum

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLACK = 1e-9  # relative rounding slack for float64 comparisons

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def matrices(draw, max_side=7):
    """Dense random, low-rank, and duplicated-spectrum matrices."""
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["dense", "lowrank", "diag"]))
    if kind == "dense":
        return draw(arrays(np.float64, (m, n), elements=finite))
    if kind == "lowrank":
        r = draw(st.integers(1, min(m, n)))
        a = draw(arrays(np.float64, (m, r), elements=finite))
        b = draw(arrays(np.float64, (r, n), elements=finite))
        return a @ b
    k = min(m, n)
    vals = draw(st.lists(st.sampled_from([0.0, 1e-6, 0.5, 1.0, 1.0, 3.0]), min_size=k, max_size=k))
    out = np.zeros((m, n))
    out[np.arange(k), np.arange(k)] = vals
    return out


@st.composite
def spectra_values(draw):
    """Arbitrary sorted non-negative singular values, including tiny and repeated ones."""
    k = draw(st.integers(1, 12))
    vals = draw(
        st.lists(
            st.one_of(st.floats(0, 1e3, allow_subnormal=False), st.sampled_from([0.0, 1e-12, 1.0])),
            min_size=k,
            max_size=k,
        )
    )
    extra = draw(st.integers(0, 3))
    return Spectrum(np.sort(vals)[::-1], (k + extra, k))


def orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


SCALE_INVARIANT = [
    "effective_rank",
    "proportional_effective_rank",
    "stable_rank",
    "spectral_entropy",
    "participation_ratio",
    "top_1_energy",
]


def close(a, b, rel=1e-7, abs_=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_) or (math.isinf(a) and math.isinf(b))


# --------------------------------------------------------------------------- inequalities


@SETTINGS
@given(spectra_values())
def test_rank_chain_on_arbitrary_spectra(s):
    v = s.values
    if v[0] == 0:
        assert s.effective_rank() == s.stable_rank() == 0.0
        return
    rank = s.numerical_rank(tol=0)
    sr, er = s.stable_rank(), s.effective_rank()
    t = v / v[0]  # normalised, so tiny or huge values do not under/overflow
    nuclear_ratio = t.sum()
    renyi2 = t.sum() ** 2 / (t**2).sum()
    assert 1.0 <= sr
    assert sr <= nuclear_ratio * (1 + SLACK)
    assert nuclear_ratio <= renyi2 * (1 + SLACK)
    assert renyi2 <= er * (1 + SLACK)
    assert er <= rank <= s.k
    assert 1.0 <= s.participation_ratio() <= rank
    assert 0.0 < s.proportional_effective_rank() <= 1.0


@SETTINGS
@given(matrices())
def test_rank_chain_on_matrices(M):
    s = dynamics.spectrum(M)
    assume(s.values[0] > 0)
    rank = s.numerical_rank(tol=0)
    assert 1.0 <= s.stable_rank() <= s.effective_rank() * (1 + SLACK)
    assert s.effective_rank() <= rank <= min(M.shape)
    assert s.numerical_rank() <= rank
    assert 1.0 <= s.truncated_condition_number() <= s.condition_number()
    k = min(M.shape)
    expected = 0.0 if k == 1 else math.log(s.effective_rank()) / math.log(k)
    assert s.spectral_entropy() == pytest.approx(expected, abs=1e-12)


@SETTINGS
@given(spectra_values(), st.floats(0, 2e3), st.floats(0, 2e3))
def test_numerical_rank_monotone_and_stable_rank_tail_bound(s, t1, t2):
    lo, hi = sorted((t1, t2))
    assert s.numerical_rank(tol=hi) <= s.numerical_rank(tol=lo) <= s.numerical_rank(tol=0)
    if s.values[0] > 0:
        r = s.numerical_rank(tol=hi)
        ratio = 1.0 if hi >= s.values[0] else hi / s.values[0]
        bound = r + (s.k - r) * ratio**2
        assert s.stable_rank() <= bound * (1 + SLACK)


def test_effective_and_stable_rank_can_exceed_numerical_rank():
    """Falsifies erank <= numerical_rank(tol) and srank <= numerical_rank(tol) for tol > 0."""
    s = Spectrum(np.array([1.0] + [0.9] * 100), (101, 101))
    assert s.numerical_rank(tol=0.95) == 1
    assert s.stable_rank() == pytest.approx(82.0)
    assert s.effective_rank() > 80
    # also with the *default* tolerance of a low-precision dtype:
    t = Spectrum(np.array([1.0] + [1e-3] * 1000), (1001, 1001), dtype="float16")
    assert t.numerical_rank() == 1 and t.effective_rank() > 10


# --------------------------------------------------------------------------- invariances


@SETTINGS
@given(matrices(), st.floats(1e-3, 1e3))
def test_scale_invariance(M, c):
    assume(np.all(np.abs(M[M != 0]) > 1e-100))  # c * M must not underflow entries
    a, b = dynamics.spectrum_metrics(M), dynamics.spectrum_metrics(c * M)
    for key in SCALE_INVARIANT:
        assert close(a[key], b[key]), key
    assert close(b["sigma_max"], c * a["sigma_max"], abs_=1e-9 * c)
    if a["condition_number"] < 1e8:  # well-conditioned: s_k is accurate
        assert close(a["condition_number"], b["condition_number"], rel=1e-6)


@SETTINGS
@given(matrices())
def test_transpose_invariance(M):
    a, b = dynamics.spectrum_metrics(M), dynamics.spectrum_metrics(M.T)
    for key in SCALE_INVARIANT + ["sigma_max"]:
        assert close(a[key], b[key]), key
    assert a["numerical_rank"] == b["numerical_rank"]


@SETTINGS
@given(matrices(), st.integers(0, 2**31))
def test_orthogonal_rotation_invariance(M, seed):
    m, n = M.shape
    R = orthogonal(m, seed) @ M @ orthogonal(n, seed + 1)
    a, b = dynamics.spectrum_metrics(M), dynamics.spectrum_metrics(R)
    for key in SCALE_INVARIANT + ["sigma_max"]:
        assert close(a[key], b[key], abs_=1e-7 * max(a["sigma_max"], 1.0)), key
    # the numerical rank is invariant unless a singular value sits at the tolerance
    s = dynamics.spectrum(M)
    tol = s.default_tol()
    assume(not np.any((s.values > tol / 1e3) & (s.values < tol * 1e3)))
    assert a["numerical_rank"] == b["numerical_rank"]


@SETTINGS
@given(matrices())
def test_direct_and_gram_routes_agree_on_metrics(M):
    d = dynamics.spectrum(M, method="direct")
    a = dynamics.spectrum(M, method="auto")
    for key in SCALE_INVARIANT:
        assert close(
            getattr(d, key)() if key != "top_1_energy" else d.top_k_energy(1),
            getattr(a, key)() if key != "top_1_energy" else a.top_k_energy(1),
        ), key
    assert d.numerical_rank() == a.numerical_rank()
