"""Entry-wise metrics of a matrix: Gini coefficient, Hoyer sparsity, induced ∞-norm.

These look at the entries of a matrix ``M`` (weights, gradients, updates), not
at its singular values; the spectral norms (Frobenius ``√Σσ²``, nuclear
``Σσ``, spectral ``σ₁``) are :class:`dynamics.Spectrum` metrics instead
(:meth:`~dynamics.Spectrum.frobenius_norm`, ...), computed from the spectrum
the analysis already has.

===================== ====================================================== ==========================================
metric                definition (``x`` = the ``n`` entries of ``M``)         range / convention
===================== ====================================================== ==========================================
Gini coefficient      ``Σᵢ (2i − n − 1) a₍ᵢ₎ / (n Σᵢ a₍ᵢ₎)`` over the         ``[0, (n−1)/n]``: 0 when every ``|x|`` is
(Hurley & Rickard     ``|x|`` sorted ascending, ``a₍₁₎ ≤ … ≤ a₍ₙ₎``            equal, ``(n−1)/n`` for one non-zero entry;
2009)                                                                        the zero matrix → 0 (no entry exceeds
                                                                             another); ``n = 1`` → 0
Hoyer sparsity        ``(√n − ‖x‖₁/‖x‖₂) / (√n − 1)``                        ``[0, 1]``: 0 when every ``|x|`` is equal,
(Hoyer 2004)                                                                 1 for one non-zero entry; the zero matrix
                                                                             → 0 and ``n = 1`` → 0 (both 0/0)
induced ∞-norm        ``‖M‖_∞ = maxᵢ Σⱼ |Mᵢⱼ|``, the largest absolute row    ``[0, ∞)``; for a PyTorch weight
                      sum: the operator norm of ``v ↦ M v`` from ``ℓ∞`` to    ``(out, in)`` a row is one output unit
                      ``ℓ∞``
===================== ====================================================== ==========================================

Both sparsity measures are scale invariant and treat the matrix as a flat
vector of its ``n = m·n_cols`` entries. The computation stays on the input's
device (a CUDA tensor stays on the GPU): ``|M|`` is taken exactly (float32
for float32 and narrower inputs, float64 otherwise) and every sum
accumulates in float64, in chunks of 2²⁰ entries scaled by the largest
``|Mᵢⱼ|`` (no overflow, bounded temporary memory). The cost is one ``abs``,
one sort (Gini; numpy's vectorised sort on CPU, ``torch.sort`` on CUDA) and
one pass of sums. NaN/Inf entries raise
:class:`~dynamics.validation.NonFiniteError`. A single matrix gives a
Python ``float``, a batch ``(..., m, n)`` a float64 numpy array of the batch
shape. Imports only numpy, torch and :mod:`dynamics`' maths core.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from ._kernels import Result, as_result
from .validation import as_matrix_batch

__all__ = ["gini", "hoyer_sparsity", "induced_inf_norm", "entry_metrics", "ENTRY_METRICS"]

#: the keys :func:`entry_metrics` returns (the metric names of the analysis table).
ENTRY_METRICS = ("gini", "hoyer_sparsity", "induced_inf_norm")


#: entries per chunk of the float64 sums (bounds the temporary memory, about 8 MiB per batch element).
_CHUNK = 1 << 20
_NARROW = (torch.float16, torch.bfloat16, torch.float32)


def _abs_entries(M: Any, caller: str) -> torch.Tensor:
    """``|M|`` (..., m, n) on ``M``'s device, validated (NaN/Inf refused).

    float32 when that holds every entry exactly (float32 and narrower inputs), float64
    otherwise; every sum below accumulates in float64.
    """
    x = as_matrix_batch(M, name="M", caller=caller, convert=False)
    return x.to(torch.float32 if x.dtype in _NARROW else torch.float64).abs()


def _sorted(flat: torch.Tensor) -> torch.Tensor:
    """The non-negative ``flat`` (B, n) sorted ascending along its last axis, on its device (on CPU in place:
    ``flat`` must be a temporary of the caller, such as :func:`_abs_entries`' result).

    On CPU numpy sorts (its vectorised sort was 10-30x faster than ``torch.sort`` on
    one CPU thread for 19M entries, torch 2.13); float64 values are sorted as their bit
    patterns read as int64, which order like non-negative IEEE doubles. On CUDA
    ``torch.sort``.
    """
    if flat.device.type != "cpu":
        return torch.sort(flat, dim=-1).values
    a = np.ascontiguousarray(flat.numpy())  # flat is |M|, a fresh array of this module: sorted in place, no copy
    (a.view(np.int64) if a.dtype == np.float64 else a).sort(axis=-1)
    return torch.from_numpy(a)


#: :func:`_rank_weights` remembers weight vectors of at most this many entries (512 KiB each, 8 of them).
_CACHED_WEIGHTS = 1 << 16


def _rank_weights(lo: int, hi: int, n: int, device: torch.device) -> torch.Tensor:
    """The Gini rank weights ``2i − n − 1`` for ``i = lo+1 .. hi`` (float64, exact integers); short ones (the many
    small matrices of a model) are remembered, long ones made afresh (their cost is small beside their sort)."""
    if hi - lo <= _CACHED_WEIGHTS:
        return _short_rank_weights(lo, hi, n, device)
    return torch.arange(2 * lo + 1 - n, 2 * hi + 1 - n, 2, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=8)
def _short_rank_weights(lo: int, hi: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(2 * lo + 1 - n, 2 * hi + 1 - n, 2, dtype=torch.float64, device=device)


def _sums(flat: torch.Tensor, ranked: bool) -> np.ndarray:
    """float64 ``[peak, Σy, Σy², Σ(2i−n−1)·y]`` per row of ``flat`` (B, n), ``y = flat / peak``: numpy (4, B).

    ``peak`` is the row maximum (the last entry when ``ranked``: ``flat`` sorted
    ascending); scaling by it keeps the squares in range. Summed in float64 in
    chunks of :data:`_CHUNK`; the rank weights ``2i − n − 1`` are integers (exact in
    float64) and antisymmetric about the middle, so equal entries cancel exactly.
    """
    n = flat.shape[-1]
    peak = flat[:, -1] if ranked else flat.amax(dim=-1)
    scale = torch.where(peak > 0, peak, 1.0).to(torch.float64)[:, None]
    parts = []
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        y = torch.div(flat[:, lo:hi], scale)  # float64 (promoted): the exact float64 of each entry, divided, one pass
        sums = [y.sum(dim=-1), torch.linalg.vecdot(y, y)]
        if ranked:  # weights 2i - n - 1 for i = lo+1 .. hi
            sums.append(y @ _rank_weights(lo, hi, n, flat.device))
        parts.append(torch.stack(sums))
    total = torch.stack(parts).sum(dim=0) if len(parts) > 1 else parts[0]
    out: np.ndarray = torch.cat([peak.to(torch.float64)[None], total]).to("cpu").numpy()
    return out


def _gini_hoyer(a: torch.Tensor, *, ranked: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gini (``ranked``; else zeros) and Hoyer sparsity of the non-negative ``a`` (..., m, n): float64, batch shape.
    With ``ranked`` on CPU ``a`` is sorted in place (:func:`_sorted`).

    Gini ``= Σ(2i−n−1)a₍ᵢ₎ / (n Σa)``; Hoyer ``= (√n − ‖a‖₁/‖a‖₂)/(√n − 1)``; both 0 for an
    all-zero matrix and for ``n = 1``; clipped to their ranges ``[0, (n−1)/n]`` and ``[0, 1]``
    (rounding only).
    """
    batch = a.shape[:-2]
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1])
    n = flat.shape[-1]
    stats = _sums(_sorted(flat) if ranked else flat, ranked)
    peak, l1, sq = stats[0], stats[1], stats[2]
    nonzero = peak > 0
    safe_l1 = np.where(nonzero, l1, 1.0)
    gini = np.where(nonzero, stats[3] / (n * safe_l1), 0.0) if ranked else np.zeros_like(l1)
    gini = np.clip(gini, 0.0, (n - 1) / n)
    if n == 1:
        hoyer = np.zeros_like(l1)
    else:
        root = math.sqrt(n)
        ratio = l1 / np.sqrt(np.where(nonzero, sq, 1.0))
        hoyer = np.where(nonzero, np.clip((root - ratio) / (root - 1.0), 0.0, 1.0), 0.0)
    return gini.reshape(batch), hoyer.reshape(batch)


def _inf_norm(a: torch.Tensor) -> np.ndarray:
    """Largest row sum of the non-negative ``a`` (..., m, n), summed in float64: numpy of the batch shape."""
    out: np.ndarray = a.sum(dim=-1, dtype=torch.float64).amax(dim=-1).to("cpu").numpy()
    return out


def gini(M: Any) -> Result:
    """Gini coefficient of the absolute entries of ``M`` (Hurley & Rickard 2009, "Comparing measures of sparsity").

    ``G = Σᵢ (2i − n − 1) a₍ᵢ₎ / (n Σᵢ a₍ᵢ₎)`` with ``a₍₁₎ ≤ … ≤ a₍ₙ₎`` the
    ``n`` values ``|Mᵢⱼ|`` sorted ascending (the whole matrix as one vector).

    Parameters
    ----------
    M
        Matrix ``(m, n)`` or batch ``(..., m, n)``, numpy or torch, any real
        dtype; computed in float64 on its device.

    Returns
    -------
    float or numpy.ndarray
        In ``[0, (n−1)/n]``: 0 when all ``|Mᵢⱼ|`` are equal, ``(n−1)/n`` when
        one entry is non-zero; scale invariant. The all-zero matrix gives 0
        (its entries are all equal) and so does a single entry.

    Raises
    ------
    NonFiniteError
        ``M`` holds NaN or Inf.

    Examples
    --------
    >>> import numpy as np, dynamics
    >>> dynamics.gini(np.ones((3, 4))), round(dynamics.gini(np.eye(1, 4)), 6)
    (0.0, 0.75)
    """
    return as_result(_gini_hoyer(_abs_entries(M, "gini"), ranked=True)[0])


def hoyer_sparsity(M: Any) -> Result:
    """Hoyer sparsity of the entries of ``M`` (Hoyer 2004, "Non-negative matrix factorization with sparseness constraints").

    ``H = (√n − ‖x‖₁/‖x‖₂) / (√n − 1)`` with ``x`` the ``n`` entries of ``M``
    (the whole matrix as one vector).

    Parameters
    ----------
    M
        Matrix ``(m, n)`` or batch ``(..., m, n)``; computed in float64 on its device.

    Returns
    -------
    float or numpy.ndarray
        In ``[0, 1]``: 0 when all ``|Mᵢⱼ|`` are equal, 1 when one entry is
        non-zero; scale invariant. The all-zero matrix (``‖x‖₂ = 0``) and a
        single entry (``√n − 1 = 0``) are 0/0 and are defined as 0.

    Raises
    ------
    NonFiniteError
        ``M`` holds NaN or Inf.

    Examples
    --------
    >>> import numpy as np, dynamics
    >>> dynamics.hoyer_sparsity(np.ones((3, 4))), dynamics.hoyer_sparsity(np.eye(1, 4))
    (0.0, 1.0)
    """
    return as_result(_gini_hoyer(_abs_entries(M, "hoyer_sparsity"), ranked=False)[1])


def induced_inf_norm(M: Any) -> Result:
    """Induced ∞-norm ``‖M‖_∞ = maxᵢ Σⱼ |Mᵢⱼ|`` (largest absolute row sum).

    The operator norm of ``v ↦ M v`` with the max-norm on both sides
    (``torch.linalg.matrix_norm(M, ord=inf)``). For a PyTorch weight
    ``(out, in)`` row ``i`` is output unit ``i``.

    Parameters
    ----------
    M
        Matrix ``(m, n)`` or batch ``(..., m, n)``; computed in float64 on its device.

    Returns
    -------
    float or numpy.ndarray
        ``>= 0``; 0 only for the zero matrix.

    Raises
    ------
    NonFiniteError
        ``M`` holds NaN or Inf.
    """
    return as_result(_inf_norm(_abs_entries(M, "induced_inf_norm")))


def entry_metrics(M: Any) -> dict[str, Result]:
    """:func:`gini`, :func:`hoyer_sparsity` and :func:`induced_inf_norm` of ``M`` from one ``|M|``.

    Returns
    -------
    dict
        Keys :data:`ENTRY_METRICS` (``gini``, ``hoyer_sparsity``,
        ``induced_inf_norm``); floats for one matrix, arrays of the batch
        shape for a batch.
    """
    a = _abs_entries(M, "entry_metrics")
    inf_norm = _inf_norm(a)  # before the sort, which reorders ``a`` in place
    g, h = _gini_hoyer(a, ranked=True)
    return {"gini": as_result(g), "hoyer_sparsity": as_result(h), "induced_inf_norm": as_result(inf_norm)}
