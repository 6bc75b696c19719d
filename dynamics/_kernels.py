"""Private numerical kernels shared by the maths core (no public API; import from here, never by private name).

Two families live here so that no module of :mod:`dynamics` reaches into
another's private names:

* **singular-value routes** on validated torch tensors ``(..., m, n)``:
  :func:`svdvals` (the ``'auto'``/``'direct'``/``'gram'`` rule documented in
  :mod:`dynamics.spectra`), :func:`direct_svdvals`, :func:`r_factor`,
  :func:`factored_values` and the overflow check :func:`finite_or_raise`;
* **spectrum kernels** on a ``values`` array ``(..., r)``: float64, non-negative,
  descending along the last axis; singular values beyond ``r`` up to
  ``k = min(m, n)`` are exact zeros (factored spectra store only the
  structurally non-zero part).  Each returns a float64 (int64 for ranks) array
  of the batch shape ``values.shape[:-1]``; :func:`as_result` turns it into a
  Python scalar for a single matrix.  Definitions and conventions are in
  :mod:`dynamics.metrics`.

Imports only numpy, torch and :mod:`dynamics.validation`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .validation import DynamicsError, DynamicsWarning, NonFiniteError, check_positive_int, check_tolerance

__all__ = [
    "GRAM_MIN_ASPECT",
    "GRAM_MIN_SIGMA_RATIO",
    "GRAM_SIGMA_RANGE",
    "SVD_METHODS",
    "decomposition_cost",
    "Result",
    "direct_svdvals",
    "svdvals",
    "finite_or_raise",
    "r_factor",
    "factored_values",
    "as_result",
    "as_count",
    "check_k",
    "effective_rank",
    "spectral_entropy",
    "stable_rank",
    "participation_ratio",
    "default_tol",
    "resolve_tol",
    "numerical_rank",
    "sigma_min",
    "condition_number",
    "truncated_condition_number",
    "top_k_energy",
    "tail_energy",
    "frobenius_norm",
    "nuclear_norm",
]

#: auto mode tries the Gram route when max(m, n) >= GRAM_MIN_ASPECT * min(m, n).
GRAM_MIN_ASPECT = 2.0
#: the Gram result is kept only if s_k >= GRAM_MIN_SIGMA_RATIO * s_1 (cond <= 1e4).
GRAM_MIN_SIGMA_RATIO = 1e-4
#: ... and only if GRAM_SIGMA_RANGE[0] <= s_1 <= GRAM_SIGMA_RANGE[1]: outside it
#: the squared entries under/overflow float64 (the zero matrix also goes direct).
GRAM_SIGMA_RANGE = (1e-75, 1e75)
#: the singular-value routes a public function's ``method=`` accepts.
SVD_METHODS = ("auto", "direct", "gram")

#: a metric's value: a Python float (int for ranks) for one matrix, a numpy array of the batch shape for a batch.
Result = float | np.ndarray


# --------------------------------------------------------------------------- singular-value routes


def direct_svdvals(x: torch.Tensor) -> np.ndarray:
    """``torch.linalg.svdvals`` of ``x`` (..., m, n) as float64 numpy (..., min(m, n)), descending.

    A wide matrix (``m < n``) is passed as its transpose (a view: the same values, ``σ(Xᵀ) = σ(X)``): LAPACK's
    routine reduces a tall matrix by QR first but not a wide one, which torch 2.13 hands it as is; measured on CPU,
    one thread, float64: 3.9x faster for twelve 384x1536 matrices, 1.9x for 96x384, equal for square ones.
    """
    if x.shape[-2] < x.shape[-1]:
        x = x.mT
    values: np.ndarray = torch.linalg.svdvals(x).to("cpu", torch.float64).numpy()
    return values


def _gram_matrix(x: torch.Tensor) -> torch.Tensor | None:
    """The float64 Gram matrix of the smaller side of ``x`` (..., m, n): ``XᵀX`` (..., n, n) when ``m ≥ n``, else
    ``X Xᵀ`` (..., m, m); ``None`` if its diagonal overflowed.

    Everything runs in torch (one BLAS thread pool): mixing numpy's OpenBLAS
    and torch's OpenMP pools in one process oversubscribes small CPUs.
    """
    m, n = x.shape[-2:]
    x64 = x.double()
    g = x64.mT @ x64 if m >= n else x64 @ x64.mT
    if not bool(torch.isfinite(torch.diagonal(g, dim1=-2, dim2=-1)).all()):
        return None
    return g


def _gram_values(lam: torch.Tensor) -> np.ndarray:
    """Singular values (float64 numpy, descending) from the ascending eigenvalues ``lam`` of a Gram matrix."""
    values: np.ndarray = np.sqrt(np.clip(lam.to("cpu", torch.float64).numpy(), 0.0, None))[..., ::-1].copy()
    return values


def _gram(x: torch.Tensor) -> np.ndarray | None:
    """Singular values (float64, descending) from the float64 Gram matrix; None if it overflowed."""
    g = _gram_matrix(x)
    return None if g is None else _gram_values(torch.linalg.eigvalsh(g))


def gram_first(x: torch.Tensor) -> bool:
    """Whether ``method='auto'`` tries the Gram route for ``x`` (..., m, n): on CPU, ``max(m, n) ≥ GRAM_MIN_ASPECT ·
    min(m, n)``."""
    m, n = x.shape[-2:]
    return x.device.type == "cpu" and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def gram_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenvalues (ascending, (..., N)) and eigenvectors ((..., N, N)) of the Gram matrix of :func:`_gram_matrix`,
    ``N = min(m, n)``; ``None`` if it overflowed. For a caller that needs both a batch's singular values
    (:func:`svdvals` with ``eig=``) and singular vectors from one Gram product (the intruder dimensions)."""
    g = _gram_matrix(x)
    if g is None:
        return None
    lam, q = torch.linalg.eigh(g)
    return lam, q


def _gram_out_of_range(values: np.ndarray) -> np.ndarray:
    """Bool (batch shape): s_1 outside GRAM_SIGMA_RANGE, so the squares under/overflow (incl. the zero matrix)."""
    s1 = values[..., 0]
    return (s1 < GRAM_SIGMA_RANGE[0]) | (s1 > GRAM_SIGMA_RANGE[1])


def _gram_inaccurate(values: np.ndarray) -> np.ndarray:
    """Bool (batch shape): s_k below GRAM_MIN_SIGMA_RATIO * s_1, too small for the Gram route to resolve."""
    s1 = values[..., 0]
    return (s1 > 0) & (values[..., -1] < GRAM_MIN_SIGMA_RATIO * s1)


def _gram_refused(values: np.ndarray) -> np.ndarray:
    """Bool (batch shape): Gram-route values that ``method='auto'`` does not keep (out of range or inaccurate)."""
    refused: np.ndarray = _gram_out_of_range(values) | _gram_inaccurate(values)
    return refused


def _gram_probed(x: torch.Tensor) -> np.ndarray | None:
    """:func:`_gram` of a batch ``x`` (..., m, n), its first matrix first: ``None`` (the whole batch goes direct) when
    that one overflows or would be refused (out of range, or ``s_k < GRAM_MIN_SIGMA_RATIO * s_1``).

    The matrices of a batch are alike (the analysis batches one projection across layers, one kind at a time):
    when the first one is ill-conditioned, nearly always every one is (all layers' gradients of a projection,
    a ReLoRA run's low-rank cycle updates), and a Gram product and eigendecomposition of each would be thrown away
    (measured: 6% of a ``small`` pair's analysis). Otherwise the batch goes on as :func:`_gram`, matrix by matrix.
    """
    m, n = x.shape[-2:]
    flat = x.reshape(-1, m, n)
    if flat.shape[0] <= 1:
        return _gram(x)
    head = _gram(flat[:1])
    if head is None or bool(_gram_refused(head).any()):
        return None
    rest = _gram(flat[1:])
    if rest is None:
        return None
    return np.concatenate([head, rest]).reshape(*x.shape[:-2], head.shape[-1])


def svdvals(
    x: torch.Tensor, method: str, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[np.ndarray, str]:
    """Singular values of a validated tensor ``x`` (..., m, n) and the route used.

    Returns float64 numpy ``(..., min(m, n))``, descending, and one of
    ``'direct'``, ``'gram'``, ``'gram+direct'`` (a batch that mixed both).
    ``method`` is one of :data:`SVD_METHODS` (checked by the caller). ``eig``: :func:`gram_eigh` of ``x`` when the
    caller already has it; the Gram route then takes its eigenvalues (each matrix kept or recomputed directly as
    usual) instead of forming the Gram matrices again.
    """
    m, n = x.shape[-2:]
    use_gram = gram_first(x) if method == "auto" else method == "gram"
    if not use_gram:
        return direct_svdvals(x), "direct"
    if eig is not None:
        vals: np.ndarray | None = _gram_values(eig[0])
    else:
        vals = _gram_probed(x) if method == "auto" else _gram(x)
    if vals is None:  # overflow of s**2 (or, auto, a batch whose first matrix was refused): the direct route
        return direct_svdvals(x), "direct"
    out_of_range = _gram_out_of_range(vals)  # the squares themselves are wrong
    inaccurate = _gram_inaccurate(vals) & ~out_of_range
    if method == "gram":
        if inaccurate.any():
            warnings.warn(
                "method='gram' on an ill-conditioned matrix (s_k < "
                f"{GRAM_MIN_SIGMA_RATIO:g} * s_1): small singular values, the "
                "condition number and the numerical rank are inaccurate; use "
                "method='auto' or 'direct'",
                DynamicsWarning,
                stacklevel=3,
            )
        bad = out_of_range
    else:
        bad = _gram_refused(vals)
    if not bad.any():
        return vals, "gram"
    if vals.ndim == 1 or bad.all():  # every matrix: the whole batch as is (no copy of its members)
        return direct_svdvals(x), "direct"
    flat_vals = vals.reshape(-1, vals.shape[-1])
    flat_bad = bad.reshape(-1)
    idx = torch.from_numpy(np.nonzero(flat_bad)[0]).to(x.device)
    flat_vals[flat_bad] = direct_svdvals(x.reshape(-1, m, n).index_select(0, idx))
    return flat_vals.reshape(vals.shape), "gram+direct"


def finite_or_raise(values: np.ndarray, caller: str) -> None:
    """Raise :class:`NonFiniteError` naming ``caller`` if computed singular values overflowed."""
    if not np.all(np.isfinite(values)):
        raise NonFiniteError(
            f"{caller}(): the singular value computation overflowed (entries near "
            "the float64 limit); rescale the matrix first"
        )


def r_factor(x: torch.Tensor) -> torch.Tensor:
    """R of the reduced QR of ``x`` (..., p, q): shape (..., min(p, q), q), dtype and device of ``x``."""
    r: torch.Tensor = torch.linalg.qr(x, mode="r").R
    return r


def factored_values(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    left_r: torch.Tensor | None = None,
    right_r: torch.Tensor | None = None,
) -> np.ndarray:
    """Non-zero singular values of ``left @ right`` ((..., m, r) @ (..., r, n)) from the r x r core.

    ``left = Q_l R_l`` and ``right^T = Q_r R_r`` give ``left @ right =
    Q_l (R_l R_r^T) Q_r^T``, so ``sigma(left @ right) = sigma(R_l R_r^T)``.
    Precomputed R factors can be passed (e.g. shared GQA value heads).
    Returns float64 numpy ``(..., min(m, n, r))``, descending.
    """
    rl = r_factor(left) if left_r is None else left_r
    rr = r_factor(right.mT) if right_r is None else right_r
    return direct_svdvals(rl @ rr.mT)


def decomposition_cost(shape: tuple[int, ...]) -> int:
    """``m·n·min(m, n)`` of a 2-D shape (0 otherwise): the scale of the flops of its decompositions (SVD, QR,
    Gram), used to order work longest first."""
    return shape[0] * shape[1] * min(shape) if len(shape) == 2 else 0


# --------------------------------------------------------------------------- spectrum kernels


def as_result(a: Any) -> Result:
    """Python float for a 0-d result, float64 numpy array of the batch shape otherwise."""
    arr = np.asarray(a)
    if arr.ndim == 0:
        return float(arr)
    return arr.astype(np.float64)


def as_count(a: Any) -> int | np.ndarray:
    """Python int for a 0-d count (a rank), int64 numpy array of the batch shape otherwise."""
    arr = np.asarray(a)
    if arr.ndim == 0:
        return int(arr)
    return arr.astype(np.int64)


def check_k(k: Any, caller: str) -> int:
    """``k`` of a top-k / tail energy as a positive int, or a :class:`DynamicsError` naming ``caller``."""
    return check_positive_int(k, name="k", caller=caller)


def _normalised(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values / s_1, nonzero-mask); rows of the zero matrix come back as 0."""
    s1 = values[..., :1]
    nonzero = s1[..., 0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s1 > 0, values / np.where(s1 > 0, s1, 1.0), 0.0)
    return t, nonzero


def _entropy(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shannon entropy (nats) of p = s / sum(s), 0 for the zero matrix; and the nonzero mask."""
    t, nonzero = _normalised(values)
    total = t.sum(-1, keepdims=True)
    p = t / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = np.maximum(-plogp.sum(-1), 0.0)
    return np.where(nonzero, h, 0.0), nonzero


def effective_rank(values: np.ndarray) -> np.ndarray:
    """``exp(H(p))``, ``p = s / sum(s)``, in [1, rank]; 0 for the zero matrix."""
    h, nonzero = _entropy(values)
    rank = np.maximum((values > 0).sum(-1), 1)
    # exp(H) lies in [1, rank] mathematically; clip only removes rounding.
    er = np.clip(np.exp(h), 1.0, rank)
    return np.where(nonzero, er, 0.0)


def spectral_entropy(values: np.ndarray, k: int) -> np.ndarray:
    """``H(p) / ln k`` in [0, 1]; 0 when ``k = 1`` or for the zero matrix."""
    h, _ = _entropy(values)
    if k == 1:
        return np.zeros_like(h)
    entropy: np.ndarray = np.clip(h / np.log(k), 0.0, 1.0)
    return entropy


def stable_rank(values: np.ndarray) -> np.ndarray:
    """``sum(s**2) / s_1**2``; 0 for the zero matrix."""
    t, nonzero = _normalised(values)
    return np.where(nonzero, (t * t).sum(-1), 0.0)


def participation_ratio(values: np.ndarray) -> np.ndarray:
    """``(sum s**2)**2 / sum s**4`` in [1, rank]; 0 for the zero matrix."""
    t, nonzero = _normalised(values)
    t2 = t * t
    num = t2.sum(-1) ** 2
    den = (t2 * t2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pr = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    rank = np.maximum((values > 0).sum(-1), 1)
    return np.where(nonzero, np.clip(pr, 1.0, rank), 0.0)


def default_tol(values: np.ndarray, shape: tuple[int, int], eps: float) -> np.ndarray:
    """Default rank tolerance ``s_1 * max(m, n) * eps`` (``eps`` of the original dtype)."""
    return values[..., 0] * max(shape) * eps


def resolve_tol(
    values: np.ndarray,
    shape: tuple[int, int],
    eps: float,
    tol: Any,
    rtol: Any,
    caller: str,
) -> np.ndarray:
    """The absolute tolerance (batch shape) from at most one of ``tol`` / ``rtol``, else the default."""
    batch_shape = values.shape[:-1]
    if tol is not None and rtol is not None:
        raise DynamicsError(f"{caller}(): give at most one of `tol` and `rtol`, got both")
    if rtol is not None:
        r = check_tolerance(rtol, name="rtol", caller=caller, batch_shape=batch_shape)
        assert r is not None  # only a None tolerance checks to None
        return np.broadcast_to(r * values[..., 0], batch_shape)
    if tol is not None:
        a = check_tolerance(tol, name="tol", caller=caller, batch_shape=batch_shape)
        assert a is not None
        return np.broadcast_to(a, batch_shape)
    return default_tol(values, shape, eps)


def numerical_rank(values: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """``#{s_i > tol}`` as int64 (batch shape)."""
    counts: np.ndarray = (values > np.asarray(tol)[..., None]).sum(-1).astype(np.int64)
    return counts


def sigma_min(values: np.ndarray, k: int) -> np.ndarray:
    """``s_k``: the last stored value, or 0 when fewer than ``k`` are stored (implied structural zeros)."""
    if values.shape[-1] < k:
        return np.zeros(values.shape[:-1])
    return values[..., -1]


def condition_number(values: np.ndarray, k: int) -> np.ndarray:
    """``s_1 / s_k`` in [1, inf]; inf when ``s_k = 0``."""
    smin = sigma_min(values, k)
    s1 = values[..., 0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        c = np.where(smin > 0, s1 / np.where(smin > 0, smin, 1.0), np.inf)
    return np.maximum(c, 1.0)


def truncated_condition_number(values: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """``s_1 / s_r`` with ``r`` the numerical rank at ``tol``; inf when ``r = 0``."""
    r = numerical_rank(values, tol)
    idx = np.maximum(r - 1, 0)[..., None]
    sr = np.take_along_axis(values, idx, axis=-1)[..., 0]
    s1 = values[..., 0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        c = np.where((r > 0) & (sr > 0), s1 / np.where(sr > 0, sr, 1.0), np.inf)
    return np.maximum(c, 1.0)


def top_k_energy(values: np.ndarray, k: int) -> np.ndarray:
    """``sum_{i<=k} s_i**2 / sum s**2`` in [0, 1]; 0 for the zero matrix."""
    t, nonzero = _normalised(values)
    e = t * t
    total = e.sum(-1)
    head = e[..., :k].sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nonzero, np.clip(head / np.where(total > 0, total, 1.0), 0, 1), 0.0)


def tail_energy(values: np.ndarray, k: int) -> np.ndarray:
    """``sum_{i>k} s_i**2 / sum s**2`` (summed directly, not ``1 - top``) in [0, 1]; 0 for the zero matrix."""
    t, nonzero = _normalised(values)
    e = t * t
    total = e.sum(-1)
    tail = e[..., k:].sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nonzero, np.clip(tail / np.where(total > 0, total, 1.0), 0, 1), 0.0)


def frobenius_norm(values: np.ndarray) -> np.ndarray:
    """``||M||_F = sqrt(sum s**2)`` (summed as ``s_1 * sqrt(sum (s/s_1)**2)``: no overflow of the squares); 0 for the zero matrix."""
    t, _ = _normalised(values)
    norm: np.ndarray = values[..., 0] * np.sqrt((t * t).sum(-1))
    return norm


def nuclear_norm(values: np.ndarray) -> np.ndarray:
    """``||M||_* = sum s`` (trace norm); 0 for the zero matrix."""
    norm: np.ndarray = values.sum(-1)
    return norm
