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


def _fit_sorted(x: np.ndarray, min_tail: int) -> PowerLawFit:
    """CSN fit of ascending positive float64 samples ``x`` (n,)."""
    n = x.size
    if n < min_tail:
        return PowerLawFit("too_few", n=n)
    logs = np.log(x)
    # suffix sums of ln x: tail i..n-1 has sum_log[i]
    suffix = np.cumsum(logs[::-1])[::-1]
    # candidates: the first index of each distinct value with at least min_tail samples from it on
    first = np.flatnonzero(np.r_[True, x[1:] > x[:-1]])
    first = first[n - first >= min_tail]
    best: tuple[float, int, float] | None = None  # (D, i, alpha)
    for i in first:
        m = n - i
        spread = suffix[i] - m * logs[i]  # Σ ln(x_j / xmin)
        if spread <= 0:
            continue
        alpha = 1.0 + m / spread
        cdf = 1.0 - np.exp((1.0 - alpha) * (logs[i:] - logs[i]))  # fitted CDF at the tail's points
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
