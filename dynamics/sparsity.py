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
accumulates in float64, in chunks of 2²⁰ entries (bounded temporary memory),
multiplied by a power of two (exact) when the largest ``|Mᵢⱼ|`` is outside
``[2⁻³⁰⁰, 2³⁰⁰]`` (no overflow of the squares). The cost is one ``abs``, one
sort (Gini; numpy's vectorised sort on CPU, in float32 when float64 values are
all exactly float32, ``torch.sort`` on CUDA) and one pass of sums. NaN/Inf entries raise
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
    """The non-negative ``flat`` (B, n) sorted ascending along its last axis, on its device: the same values, float32
    or ``flat``'s dtype. On CPU ``flat`` may be sorted in place (it must be a temporary of the caller, such as
    :func:`_abs_entries`' result) and the result may share its memory; the caller must not use ``flat`` afterwards.

    On CPU numpy sorts (its vectorised sort was 10-30x faster than ``torch.sort`` on one CPU
    thread for 19M entries, torch 2.13). float32 sorts about 2x faster than float64 (16 vs 8
    lanes), so float64 values that are all exactly float32 (such as the difference of two float32
    weights whose entries keep their sign and change by at most a factor 2, Sterbenz; checked chunk
    by chunk, stopping at the first value that is not) are sorted as a
    float32 copy, which gives exactly the same sorted values; other float64 values are sorted
    in place as their bit patterns read as int64, which order like non-negative IEEE doubles. On
    CUDA ``torch.sort``.
    """
    if flat.device.type != "cpu":
        return torch.sort(flat, dim=-1).values
    a = np.ascontiguousarray(flat.numpy())  # flat is |M|, a fresh array of this module: sorted in place, no copy
    if a.dtype == np.float64:
        narrow = _exactly_float32(a)
        if narrow is not None:
            a = narrow
    (a.view(np.int64) if a.dtype == np.float64 else a).sort(axis=-1)
    return torch.from_numpy(a)


#: entries per step of :func:`_exactly_float32` (small: a float64 array that is not float32 is usually found out
#: in its first step).
_CHECK_STEP = 1 << 16


def _exactly_float32(a: np.ndarray) -> np.ndarray | None:
    """``a`` (float64, C-contiguous) as a new float32 array of its shape when every value is exactly a float32, else
    ``None`` (found at the first step of :data:`_CHECK_STEP` entries holding a value that is not)."""
    out = np.empty(a.shape, dtype=np.float32)
    src, dst = a.reshape(-1), out.reshape(-1)
    with np.errstate(over="ignore", under="ignore"):  # out of float32 range: inf / 0, unequal to the value
        for lo in range(0, src.size, _CHECK_STEP):
            part = dst[lo : lo + _CHECK_STEP]
            np.copyto(part, src[lo : lo + _CHECK_STEP], casting="same_kind")  # rounds to nearest
            if not np.array_equal(part, src[lo : lo + _CHECK_STEP]):  # compared in float64: exact
                return None
    return out


#: :func:`_rank_weights` remembers weight vectors of at most this many entries (512 KiB each), and the
#: :data:`_CHUNK`-long one (8 MiB); 8 of them in all.
_CACHED_WEIGHTS = 1 << 16


def _rank_weights(c: int, device: torch.device) -> torch.Tensor:
    """The centred rank weights ``2j − c + 1`` for ``j = 0 .. c−1`` (float64, exact integers, antisymmetric): the
    Gini weights ``2i − n − 1`` of a chunk ``i = lo+1 .. lo+c`` less their mean ``2·lo + c − n``. Short ones (the
    many small matrices of a model) and the full-chunk one are remembered, others made afresh (once per matrix)."""
    if c <= _CACHED_WEIGHTS or c == _CHUNK:
        return _remembered_rank_weights(c, device)
    return _new_rank_weights(c, device)


@functools.lru_cache(maxsize=8)
def _remembered_rank_weights(c: int, device: torch.device) -> torch.Tensor:
    return _new_rank_weights(c, device)


def _new_rank_weights(c: int, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":  # numpy's arange: several times faster than torch's float64 one on one thread
        return torch.from_numpy(np.arange(1 - c, c, 2, dtype=np.float64))
    return torch.arange(1 - c, c, 2, dtype=torch.float64, device=device)


#: row peaks in ``[2^-_SAFE_EXP, 2^_SAFE_EXP]`` are summed unscaled: the squares (at most ``n·peak²``) cannot
#: overflow, and squares too small for float64 are below ``2^-2·_SAFE_EXP`` of the largest one. Every float32
#: value is in this range.
_SAFE_EXP = 300
#: out of that range a row is multiplied by ``2^k``, ``k = -exponent(peak)`` clipped to this (exact, finite).
_MAX_SHIFT = 1000


def _shift_exponents(peak: np.ndarray) -> np.ndarray | None:
    """``k`` (B,) with ``peak·2^k`` in ``[1/2, 1)`` (clipped to ``±_MAX_SHIFT``; 0 for a zero peak), or ``None``
    when every positive peak (float64) is in the safe range and no scaling is needed."""
    positive = peak[peak > 0]
    if positive.size == 0 or (positive.min() >= 2.0**-_SAFE_EXP and positive.max() <= 2.0**_SAFE_EXP):
        return None
    exponent = np.frexp(np.where(peak > 0, peak, 1.0))[1]
    return np.clip(-exponent, -_MAX_SHIFT, _MAX_SHIFT)


def _sums(flat: torch.Tensor, ranked: bool) -> np.ndarray:
    """float64 ``[peak, Σy, Σy², Σ(2i−n−1)·y, low]`` per row of ``flat`` (B, n), ``y = flat·s``: numpy (5, B) (the
    last two rows 0 unless ``ranked``).

    ``peak`` is the row maximum (the last entry when ``ranked``: ``flat`` sorted
    ascending), ``low`` the first entry (the row minimum when ``ranked``). ``s = 1``
    when every peak is in a safe range (always for float32 values), else the power of
    two ``s = 2^k`` (:func:`_shift_exponents`) that brings the row's peak to
    ``[1/2, 1)``, an exact scaling that keeps the squares in range; the callers use
    only ratios of these sums, in which ``s`` cancels. Each value is made float64
    once and summed in float64 in chunks of :data:`_CHUNK`; the rank weights
    ``2i − n − 1`` are integers (exact in float64), applied per chunk as centred
    integer weights (antisymmetric, cached) plus their mean times the chunk's ``Σy``.
    On CPU numpy sums (per chunk: one widening copy, pairwise ``sum`` of the values
    and of their squares, one matrix-vector product), elsewhere torch.
    """
    if flat.device.type == "cpu":
        return _sums_numpy(flat.numpy(), ranked)
    return _sums_torch(flat, ranked)


def _sums_numpy(x: np.ndarray, ranked: bool) -> np.ndarray:
    """:func:`_sums` of the numpy ``x`` (B, n), float32 or float64."""
    rows, n = x.shape
    peak = (x[:, -1] if ranked else x.max(axis=-1)).astype(np.float64)
    shift = _shift_exponents(peak)
    scale = None if shift is None else np.ldexp(1.0, shift)[:, None]
    out = np.zeros((5, rows))
    out[0] = peak
    if ranked:
        out[4] = x[:, 0]
    buf = np.empty((rows, min(n, _CHUNK)))  # the float64 chunk, then its squares
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        part, y = x[:, lo:hi], buf[:, : hi - lo]
        if scale is not None:
            np.multiply(part, scale, out=y)  # by a power of two: exact (but for float64 underflow)
        elif x.dtype == np.float64:
            y = part
        else:
            np.copyto(y, part)  # float32 -> float64: exact
        total = y.sum(axis=-1)  # pairwise summation along the row
        out[1] += total
        if ranked:  # weights 2i - n - 1 for i = lo+1 .. hi: centred ones plus their mean
            out[3] += y @ _rank_weights(hi - lo, torch.device("cpu")).numpy() + (lo + hi - n) * total
        out[2] += np.square(y, out=buf[:, : hi - lo]).sum(axis=-1)
    return out


def _sums_torch(flat: torch.Tensor, ranked: bool) -> np.ndarray:
    """:func:`_sums` of the tensor ``flat`` (B, n) on its device (any; CUDA in practice)."""
    n = flat.shape[-1]
    peak = (flat[:, -1] if ranked else flat.amax(dim=-1)).to(torch.float64)
    shift = _shift_exponents(peak.to("cpu").numpy())
    scale = None if shift is None else torch.from_numpy(np.ldexp(1.0, shift)[:, None]).to(flat.device)
    total = torch.zeros(4, flat.shape[0], dtype=torch.float64, device=flat.device)
    if ranked:
        total[3] = flat[:, 0]
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        y = flat[:, lo:hi].to(torch.float64)
        if scale is not None:
            y = y * scale  # by a power of two: exact (but for float64 underflow)
        part = y.sum(dim=-1)
        total[0] += part
        total[1] += torch.linalg.vecdot(y, y)
        if ranked:  # weights 2i - n - 1 for i = lo+1 .. hi: centred ones plus their mean
            total[2] += y @ _rank_weights(hi - lo, flat.device) + (lo + hi - n) * part
    out: np.ndarray = torch.cat([peak[None], total]).to("cpu").numpy()
    return out


def _gini_hoyer(a: torch.Tensor, *, ranked: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gini (``ranked``; else zeros) and Hoyer sparsity of the non-negative ``a`` (..., m, n): float64, batch shape.
    With ``ranked`` on CPU ``a`` may be sorted in place (:func:`_sorted`).

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
    # every entry equal (the sorted row's first entry is its peak): exactly 0, whatever the rounding of the sums
    gini = np.where(nonzero & (stats[4] < peak), stats[3] / (n * safe_l1), 0.0) if ranked else np.zeros_like(l1)
    gini = np.clip(gini, 0.0, (n - 1) / n)
    if n == 1:
        hoyer = np.zeros_like(l1)
    else:
        root = math.sqrt(n)
        ratio = l1 / np.sqrt(np.where(nonzero, sq, 1.0))
        hoyer = np.where(nonzero, np.clip((root - ratio) / (root - 1.0), 0.0, 1.0), 0.0)
    return gini.reshape(batch), hoyer.reshape(batch)


def _inf_norm(a: torch.Tensor) -> np.ndarray:
    """Largest row sum of the non-negative ``a`` (..., m, n), summed in float64: numpy of the batch shape.

    A float32 ``a`` on CPU is summed by numpy (it widens to float64 on the fly, several times
    faster than ``torch.sum(dtype=float64)`` of a float32 tensor on one thread, torch 2.13);
    otherwise torch (faster for float64)."""
    if a.device.type == "cpu" and a.dtype == torch.float32:
        out: np.ndarray = np.asarray(a.numpy().sum(axis=-1, dtype=np.float64).max(axis=-1))
        return out
    out = a.sum(dim=-1, dtype=torch.float64).amax(dim=-1).to("cpu").numpy()
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
