"""Heavy-tailed spectra: the power-law exponent of a matrix's empirical spectral density.

The empirical spectral density (ESD) of ``M`` (m×n) is the distribution of the
eigenvalues ``λ_i = σ_i²`` of ``MᵀM`` (the scale, e.g. ``/n``, does not change
the exponent). Its upper tail is fitted by a continuous power law
``p(λ) ∝ λ^(−α)`` for ``λ ≥ λ_min`` following Clauset, Shalizi & Newman (2009):

* for a given ``λ_min`` the maximum-likelihood exponent is
  ``α = 1 + n_tail / Σ_{λ_i ≥ λ_min} ln(λ_i / λ_min)`` (natural log), standard
  error ``(α − 1) / sqrt(n_tail)``;
* ``λ_min`` is the observed value that minimises the Kolmogorov–Smirnov
  distance ``D = max |S(λ) − P(λ)|`` between the tail's empirical CDF ``S`` and
  the fitted one ``P(λ) = 1 − (λ/λ_min)^(1−α)``, over candidates leaving at
  least ``min_tail`` eigenvalues in the tail.

A fit always carries a :attr:`PowerLawFit.status`; only ``"ok"`` and
``"poor_fit"`` carry numbers (``alpha`` is ``None`` otherwise, never NaN):

============== ==== ===========================================================
status         code meaning
============== ==== ===========================================================
``ok``         0    fitted; ``D <= 1.36 / sqrt(n_tail)``
``poor_fit``   1    fitted, but ``D`` exceeds that (the tail is not a power law)
``too_few``    2    fewer than ``min_tail`` eigenvalues above the rank tolerance
``degenerate`` 3    every candidate tail has equal values (no spread to fit)
============== ==== ===========================================================

``1.36 / sqrt(n_tail)`` is the 5 % critical value of the KS test for a fully
specified law; with fitted parameters the distance is smaller, so this check is
lenient: it flags clearly non-power-law tails, it does not prove a power law
(Clauset et al.'s bootstrap p-value does that and costs hundreds of refits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .spectra import Spectrum, spectrum
from .validation import DynamicsError, NonFiniteError, ShapeError, as_tensor, check_positive_int

__all__ = ["PowerLawFit", "FIT_STATUS", "fit_power_law", "esd_power_law"]

#: Status name → numeric code (the ``alpha_status`` metric of ``dynamics analyze``).
FIT_STATUS = {"ok": 0, "poor_fit": 1, "too_few": 2, "degenerate": 3}

#: Asymptotic 5 % Kolmogorov–Smirnov critical value times sqrt(n).
KS_CRITICAL = 1.36


@dataclass(frozen=True)
class PowerLawFit:
    """Result of a power-law tail fit.

    Attributes
    ----------
    status : str
        One of :data:`FIT_STATUS`; numbers below are ``None`` unless it is
        ``"ok"`` or ``"poor_fit"``.
    alpha : float or None
        Exponent of the density ``p(x) ∝ x^(−α)`` (> 1).
    xmin : float or None
        Lower cutoff of the tail, in the units of the samples (σ² for an ESD).
    ks : float or None
        Kolmogorov–Smirnov distance of the tail from the fitted law, in [0, 1].
    n_tail : int
        Samples at or above ``xmin`` (0 when not fitted).
    n : int
        Positive samples considered.
    alpha_se : float or None
        Standard error ``(α − 1) / sqrt(n_tail)``.
    """

    status: str
    alpha: float | None = None
    xmin: float | None = None
    ks: float | None = None
    n_tail: int = 0
    n: int = 0
    alpha_se: float | None = None

    @property
    def fitted(self) -> bool:
        """True when the fit produced numbers (status ``ok`` or ``poor_fit``)."""
        return self.alpha is not None

    def metrics(self) -> dict[str, float]:
        """Table rows: ``alpha_status`` (code) always; ``alpha``, ``alpha_ks``, ``alpha_xmin``, ``alpha_n_tail`` when fitted."""
        out = {"alpha_status": float(FIT_STATUS[self.status])}
        alpha, ks, xmin = self.alpha, self.ks, self.xmin
        if alpha is not None and ks is not None and xmin is not None:  # fitted: all three are set together
            out.update(alpha=alpha, alpha_ks=ks, alpha_xmin=xmin, alpha_n_tail=float(self.n_tail))
        return out


#: Most float64 elements in one (candidates × tail positions) block of :func:`_ks_distances`:
#: 2**15 elements = 256 KiB per temporary (three live at once, so a block stays in a core's L2
#: cache); a single tail longer than this still gets a one-row block.
_BLOCK_ELEMENTS = 1 << 15


def _ks_distances(logs: np.ndarray, starts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """KS distance of each candidate tail from its fitted power law.

    Parameters
    ----------
    logs : np.ndarray
        ``ln x`` of the ascending samples, float64 (n,).
    starts : np.ndarray
        Candidate tail starts, ascending int64 (c,), each in ``[0, n)``.
    alpha : np.ndarray
        The fitted exponent of each candidate tail, float64 (c,), ``> 1``.

    Returns
    -------
    np.ndarray
        float64 (c,): ``D = max_k max((k+1)/m − P_k, P_k − k/m)`` over the tail
        positions ``k = 0..m−1`` (``m = n − start``), where
        ``P_k = 1 − exp((1 − α)(ln x_{start+k} − ln x_start))``.

    Notes
    -----
    Candidates are processed in blocks of rows, one row per candidate and one
    column per tail offset ``k`` (width: the longest tail in the block), so the
    work is about ``c·n`` elementwise operations in a few NumPy calls per block
    instead of a few per candidate. Columns ``k ≥ m`` past a row's tail read NaN
    padding and are skipped by the NaN-ignoring ``np.fmax`` reductions. Each
    element is computed with exactly the arithmetic of a per-candidate loop
    (the same roundings in the same order), so the distances are bit-identical
    to it; a non-finite ``α`` gives NaN, as such a loop would.
    """
    n = logs.size
    m = n - starts  # (c,) tail lengths, descending
    m_f = m.astype(np.float64)
    slope = 1.0 - alpha
    # NaN past the end: a row of the sliding window may run past its tail; those columns become NaN
    padded = np.concatenate([logs, np.full(n, np.nan)])
    out = np.empty(starts.size, dtype=np.float64)
    c0 = 0
    while c0 < starts.size:
        width = int(m[c0])  # the longest tail in this block
        c1 = min(starts.size, c0 + max(1, _BLOCK_ELEMENTS // (width + 1)))
        rows = slice(c0, c1)
        # cdf[r, k] = 1 − exp((1 − α_r)(ln x_{s_r+k} − ln x_{s_r})): the fitted CDF at the tail's points
        cdf = np.lib.stride_tricks.sliding_window_view(padded, width)[starts[rows]]  # (b, width)
        cdf -= logs[starts[rows], None]
        cdf *= slope[rows, None]
        np.exp(cdf, out=cdf)
        np.subtract(1.0, cdf, out=cdf)
        # empirical CDF steps j/m: just before point k it is k/m, just after it (k+1)/m
        steps = np.divide(np.arange(width + 1, dtype=np.float64), m_f[rows, None])  # (b, width + 1)
        above = np.subtract(steps[:, 1:], cdf)  # S just after each point minus P
        below = np.subtract(cdf, steps[:, :-1], out=cdf)  # P minus S just before each point
        out[rows] = np.fmax(np.fmax.reduce(above, axis=1), np.fmax.reduce(below, axis=1))
        c0 = c1
    out[~np.isfinite(alpha)] = np.nan  # the NaN at k = 0 (∞ · 0) that fmax would have skipped
    return out


def _fit_sorted(x: np.ndarray, min_tail: int) -> PowerLawFit:
    """CSN fit of ascending positive float64 samples ``x`` (n,).

    Every candidate ``xmin`` (the first index of each distinct value leaving at
    least ``min_tail`` samples) is scored at once by :func:`_ks_distances`; the
    first candidate with the smallest distance wins. Cost ``O(c·n)`` for ``c``
    candidates, done in blocks of at most :data:`_BLOCK_ELEMENTS` elements.
    """
    n = x.size
    if n < min_tail:
        return PowerLawFit("too_few", n=n)
    logs = np.log(x)
    # suffix sums of ln x: tail i..n-1 has sum_log[i]
    suffix = np.cumsum(logs[::-1])[::-1]
    # candidates: the first index of each distinct value with at least min_tail samples from it on
    first = np.flatnonzero(np.r_[True, x[1:] > x[:-1]])
    first = first[n - first >= min_tail]
    m = n - first
    spread = suffix[first] - m * logs[first]  # Σ ln(x_j / xmin) per candidate
    keep = spread > 0  # a tail without spread (rounding to <= 0) has no finite exponent: skipped
    if not np.any(keep):
        return PowerLawFit("degenerate", n=n)
    first, m, spread = first[keep], m[keep], spread[keep]
    alphas = 1.0 + m / spread
    d_all = _ks_distances(logs, first, alphas)
    # first minimum, as a scan with strict "<" would take; a NaN distance (not expected) never wins
    # unless it comes first, which is what such a scan does too
    best = 0 if np.isnan(d_all[0]) else int(np.argmin(np.where(np.isnan(d_all), np.inf, d_all)))
    d, start, alpha = float(d_all[best]), int(first[best]), float(alphas[best])
    n_tail = n - start
    status = "ok" if d <= KS_CRITICAL / np.sqrt(n_tail) else "poor_fit"
    return PowerLawFit(
        status,
        alpha=alpha,
        xmin=float(x[start]),
        ks=d,
        n_tail=int(n_tail),
        n=n,
        alpha_se=float((alpha - 1.0) / np.sqrt(n_tail)),
    )


def fit_power_law(samples: Any, *, min_tail: int = 10) -> PowerLawFit:
    """Fit a power-law tail to positive samples (Clauset, Shalizi & Newman 2009).

    Parameters
    ----------
    samples
        1-D array-like of real numbers (e.g. eigenvalues). Values ``<= 0`` are
        left out (a power law lives on x > 0); NaN/Inf raise.
    min_tail
        Smallest number of samples allowed in the fitted tail (default 10).

    Returns
    -------
    PowerLawFit
        With ``status`` (see the module docstring); ``alpha`` is ``None`` unless fitted.

    Examples
    --------
    >>> import numpy as np
    >>> x = (1 - np.random.default_rng(0).random(5000)) ** (-1 / 1.5)   # Pareto, alpha = 2.5
    >>> fit = fit_power_law(x)
    >>> fit.status, round(fit.alpha, 1)
    ('ok', 2.5)
    """
    caller = "fit_power_law"
    min_tail = check_positive_int(min_tail, name="min_tail", caller=caller, minimum=2)
    x = as_tensor(samples, name="samples", caller=caller).detach().cpu().double().numpy()
    if x.ndim != 1:
        raise ShapeError(
            f"{caller}(): argument `samples` must be 1-D, got shape {x.shape}; for a matrix use esd_power_law(M)"
        )
    if not np.all(np.isfinite(x)):
        raise NonFiniteError(f"{caller}(): argument `samples` contains NaN or Inf")
    return _fit_sorted(np.sort(x[x > 0]), min_tail)


def esd_power_law(M: Any, *, min_tail: int = 10) -> PowerLawFit:
    """Power-law exponent of the ESD of ``M``: a :func:`fit_power_law` of ``λ_i = σ_i²``.

    Parameters
    ----------
    M
        One matrix ``(m, n)`` (numpy / torch, any real dtype) or a single-matrix
        :class:`~dynamics.Spectrum` (reused: no new SVD).
    min_tail
        Smallest tail (default 10); a matrix with fewer eigenvalues above the
        rank tolerance (``σ > σ₁·max(m, n)·eps``) gets status ``too_few``.

    Returns
    -------
    PowerLawFit
        ``xmin`` is in units of σ².
    """
    caller = "esd_power_law"
    spec = M if isinstance(M, Spectrum) else spectrum(M, name="M", caller=caller)
    if spec.batch_shape:
        raise ShapeError(
            f"{caller}(): expects one matrix, got a batch of shape {spec.batch_shape}; loop over the batch (spec[i])"
        )
    if spec.values[0] == 0:
        return PowerLawFit("too_few", n=0)
    tol = float(spec.default_tol())
    sigma = spec.values[spec.values > tol]
    if not np.all(np.isfinite(sigma)):  # pragma: no cover - Spectrum already guarantees this
        raise DynamicsError(f"{caller}(): non-finite singular values")
    return fit_power_law(np.sort(sigma**2), min_tail=min_tail)
