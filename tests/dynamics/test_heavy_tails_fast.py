"""The vectorised power-law fit (``heavy_tails._fit_sorted``) against a plain per-candidate loop.

The reference below is the original implementation: one Python iteration per
candidate ``xmin``. The vectorised fit must pick the same ``xmin`` (the first
candidate with the smallest KS distance) and give bit-identical ``alpha`` and
``ks`` (compared with ``==``, no tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest

from dynamics import heavy_tails
from dynamics.heavy_tails import KS_CRITICAL, PowerLawFit, _fit_sorted, esd_power_law, fit_power_law
from dynamics.spectra import spectrum


def _reference_fit(x: np.ndarray, min_tail: int) -> PowerLawFit:
    """Per-candidate loop over xmin: ascending positive float64 ``x`` (n,)."""
    n = x.size
    if n < min_tail:
        return PowerLawFit("too_few", n=n)
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]
    first = np.flatnonzero(np.r_[True, x[1:] > x[:-1]])
    first = first[n - first >= min_tail]
    best: tuple[float, int, float] | None = None  # (D, i, alpha)
    for i in first:
        m = n - i
        spread = suffix[i] - m * logs[i]
        if spread <= 0:
            continue
        alpha = 1.0 + m / spread
        cdf = 1.0 - np.exp((1.0 - alpha) * (logs[i:] - logs[i]))
        j = np.arange(m, dtype=np.float64)
        d = float(max(np.max((j + 1) / m - cdf), np.max(cdf - j / m)))
        if best is None or d < best[0]:
            best = (d, int(i), alpha)
    if best is None:
        return PowerLawFit("degenerate", n=n)
    d, start, alpha = best
    n_tail = n - start
    status = "ok" if d <= KS_CRITICAL / np.sqrt(n_tail) else "poor_fit"
    return PowerLawFit(
        status,
        alpha=float(alpha),
        xmin=float(x[start]),
        ks=d,
        n_tail=int(n_tail),
        n=n,
        alpha_se=float((alpha - 1.0) / np.sqrt(n_tail)),
    )


def _assert_same(x: np.ndarray, min_tail: int = 10) -> PowerLawFit:
    """Both fits of the sorted positive samples agree exactly; returns the new one."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    new, ref = _fit_sorted(x, min_tail), _reference_fit(x, min_tail)
    assert new == ref, (new, ref)  # dataclass equality: every field, floats compared with ==
    return new


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [10, 11, 12, 40, 300])
def test_pareto_samples(seed: int, n: int) -> None:
    a = 1.5 + seed * 0.4
    _assert_same((1 - _rng(seed).random(n)) ** (-1 / (a - 1)))


@pytest.mark.parametrize("seed", range(4))
def test_lognormal_samples(seed: int) -> None:
    _assert_same(_rng(100 + seed).lognormal(0.0, 1.0 + seed, size=500))


@pytest.mark.parametrize("seed", range(4))
def test_many_ties(seed: int) -> None:
    rng = _rng(200 + seed)
    x = rng.integers(1, 6 + 4 * seed, size=400).astype(np.float64)  # few distinct values, long runs
    fit = _assert_same(x)
    if fit.fitted:
        assert fit.xmin is not None and fit.xmin in x


def test_ties_in_heavy_tail() -> None:
    x = np.round((1 - _rng(7).random(800)) ** (-1 / 1.5), 1)  # Pareto rounded to 0.1: ties everywhere
    _assert_same(x)


@pytest.mark.parametrize("min_tail", [2, 5, 10, 25])
def test_n_near_min_tail(min_tail: int) -> None:
    rng = _rng(min_tail)
    for n in (min_tail - 1, min_tail, min_tail + 1, min_tail + 3):
        if n >= 1:
            _assert_same(rng.pareto(2.0, size=n) + 1.0, min_tail)


def test_n_2000() -> None:
    _assert_same((1 - _rng(11).random(2000)) ** (-1 / 1.2))


@pytest.mark.parametrize(("rows", "cols"), [(64, 32), (96, 96), (384, 96), (200, 700)])
def test_random_matrix_spectra(rows: int, cols: int) -> None:
    rng = _rng(rows * cols)
    sigma = np.linalg.svd(rng.standard_normal((rows, cols)), compute_uv=False)
    _assert_same(sigma**2)
    heavy = rng.standard_t(2.5, size=(rows, cols))  # heavy-tailed entries: a heavier ESD tail
    _assert_same(np.linalg.svd(heavy, compute_uv=False) ** 2)


def test_esd_and_fit_power_law_agree_with_reference() -> None:
    rng = _rng(5)
    M = rng.standard_normal((120, 80)) @ np.diag(np.linspace(0.1, 3.0, 80) ** 2)
    spec = spectrum(M)
    fit = esd_power_law(spec)
    sigma = np.asarray(spec.values, dtype=np.float64)
    sigma = sigma[sigma > float(spec.default_tol())]
    assert fit.fitted and fit == _reference_fit(np.sort(sigma**2), 10)
    x = rng.lognormal(size=300)
    assert fit_power_law(x) == _reference_fit(np.sort(x), 10)


@pytest.mark.parametrize("n", [10, 50, 1000])
def test_all_equal(n: int) -> None:
    # ln 1 = 0: every spread is exactly 0, so every candidate is skipped
    fit = _assert_same(np.ones(n))
    assert fit.status == "degenerate" and fit.alpha is None
    # other equal values: the spread Σ ln x − m·ln x may round to a tiny nonzero value; both fits must agree
    for value in (3.25, 0.1, 7e5):
        _assert_same(np.full(n, value))


def test_only_last_values_differ() -> None:
    # distinct values only in the last few samples: every candidate either has no spread or too short a tail
    x = np.r_[np.full(30, 2.0), [5.0, 7.0]]
    fit = _assert_same(x)
    assert fit.status in {"degenerate", "ok", "poor_fit"}


def test_values_near_one() -> None:
    # ln x near 0 and spreads that round to <= 0 for some candidates
    x = 1.0 + np.arange(60) * np.finfo(np.float64).eps
    _assert_same(x)
    _assert_same(1.0 + _rng(3).random(200) * 1e-12)


def test_blocks_smaller_than_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    # force many small blocks (including one-row blocks, when a tail is longer than the block)
    x = (1 - _rng(13).random(700)) ** (-1 / 1.7)
    for elements in (1, 100, 997, 5000):
        monkeypatch.setattr(heavy_tails, "_BLOCK_ELEMENTS", elements)
        _assert_same(x)
        _assert_same(np.round(x, 1))


@pytest.mark.parametrize(
    "x",
    [[1.0, 1.0, 4.0, 5.0], [2.0, 2.0, 8.0, 16.0], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0]],
)
def test_first_minimum_wins_on_exact_ties(x: list[float]) -> None:
    # every candidate of these (found by search) has KS distance exactly 0.5: the first one must win
    fit = _assert_same(np.array(x), 2)
    assert fit.ks == 0.5 and fit.xmin == x[0] and fit.n_tail == len(x)


def test_large_n_in_bounded_blocks() -> None:
    # n = 20000: every tail is longer than a block is wide enough for many rows; min_tail keeps the run short
    x = np.sort((1 - _rng(17).random(20000)) ** (-1 / 1.5))
    fit = _assert_same(x, 19000)
    assert fit.fitted and fit.n_tail >= 19000
