"""Singular values, computed once, and the :class:`Spectrum` every metric derives from.

Routes (``method=``)
--------------------
``'direct'``
    ``torch.linalg.svdvals`` (values only, never U/V) in float64 on CPU;
    float32 on CUDA (float64 if the input is float64).  On CUDA, float32
    singular values agree with the float64 ones to about ``1e-6 * s_1``
    (absolute; tested to ``1e-5 * s_1``), so metrics agree to ~1e-5 relative,
    except condition numbers beyond ~1e5, which float32 cannot resolve.
``'gram'``
    eigenvalues of the float64 Gram matrix ``M^T M`` (or ``M M^T``, whichever is
    smaller), ``s = sqrt(max(lambda, 0))``.  Squaring the matrix loses
    precision at the small end: the relative error of ``s_i`` grows like
    ``eps64 * (s_1 / s_i)**2``; small ``s_i`` are only known to about
    ``sqrt(eps64) * s_1 ~ 1.5e-8 * s_1``.  Forcing this route on an
    ill-conditioned matrix emits a :class:`DynamicsWarning`.
``'auto'`` (default)
    the Gram route on CPU when ``max(m, n) >= GRAM_MIN_ASPECT * min(m, n)``
    (strongly rectangular: much faster, see ``benchmarks/metrics_bench.py``),
    **kept only if** ``s_k >= GRAM_MIN_SIGMA_RATIO * s_1`` (condition number
    ``<= 1e4``) and ``s_1`` lies in ``GRAM_SIGMA_RANGE = (1e-75, 1e75)``
    (outside it the squares under/overflow).  In that regime every singular
    value has relative error ``<= ~1e-9`` (measured on 50304x384, 1536x384
    and 400x40 matrices; tests assert 1e-7 against the direct route), so
    condition numbers and numerical ranks are as accurate as from the direct
    route.  Otherwise (an ill-conditioned or rank-deficient matrix) the
    spectrum is recomputed with the direct route: condition numbers and
    numerical ranks never come from an inaccurate Gram computation. A batch
    tries its first matrix first: when that one is refused, the whole batch
    goes direct (its matrices are alike, such as all layers' gradients of one
    projection, and the other Gram products would nearly all be thrown away);
    otherwise each matrix is kept or recomputed as above.
    ``Spectrum.method`` reports the route used (``'gram+direct'`` for a batch
    that mixed both).  Square-ish matrices and CUDA tensors always use the
    direct route.

Factored spectra (:func:`product_spectrum`) get the non-zero singular values
of ``L @ R`` from a QR of each factor and an SVD of the small ``r x r`` core.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _kernels as kern
from ._kernels import (
    GRAM_MIN_ASPECT,
    GRAM_MIN_SIGMA_RATIO,
    GRAM_SIGMA_RANGE,
    SVD_METHODS,
    Result,
    factored_values,
    finite_or_raise,
    svdvals,
)
from .validation import (
    DynamicsError,
    NonFiniteError,
    ShapeError,
    as_matrix_batch,
    as_tensor,
    check_compatible_pair,
    check_option,
    dtype_name,
    eps_of,
)

__all__ = [
    "Spectrum",
    "spectrum",
    "singular_values",
    "product_spectrum",
    "GRAM_MIN_ASPECT",
    "GRAM_MIN_SIGMA_RATIO",
    "GRAM_SIGMA_RANGE",
]

# GRAM_MIN_ASPECT, GRAM_MIN_SIGMA_RATIO and GRAM_SIGMA_RANGE (the 'auto' rule above) are defined in
# dynamics._kernels, next to the routes that use them, and re-exported here.

_FORMAT = "dynamics.Spectrum"
_VERSION = 1


# --------------------------------------------------------------------------- Spectrum


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of a matrix (or a batch), plus what is needed to derive metrics.

    Attributes
    ----------
    values : numpy.ndarray
        float64, shape ``batch_shape + (r,)``, descending along the last axis,
        non-negative, read-only.  ``r <= k = min(m, n)``; when ``r < k`` the
        remaining ``k - r`` singular values are exact zeros (factored spectra
        such as a rank-``hd`` OV circuit store only the structurally non-zero
        part).
    shape : tuple[int, int]
        ``(m, n)`` of the matrix (of each matrix of the batch).
    dtype : str
        Name of the *original* input dtype (``'float32'``, ``'bfloat16'``...),
        whose eps sets the default numerical-rank tolerance.
    method : str
        How the values were computed: ``'direct'``, ``'gram'``,
        ``'gram+direct'``, ``'factored'``, or ``'given'``.

    Every metric is a method; a single matrix gives Python ``float`` (``int``
    for ranks), a batch gives arrays of ``batch_shape``.  ``to_dict`` /
    ``from_dict`` store and restore it (JSON-compatible).

    Examples
    --------
    >>> import numpy as np, dynamics
    >>> s = dynamics.spectrum(np.diag([2.0, 1.0, 0.0]))
    >>> s.numerical_rank(), s.condition_number()
    (2, inf)
    >>> dynamics.Spectrum.from_dict(s.to_dict()) == s
    True
    """

    values: np.ndarray
    shape: tuple[int, int]
    dtype: str = "float64"
    method: str = "given"

    def __post_init__(self) -> None:
        where = "Spectrum"
        try:
            shape = tuple(int(v) for v in self.shape)
        except (TypeError, ValueError):
            raise ShapeError(f"{where}: `shape` must be (m, n), got {self.shape!r}") from None
        if len(shape) != 2 or min(shape) < 1:
            raise ShapeError(f"{where}: `shape` must be (m, n) with m, n >= 1, got {self.shape!r}")
        vals = self.values
        if isinstance(vals, torch.Tensor):
            vals = vals.detach().cpu().numpy()
        vals = np.array(vals, dtype=np.float64, copy=True)
        if vals.ndim < 1 or vals.shape[-1] < 1 or vals.size == 0:
            raise ShapeError(
                f"{where}: `values` must have shape batch_shape + (r,) with r >= 1 "
                f"and a non-empty batch, got shape {vals.shape}"
            )
        if vals.shape[-1] > min(shape):
            raise ShapeError(
                f"{where}: `values` has {vals.shape[-1]} singular values per matrix, "
                f"but a {shape[0]}x{shape[1]} matrix has at most {min(shape)}"
            )
        if not np.all(np.isfinite(vals)):
            raise NonFiniteError(f"{where}: `values` contains NaN or Inf")
        if np.any(vals < 0):
            raise DynamicsError(f"{where}: singular values must be >= 0, got {vals.min()}")
        if np.any(np.diff(vals, axis=-1) > 0):
            raise DynamicsError(
                f"{where}: `values` must be sorted in descending order along the "
                "last axis; use np.sort(values, axis=-1)[..., ::-1]"
            )
        eps_of(str(self.dtype))  # validates the dtype name
        vals.setflags(write=False)
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", str(self.dtype))
        object.__setattr__(self, "method", str(self.method))

    # ------------------------------------------------------------------ basics
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (batch) dimensions; ``()`` for a single matrix."""
        return self.values.shape[:-1]

    @property
    def k(self) -> int:
        """Number of singular values, ``min(m, n)`` (stored or implied zero)."""
        return min(self.shape)

    @property
    def eps(self) -> float:
        """Machine epsilon of the original dtype."""
        return eps_of(self.dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spectrum):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and self.method == other.method
            and self.values.shape == other.values.shape
            and bool(np.array_equal(self.values, other.values))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        smax = self.values[..., 0]
        smax_s = f"{float(smax):.4g}" if smax.ndim == 0 else f"array{smax.shape}"
        return (
            f"Spectrum(shape={self.shape}, dtype={self.dtype!r}, method={self.method!r}, "
            f"batch_shape={self.batch_shape}, n_values={self.values.shape[-1]}, "
            f"sigma_max={smax_s})"
        )

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("a single-matrix Spectrum has no length; it is not batched")
        return self.batch_shape[0]

    def __getitem__(self, index: Any) -> Spectrum:
        """Select batch elements: ``spec[i]``, ``spec[2:5]``, ``spec[i, j]``."""
        idx = index if isinstance(index, tuple) else (index,)
        if not self.batch_shape:
            raise TypeError("a single-matrix Spectrum cannot be indexed")
        if len(idx) > len(self.batch_shape) or any(i is Ellipsis or i is None for i in idx):
            raise IndexError(
                f"Spectrum index {index!r} must address at most the "
                f"{len(self.batch_shape)} batch dimension(s) {self.batch_shape} with "
                "ints/slices/arrays"
            )
        return Spectrum(self.values[idx], self.shape, self.dtype, self.method)

    # ------------------------------------------------------------------ metrics
    def sigma_max(self) -> Result:
        """Largest singular value ``s_1`` (operator 2-norm)."""
        return kern.as_result(self.values[..., 0])

    def sigma_min(self) -> Result:
        """Smallest singular value ``s_k`` (0 if only ``r < k`` values are stored)."""
        return kern.as_result(kern.sigma_min(self.values, self.k))

    def spectral_norm(self) -> Result:
        """Spectral (operator 2-) norm ``||M||_2 = s_1``; the same number as :meth:`sigma_max`."""
        return kern.as_result(self.values[..., 0])

    def frobenius_norm(self) -> Result:
        """Frobenius norm ``||M||_F = sqrt(sum s_i**2)`` (equal to the root sum of squared entries)."""
        return kern.as_result(kern.frobenius_norm(self.values))

    def nuclear_norm(self) -> Result:
        """Nuclear (trace) norm ``||M||_* = sum s_i``."""
        return kern.as_result(kern.nuclear_norm(self.values))

    def default_tol(self) -> Result:
        """Default rank tolerance ``s_1 * max(m, n) * eps(dtype)``."""
        return kern.as_result(kern.default_tol(self.values, self.shape, self.eps))

    def effective_rank(self) -> Result:
        """``exp(-sum p ln p)``, ``p = s / sum(s)`` (natural log); zero matrix -> 0."""
        return kern.as_result(kern.effective_rank(self.values))

    def proportional_effective_rank(self) -> Result:
        """Effective rank / ``min(m, n)``, in (0, 1]; zero matrix -> 0."""
        return kern.as_result(kern.effective_rank(self.values) / self.k)

    def stable_rank(self) -> Result:
        """``sum(s**2) / s_1**2``; zero matrix -> 0."""
        return kern.as_result(kern.stable_rank(self.values))

    def participation_ratio(self) -> Result:
        """``(sum s**2)**2 / sum s**4``; zero matrix -> 0."""
        return kern.as_result(kern.participation_ratio(self.values))

    def spectral_entropy(self) -> Result:
        """``H(p) / ln k`` with ``p = s / sum(s)``; 0 when ``k = 1`` or for the zero matrix."""
        return kern.as_result(kern.spectral_entropy(self.values, self.k))

    def numerical_rank(self, *, tol: Any = None, rtol: Any = None) -> int | np.ndarray:
        """``#{s_i > tol}``; default ``tol = s_1 * max(m, n) * eps(dtype)``; or ``tol = rtol * s_1``."""
        t = kern.resolve_tol(self.values, self.shape, self.eps, tol, rtol, "numerical_rank")
        return kern.as_count(kern.numerical_rank(self.values, t))

    def condition_number(self, *, log10: bool = False) -> Result:
        """``s_1 / s_k`` (``inf`` when ``s_k = 0``), or its log10."""
        c = kern.condition_number(self.values, self.k)
        return kern.as_result(np.log10(c) if log10 else c)

    def truncated_condition_number(self, *, tol: Any = None, rtol: Any = None, log10: bool = False) -> Result:
        """``s_1 / s_r`` over the ``r`` singular values above the rank tolerance."""
        t = kern.resolve_tol(self.values, self.shape, self.eps, tol, rtol, "truncated_condition_number")
        c = kern.truncated_condition_number(self.values, t)
        return kern.as_result(np.log10(c) if log10 else c)

    def top_k_energy(self, k: int) -> Result:
        """Fraction of ``sum s**2`` in the ``k`` largest singular values."""
        k = kern.check_k(k, "top_k_energy")
        return kern.as_result(kern.top_k_energy(self.values, k))

    def tail_energy(self, k: int) -> Result:
        """Fraction of ``sum s**2`` outside the ``k`` largest singular values."""
        k = kern.check_k(k, "tail_energy")
        return kern.as_result(kern.tail_energy(self.values, k))

    def metrics(self, *, tol: Any = None, rtol: Any = None, top_k: Iterable[int] = (1, 10)) -> dict[str, Result]:
        """All metrics as a dict (see :func:`dynamics.spectrum_metrics` for keys)."""
        v, k = self.values, self.k
        t = kern.resolve_tol(v, self.shape, self.eps, tol, rtol, "spectrum_metrics")
        erank = kern.effective_rank(v)
        cond = kern.condition_number(v, k)
        tcond = kern.truncated_condition_number(v, t)
        out: dict[str, Result] = {
            "effective_rank": kern.as_result(erank),
            "proportional_effective_rank": kern.as_result(erank / k),
            "stable_rank": kern.as_result(kern.stable_rank(v)),
            "numerical_rank": kern.as_count(kern.numerical_rank(v, t)),
            "condition_number": kern.as_result(cond),
            "log10_condition_number": kern.as_result(np.log10(cond)),
            "truncated_condition_number": kern.as_result(tcond),
            "log10_truncated_condition_number": kern.as_result(np.log10(tcond)),
            "spectral_entropy": kern.as_result(kern.spectral_entropy(v, k)),
            "participation_ratio": kern.as_result(kern.participation_ratio(v)),
            "sigma_max": kern.as_result(v[..., 0]),
            "sigma_min": kern.as_result(kern.sigma_min(v, k)),
            "spectral_norm": kern.as_result(v[..., 0]),
            "frobenius_norm": kern.as_result(kern.frobenius_norm(v)),
            "nuclear_norm": kern.as_result(kern.nuclear_norm(v)),
        }
        for kk in top_k:
            kk = kern.check_k(kk, "spectrum_metrics")
            out[f"top_{kk}_energy"] = kern.as_result(kern.top_k_energy(v, kk))
        return out

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict; ``Spectrum.from_dict(s.to_dict()) == s``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "values": self.values.tolist(),
            "values_shape": list(self.values.shape),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spectrum:
        """Rebuild a Spectrum written by :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise DynamicsError(f"Spectrum.from_dict(): argument `data` must be a mapping, got {type(data).__name__}")
        missing = [key for key in ("values", "shape", "dtype") if key not in data]
        if missing:
            raise DynamicsError(
                f"Spectrum.from_dict(): argument `data` lacks key(s) {missing}; "
                "expected the output of Spectrum.to_dict()"
            )
        if data.get("format", _FORMAT) != _FORMAT or data.get("version", _VERSION) > _VERSION:
            raise DynamicsError(
                f"Spectrum.from_dict(): unsupported format {data.get('format')!r} "
                f"version {data.get('version')!r}; this code reads {_FORMAT!r} "
                f"version <= {_VERSION}"
            )
        values = np.asarray(data["values"], dtype=np.float64)
        if "values_shape" in data:
            values = values.reshape(tuple(data["values_shape"]))
        return cls(values, tuple(data["shape"]), data["dtype"], data.get("method", "given"))


# --------------------------------------------------------------------------- public


def spectrum(M: Any, *, method: str = "auto", name: str = "M", caller: str = "spectrum") -> Spectrum:
    """Compute the singular values of ``M`` once and wrap them in a :class:`Spectrum`.

    Parameters
    ----------
    M
        Matrix ``(m, n)`` or batch ``(..., m, n)``; numpy array or torch tensor
        of any real dtype (half precision is upcast; CPU runs in float64, CUDA
        in float32, or float64 for float64 input).  A :class:`Spectrum` is
        returned unchanged.
    method
        ``'auto'`` (default), ``'direct'`` or ``'gram'``; see the module
        docstring for the accuracy of each and the rule ``'auto'`` follows.
    name, caller
        Used in error messages by functions that delegate here.

    Returns
    -------
    Spectrum
        ``values`` of shape ``batch_shape + (min(m, n),)``.

    Raises
    ------
    ShapeError, EmptyMatrixError
        ``M`` has fewer than 2 dimensions, or a zero-length dimension.
    NonFiniteError
        ``M`` contains NaN/Inf.

    Examples
    --------
    >>> import torch, dynamics
    >>> s = dynamics.spectrum(torch.eye(3, dtype=torch.bfloat16))
    >>> s.dtype, s.method, s.numerical_rank(), round(s.effective_rank(), 9)
    ('bfloat16', 'direct', 3, 3.0)
    """
    if isinstance(M, Spectrum):
        return M
    check_option(method, SVD_METHODS, name="method", caller=caller)
    return _spectrum(M, method, name, caller)


def _spectrum(
    M: Any, method: str, name: str, caller: str, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Spectrum:
    t = as_tensor(M, name=name, caller=caller)
    original = dtype_name(t)
    x = as_matrix_batch(t, name=name, caller=caller)
    values, route = svdvals(x, method, eig)
    finite_or_raise(values, caller)
    return Spectrum(values, (x.shape[-2], x.shape[-1]), original, route)


def spectrum_from_gram(M: Any, eig: tuple[torch.Tensor, torch.Tensor]) -> Spectrum:
    """:func:`spectrum` of ``M`` (``method='auto'``) from the Gram eigendecomposition ``eig`` of the same matrices
    that the caller already has (:func:`dynamics._kernels.gram_eigh`; the analysis also takes the intruder vectors
    from it): the values where the Gram route keeps them, the direct route for the others, as ``'auto'`` does."""
    return _spectrum(M, "auto", "M", "spectrum", eig)


def singular_values(M: Any, *, method: str = "auto") -> np.ndarray:
    """Singular values of ``M``, float64 numpy, shape ``batch_shape + (min(m, n),)``, descending.

    See :func:`spectrum` for inputs, routes and errors.
    """
    if isinstance(M, Spectrum):
        v = M.values
        if v.shape[-1] < M.k:
            pad = np.zeros(v.shape[:-1] + (M.k - v.shape[-1],))
            v = np.concatenate([v, pad], axis=-1)
        return np.array(v)
    return np.array(spectrum(M, method=method, caller="singular_values").values)


def product_spectrum(
    left: Any,
    right: Any,
    *,
    scale: float = 1.0,
    names: tuple[str, str] = ("left", "right"),
    caller: str = "product_spectrum",
) -> Spectrum:
    """Spectrum of ``scale * left @ right`` without forming the product.

    Parameters
    ----------
    left
        ``(..., m, r)``.
    right
        ``(..., r, n)``; batch dimensions broadcast against ``left``'s.
    scale
        Real factor (the singular values scale by ``|scale|``).

    Returns
    -------
    Spectrum
        ``shape = (m, n)``, ``method = 'factored'``, ``min(m, n, r)`` stored
        values (the rest are exact zeros), ``dtype`` the promoted input dtype.

    Notes
    -----
    Cost ``O((m + n) r**2 + r**3)`` instead of ``O(m n min(m, n))``; accuracy
    is that of a backward-stable QR + SVD (float64 on CPU).
    """
    try:
        scale_f = float(scale)
    except (TypeError, ValueError):
        raise DynamicsError(f"{caller}(): argument `scale` must be a real number, got {scale!r}") from None
    if not math.isfinite(scale_f):
        raise DynamicsError(f"{caller}(): argument `scale` must be finite, got {scale!r}")
    tl = as_tensor(left, name=names[0], caller=caller)
    tr = as_tensor(right, name=names[1], caller=caller)
    original = dtype_name(torch.promote_types(tl.dtype, tr.dtype))
    L = as_matrix_batch(tl, name=names[0], caller=caller)
    R = as_matrix_batch(tr, name=names[1], caller=caller)
    if L.shape[-1] != R.shape[-2]:
        raise ShapeError(
            f"{caller}(): inner dimensions differ: `{names[0]}` has shape "
            f"{tuple(L.shape)} (..., m, r) and `{names[1]}` has shape {tuple(R.shape)} "
            "(..., r, n); expected left.shape[-1] == right.shape[-2]"
        )
    check_compatible_pair(L, R, names=names, caller=caller)
    dt = torch.promote_types(L.dtype, R.dtype)
    values = factored_values(L.to(dt), R.to(dt)) * abs(scale_f)
    finite_or_raise(values, caller)
    return Spectrum(values, (L.shape[-2], R.shape[-1]), original, "factored")
