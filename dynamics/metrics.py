"""Spectrum -> scalar metrics, and the public one-call wrappers.

Notation: a matrix ``M`` of shape ``(m, n)`` has singular values
``s_1 >= ... >= s_k >= 0`` with ``k = min(m, n)``.  Logarithms are natural.

=============================  ==========================================  ==============================
metric                         definition                                  range / convention
=============================  ==========================================  ==============================
effective rank (Roy-Vetterli)  ``exp(H(p))``, ``p_i = s_i / sum(s)``,       ``[1, rank]``; zero matrix -> 0
                               ``H(p) = -sum p_i ln p_i``, ``0 ln 0 = 0``
proportional effective rank    ``effective_rank / k``                      ``(0, 1]``; zero matrix -> 0
stable rank                    ``sum(s**2) / s_1**2``                      ``[1, rank]``; zero matrix -> 0
numerical rank                 ``#{s_i > tol}``, default                   ``[0, k]`` (an int)
                               ``tol = s_1 * max(m, n) * eps(input dtype)``
condition number               ``s_1 / s_k``                               ``[1, inf]``; ``inf`` when
                                                                           ``s_k = 0`` (zero matrix too)
truncated condition number     ``s_1 / s_r``, ``r`` = numerical rank       ``[1, inf)``; ``inf`` when r = 0
spectral entropy               ``H(p) / ln k`` (same ``p`` as effective    ``[0, 1]``; 0 when k = 1 or for
                               rank; = ``ln(erank) / ln k``)               the zero matrix
participation ratio            ``(sum s**2)**2 / sum s**4`` (eigenvalue    ``[1, rank]``; zero matrix -> 0
                               participation ratio of ``M^T M``)
top-k energy                   ``sum_{i<=k} s_i**2 / sum s**2``            ``[0, 1]``; zero matrix -> 0
tail energy                    ``sum_{i>k} s_i**2 / sum s**2``             ``[0, 1]``; zero matrix -> 0
spectral norm                  ``s_1`` (operator 2-norm; = ``sigma_max``)  ``[0, inf)``
Frobenius norm                 ``sqrt(sum s**2)``                          ``[0, inf)``; = root sum of
                                                                           squared entries
nuclear norm                   ``sum s`` (trace norm)                      ``[0, inf)``
=============================  ==========================================  ==============================

"Spectral entropy" here is the *normalised Shannon entropy of p = s / sum(s)*;
it is not the effective rank (its exponential, unnormalised) and not the
"matrix entropy" some tools compute from ``s**2`` (not offered, to avoid the
ambiguity).

Inequalities that hold for every matrix (proved, and checked by property
tests in ``tests/dynamics/test_metric_properties.py``), with ``rank`` the exact
number of non-zero singular values::

    1 <= stable_rank <= sum(s)/s_1 <= (sum s)**2 / sum(s**2) <= effective_rank <= rank <= k
    1 <= participation_ratio <= rank
    numerical_rank(tol) <= rank;  numerical_rank(tol=0) == rank
    1 <= truncated_condition_number <= condition_number

(stable rank <= sum(s)/s_1 because (s_i/s_1)**2 <= s_i/s_1; the next two steps
are the Renyi-entropy ordering H_inf <= H_2 <= H_1.)  What does **not** hold:
``effective_rank <= numerical_rank(tol)`` and ``stable_rank <= numerical_rank(tol)``
for a positive ``tol``: singular values just below ``tol`` are not counted by
the numerical rank but still add to the effective and stable ranks (e.g.
``s = (1, 0.9 x 100)`` with ``tol = 0.95`` has numerical rank 1, stable rank 82).
The bound that does hold is ``stable_rank <= r + (k - r) * (tol / s_1)**2``.

Metrics of a matrix's *entries* rather than its singular values (Gini
coefficient, Hoyer sparsity, induced ∞-norm) are in :mod:`dynamics.sparsity`.

Every wrapper accepts either a matrix / batch (numpy or torch; computed with a
single singular-value computation, see :func:`dynamics.spectrum`) or an
already computed :class:`dynamics.Spectrum`.  A single matrix gives a Python
``float`` (``int`` for the numerical rank), a batch ``(..., m, n)`` a numpy
array of the batch shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ._kernels import Result
from .spectra import Spectrum, spectrum

__all__ = [
    "effective_rank",
    "proportional_effective_rank",
    "stable_rank",
    "numerical_rank",
    "condition_number",
    "truncated_condition_number",
    "spectral_entropy",
    "participation_ratio",
    "top_k_energy",
    "tail_energy",
    "spectrum_metrics",
]

# The kernels behind these wrappers (functions of a descending ``values`` array) are in dynamics._kernels;
# Spectrum's methods call them, so a Spectrum computed once serves every metric.


# --------------------------------------------------------------------------- wrappers


def _as_spectrum(M: Any, *, method: str, caller: str) -> Spectrum:
    """``M`` itself if it is a :class:`Spectrum`, else its spectrum by ``method``."""
    if isinstance(M, Spectrum):
        return M
    return spectrum(M, method=method, name="M", caller=caller)


_M_DOC = """M
        A matrix ``(m, n)`` or batch ``(..., m, n)`` (numpy array or torch
        tensor, any real dtype), or a :class:`dynamics.Spectrum`.
    method
        Singular-value route, ``'auto'`` | ``'direct'`` | ``'gram'`` (see
        :func:`dynamics.spectrum`); ignored when ``M`` is a Spectrum."""


def effective_rank(M: Any, *, method: str = "auto") -> Result:
    """Effective rank (Roy & Vetterli 2007): ``exp(-sum p_i ln p_i)``, ``p = s/sum(s)``.

    Natural log; ``0 ln 0 = 0``.  In ``[1, rank(M)]``; the all-zero matrix gives 0.

    Parameters
    ----------
    {M}

    Returns
    -------
    float or numpy.ndarray
        float for one matrix, float64 array of the batch shape for a batch.

    Examples
    --------
    >>> import numpy as np, dynamics
    >>> dynamics.effective_rank(np.eye(4))
    4.0
    """
    return _as_spectrum(M, method=method, caller="effective_rank").effective_rank()


def proportional_effective_rank(M: Any, *, method: str = "auto") -> Result:
    """Proportional effective rank (PER): effective rank / ``min(m, n)``.

    In ``(0, 1]``; the zero matrix gives 0.

    Parameters
    ----------
    {M}
    """
    return _as_spectrum(M, method=method, caller="proportional_effective_rank").proportional_effective_rank()


def stable_rank(M: Any, *, method: str = "auto") -> Result:
    """Stable rank ``||M||_F**2 / ||M||_2**2 = sum(s**2) / s_1**2``.

    In ``[1, rank(M)]``; the zero matrix gives 0.

    Parameters
    ----------
    {M}
    """
    return _as_spectrum(M, method=method, caller="stable_rank").stable_rank()


def numerical_rank(M: Any, *, tol: Any = None, rtol: Any = None, method: str = "auto") -> int | np.ndarray:
    """Numerical rank ``#{{s_i > tol}}``.

    Parameters
    ----------
    {M}
    tol
        Absolute tolerance (scalar, or an array of the batch shape).  Default
        ``s_1 * max(m, n) * eps`` with ``eps`` of the *original* input dtype
        (so a bfloat16 matrix uses bfloat16's eps, although its SVD runs in
        float64).  Note that for low-precision dtypes and large matrices this
        default can exceed ``s_1`` (rank 0): that is the formula, not a bug.
    rtol
        Relative tolerance: ``tol = rtol * s_1``.  At most one of tol/rtol.

    Returns
    -------
    int or numpy.ndarray
        ``int`` for one matrix, int64 array of the batch shape for a batch.
    """
    return _as_spectrum(M, method=method, caller="numerical_rank").numerical_rank(tol=tol, rtol=rtol)


def condition_number(M: Any, *, log10: bool = False, method: str = "auto") -> Result:
    """Condition number ``s_1 / s_k`` (``k = min(m, n)``), or its log10.

    ``inf`` when ``s_k = 0`` (including the zero matrix); never NaN.  In auto
    mode the value never comes from an inaccurate Gram route (see
    :func:`dynamics.spectrum`).

    Parameters
    ----------
    {M}
    log10
        Return ``log10(s_1 / s_k)`` instead (``inf`` stays ``inf``).
    """
    return _as_spectrum(M, method=method, caller="condition_number").condition_number(log10=log10)


def truncated_condition_number(
    M: Any,
    *,
    tol: Any = None,
    rtol: Any = None,
    log10: bool = False,
    method: str = "auto",
) -> Result:
    """Condition number over the singular values above the rank tolerance.

    ``s_1 / s_r`` with ``r = numerical_rank(M, tol=tol)``; finite unless
    ``r = 0`` (then ``inf``).  Always ``<= condition_number(M)``.

    Parameters
    ----------
    {M}
    tol, rtol
        As for :func:`numerical_rank`.
    log10
        Return the log10 of the value.
    """
    return _as_spectrum(M, method=method, caller="truncated_condition_number").truncated_condition_number(
        tol=tol, rtol=rtol, log10=log10
    )


def spectral_entropy(M: Any, *, method: str = "auto") -> Result:
    """Normalised spectral entropy ``H(p) / ln k``, ``p = s / sum(s)``, ``k = min(m, n)``.

    In ``[0, 1]``: 1 for a flat spectrum, 0 for rank one.  Defined as 0 when
    ``k = 1`` (``ln 1 = 0``) and for the zero matrix.  Equal to
    ``ln(effective_rank) / ln k``; a different quantity from the effective
    rank and from the ``s**2``-based "matrix entropy".

    Parameters
    ----------
    {M}
    """
    return _as_spectrum(M, method=method, caller="spectral_entropy").spectral_entropy()


def participation_ratio(M: Any, *, method: str = "auto") -> Result:
    """Participation ratio ``(sum s**2)**2 / sum s**4`` of the eigenvalues ``s**2``.

    In ``[1, rank(M)]``; the zero matrix gives 0.  For centred activations it is
    the participation ratio of the covariance eigenvalues.

    Parameters
    ----------
    {M}
    """
    return _as_spectrum(M, method=method, caller="participation_ratio").participation_ratio()


def top_k_energy(M: Any, k: int, *, method: str = "auto") -> Result:
    """Fraction of squared Frobenius norm in the ``k`` largest singular values.

    ``sum_{{i<=k}} s_i**2 / sum s**2`` in ``[0, 1]``; zero matrix -> 0.

    Parameters
    ----------
    {M}
    k
        Number of leading singular values (>= 1; values past ``min(m, n)`` give 1).
    """
    return _as_spectrum(M, method=method, caller="top_k_energy").top_k_energy(k)


def tail_energy(M: Any, k: int, *, method: str = "auto") -> Result:
    """Fraction of squared Frobenius norm outside the ``k`` largest singular values.

    ``sum_{{i>k}} s_i**2 / sum s**2`` (summed directly, not ``1 - top``, so small
    tails keep their relative precision); zero matrix -> 0.

    Parameters
    ----------
    {M}
    k
        Number of leading singular values excluded (>= 1).
    """
    return _as_spectrum(M, method=method, caller="tail_energy").tail_energy(k)


def spectrum_metrics(
    M: Any,
    *,
    tol: Any = None,
    rtol: Any = None,
    top_k: Iterable[int] = (1, 10),
    method: str = "auto",
) -> dict[str, Result]:
    """Every metric of ``M`` from one singular-value computation.

    Parameters
    ----------
    {M}
    tol, rtol
        Rank tolerance for ``numerical_rank`` and the truncated condition number.
    top_k
        ``k`` values for the ``top_{{k}}_energy`` entries.

    Returns
    -------
    dict
        Keys ``effective_rank``, ``proportional_effective_rank``,
        ``stable_rank``, ``numerical_rank``, ``condition_number``,
        ``log10_condition_number``, ``truncated_condition_number``,
        ``log10_truncated_condition_number``, ``spectral_entropy``,
        ``participation_ratio``, ``sigma_max``, ``sigma_min``,
        ``spectral_norm`` (= ``sigma_max``), ``frobenius_norm``,
        ``nuclear_norm``, and ``top_{{k}}_energy`` per ``k``; values are floats (ints for the rank)
        for one matrix, arrays of the batch shape for a batch.

    Examples
    --------
    >>> import numpy as np, dynamics
    >>> m = dynamics.spectrum_metrics(np.diag([3.0, 1.0]))
    >>> m["condition_number"], m["numerical_rank"]
    (3.0, 2)
    """
    spec = _as_spectrum(M, method=method, caller="spectrum_metrics")
    return spec.metrics(tol=tol, rtol=rtol, top_k=top_k)


for _f in (
    effective_rank,
    proportional_effective_rank,
    stable_rank,
    numerical_rank,
    condition_number,
    truncated_condition_number,
    spectral_entropy,
    participation_ratio,
    top_k_energy,
    tail_energy,
    spectrum_metrics,
):
    if _f.__doc__:  # None under python -OO
        _f.__doc__ = _f.__doc__.replace("{M}", _M_DOC).replace("{{", "{").replace("}}", "}")
del _f
