"""Input checks and the project's exception family.

Every public function of :mod:`dynamics` validates and converts its inputs once,
at the entry point, with the narrow checkers below; the internals then trust
the cleaned tensors.  Error messages name the function and the argument, say
what was expected, show what arrived and, where there is one, suggest a fix.

Conversion rules (:func:`as_matrix_batch`)
------------------------------------------
* numpy arrays, torch tensors and nested lists are accepted; gradients are
  detached, nothing is modified in place.
* CPU inputs are computed in ``float64``.  Inputs on an accelerator (CUDA) stay
  there and are computed in ``float32`` (``float64`` when they already are).
* ``bfloat16``/``float16`` (and integer) inputs are upcast: no SVD ever runs in
  half precision.  The *original* dtype is reported separately by
  :func:`dtype_name`, because the default numerical-rank tolerance uses its eps.
* NaN/Inf entries raise :class:`NonFiniteError`.  The check is done by us, not
  left to LAPACK: ``torch.linalg.svdvals`` can silently drop NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DynamicsError",
    "ShapeError",
    "EmptyMatrixError",
    "NonFiniteError",
    "DynamicsWarning",
    "ArrayLike",
    "dtype_name",
    "eps_of",
    "compute_dtype",
    "as_tensor",
    "as_matrix_batch",
    "check_finite",
    "check_option",
    "check_positive_int",
    "check_tolerance",
    "check_same_batch",
]

ArrayLike = np.ndarray | torch.Tensor


class DynamicsError(ValueError):
    """Base class of every error raised by :mod:`dynamics` for bad input."""


class ShapeError(DynamicsError):
    """An argument has the wrong number of dimensions or incompatible sizes."""


class EmptyMatrixError(ShapeError):
    """A matrix (or batch) with a zero-length dimension was given.

    Singular values of an empty matrix are undefined, so every metric refuses
    it instead of returning a made-up value.
    """


class NonFiniteError(DynamicsError):
    """An argument contains NaN or +-Inf (or a result overflowed)."""


class DynamicsWarning(UserWarning):
    """A result is valid but less accurate than usual (e.g. a forced Gram route)."""


# --------------------------------------------------------------------------- dtypes

_HALF = {torch.float16, torch.bfloat16}


def dtype_name(x: Any) -> str:
    """Name of the dtype of ``x`` as given (``'float32'``, ``'bfloat16'``, ...).

    Accepts a torch tensor, a numpy array, a torch/numpy dtype or anything
    ``np.asarray`` understands.
    """
    if isinstance(x, torch.Tensor):
        return str(x.dtype).replace("torch.", "")
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, np.dtype):
        return str(x.name)
    if isinstance(x, np.ndarray):
        return str(x.dtype.name)
    if isinstance(x, str):
        return x
    return np.asarray(x).dtype.name


def eps_of(name: str) -> float:
    """Machine epsilon of the floating dtype called ``name``.

    Integer and boolean dtypes have no rounding of their own; they are computed
    in float64, so the float64 eps is returned for them.

    Raises
    ------
    DynamicsError
        For an unknown dtype name.
    """
    tdt = getattr(torch, name, None)
    if isinstance(tdt, torch.dtype):
        if tdt.is_floating_point:
            return float(torch.finfo(tdt).eps)
        if tdt.is_complex:
            raise DynamicsError(f"complex dtype {name!r} is not supported")
        return float(np.finfo(np.float64).eps)
    try:
        ndt = np.dtype(name)
    except TypeError:
        raise DynamicsError(
            f"unknown dtype name {name!r}; expected a torch/numpy dtype name such as "
            "'float32', 'float64', 'bfloat16', 'float16'"
        ) from None
    if ndt.kind == "f":
        return float(np.finfo(ndt).eps)
    if ndt.kind in "biu":
        return float(np.finfo(np.float64).eps)
    raise DynamicsError(f"dtype {name!r} is not a real numeric dtype")


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype computations run in: float64 on CPU; float32 (or float64 if
    given) on accelerators.  Half precision is never used."""
    if device.type == "cpu":
        return torch.float64
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- arrays


def _prefix(caller: str, name: str) -> str:
    return f"{caller}(): argument `{name}`"


def as_tensor(x: Any, *, name: str, caller: str) -> torch.Tensor:
    """Convert ``x`` (numpy array, torch tensor, nested list) to a torch tensor
    without changing its dtype or device (numpy memory is shared when possible).

    Raises
    ------
    DynamicsError
        For complex, object, string or otherwise non-numeric input.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        if isinstance(x, (str, bytes)) or x is None:
            raise DynamicsError(
                f"{_prefix(caller, name)} must be a numpy array or torch tensor, got {type(x).__name__}"
            )
        try:
            a = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - any object may arrive; its conversion failure (ragged lists ...) is bad input
            raise DynamicsError(
                f"{_prefix(caller, name)} could not be converted to an array ({type(x).__name__}: {exc})"
            ) from None
        if a.dtype.kind not in "biuf":
            raise DynamicsError(
                f"{_prefix(caller, name)} must hold real numbers, got dtype "
                f"{a.dtype.name!r}" + ("; take .real or abs() first" if a.dtype.kind == "c" else "")
            )
        if not a.flags.c_contiguous and not a.flags.f_contiguous:
            a = np.ascontiguousarray(a)
        if any(s < 0 for s in a.strides):
            a = a.copy()
        t = torch.from_numpy(a)
    if t.is_complex():
        raise DynamicsError(
            f"{_prefix(caller, name)} must be real, got complex dtype {dtype_name(t)!r}; take .real or .abs() first"
        )
    return t


def check_finite(t: torch.Tensor, *, name: str, caller: str) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or +-Inf.

    A single reduction decides the common (finite) case; only when the sum is
    not finite (NaN/Inf present, or overflow of the sum) is the element-wise
    check run, to locate the bad entries for the message.
    """
    if t.numel() == 0 or not t.is_floating_point():
        return
    s = t.sum()
    if bool(torch.isfinite(s)):
        return
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad == 0:  # the sum overflowed, the entries are fine
        return
    n_nan = int(torch.isnan(t).sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    raise NonFiniteError(
        f"{_prefix(caller, name)} contains {n_bad} non-finite "
        f"entr{'y' if n_bad == 1 else 'ies'} ({n_nan} NaN, {n_bad - n_nan} Inf) "
        f"out of {t.numel()}, first at index {first}, shape {tuple(t.shape)}. "
        "Singular values of such a matrix are undefined (torch would silently "
        "drop NaN); find where the NaN/Inf came from, or select the finite "
        "matrices before calling."
    )


def as_matrix_batch(
    x: Any,
    *,
    name: str,
    caller: str,
    exact_ndim: int | None = None,
    check_nonfinite: bool = True,
    convert: bool = True,
) -> torch.Tensor:
    """Validate a matrix ``(m, n)`` or a batch of matrices ``(..., m, n)``.

    Parameters
    ----------
    x
        numpy array, torch tensor or nested list of real numbers.
    name, caller
        Argument and function names, used in error messages.
    exact_ndim
        If given, require exactly this many dimensions (e.g. 2: no batch).
    check_nonfinite
        Raise :class:`NonFiniteError` on NaN/Inf (default True).
    convert
        Return the tensor in the compute dtype (:func:`compute_dtype`); if
        False, return it in its own dtype.

    Returns
    -------
    torch.Tensor
        Shape ``(..., m, n)``; float64 on CPU, float32/float64 on CUDA.

    Raises
    ------
    ShapeError
        Fewer than 2 dimensions (or not ``exact_ndim``).
    EmptyMatrixError
        ``m``, ``n`` or a batch dimension is 0.
    NonFiniteError
        NaN or Inf entries.
    """
    t = as_tensor(x, name=name, caller=caller)
    shape = tuple(t.shape)
    if exact_ndim is not None and t.ndim != exact_ndim:
        expected = {2: "(m, n)", 3: "(batch, m, n)"}.get(exact_ndim, f"{exact_ndim}-D")
        raise ShapeError(
            f"{_prefix(caller, name)} must have shape {expected} ({exact_ndim} "
            f"dimensions), got shape {shape} ({t.ndim} dimensions)"
            + (". Loop over the leading dimensions, or use the batched function" if t.ndim > exact_ndim else "")
        )
    if t.ndim < 2:
        hint = (
            "; for a vector v use v.reshape(1, -1) (a 1xN row) or v.reshape(-1, 1) (an Nx1 column)"
            if t.ndim == 1
            else "; wrap a scalar as [[x]]"
        )
        raise ShapeError(
            f"{_prefix(caller, name)} must be a matrix of shape (m, n) or a batch "
            f"of matrices (..., m, n), got shape {shape} ({t.ndim} dimension"
            f"{'' if t.ndim == 1 else 's'}){hint}"
        )
    if 0 in shape:
        what = "m and n" if 0 in shape[-2:] else "every batch dimension"
        raise EmptyMatrixError(
            f"{_prefix(caller, name)} is empty: got shape {shape}, but {what} must "
            "be at least 1. Singular values (and every metric) of an empty matrix "
            "are undefined; skip empty matrices before calling."
        )
    if convert:
        t = t.to(compute_dtype(t.dtype, t.device))
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    if check_nonfinite:
        check_finite(t if t.dtype not in _HALF else t.float(), name=name, caller=caller)
    return t


def check_option(value: Any, allowed: Sequence[Any], *, name: str, caller: str) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise DynamicsError."""
    if value not in allowed:
        raise DynamicsError(
            f"{_prefix(caller, name)} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )
    return value


def check_positive_int(value: Any, *, name: str, caller: str, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DynamicsError(
            f"{_prefix(caller, name)} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise DynamicsError(f"{_prefix(caller, name)} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_tolerance(value: Any, *, name: str, caller: str, batch_shape: tuple[int, ...] = ()) -> np.ndarray | None:
    """Validate a non-negative finite tolerance (scalar or batch-shaped array).

    Returns ``None`` for ``None``, else a float64 array broadcastable to
    ``batch_shape``.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DynamicsError(f"{_prefix(caller, name)} must be a non-negative number, got {value!r}") from None
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise DynamicsError(f"{_prefix(caller, name)} must be finite and >= 0, got {value!r}")
    try:
        np.broadcast_shapes(a.shape, batch_shape)
    except ValueError:
        raise ShapeError(
            f"{_prefix(caller, name)} must be a scalar or broadcast to the batch "
            f"shape {batch_shape}, got shape {a.shape}"
        ) from None
    return a


def check_same_batch(a: torch.Tensor, b: torch.Tensor, *, names: tuple[str, str], caller: str, axis: int) -> None:
    """Require ``a.shape[axis] == b.shape[axis]`` (e.g. same number of rows)."""
    if a.shape[axis] != b.shape[axis]:
        raise ShapeError(
            f"{caller}(): arguments `{names[0]}` and `{names[1]}` must have the same "
            f"size along axis {axis}, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def check_compatible_pair(a: torch.Tensor, b: torch.Tensor, *, names: tuple[str, str], caller: str) -> None:
    """Require two matrix batches ``(..., m, n)`` on one device with broadcastable batch dimensions."""
    if a.device != b.device:
        raise DynamicsError(
            f"{caller}(): `{names[0]}` is on {a.device} and `{names[1]}` on {b.device}; move both to the same device"
        )
    try:
        np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"{caller}(): batch dimensions of `{names[0]}` {tuple(a.shape[:-2])} and "
            f"`{names[1]}` {tuple(b.shape[:-2])} do not broadcast"
        ) from None
