"""Update matrices: ``W_t - W_{t-lag}``, per-merge and cumulative updates, LoRA ``s B A``.

Differences are computed in float64 (on CPU; float32 on CUDA unless float64)
and returned in the framework of the first input (numpy in -> numpy out,
torch in -> torch out), in the promoted dtype of the weights but at least
float32 (a bf16/fp16 difference is returned as float32, never rounded to half
precision).  Because a returned difference no longer carries the weights'
original dtype, prefer :func:`update_spectrum` (which records it, so the
default rank tolerance uses the weights' eps) for half-precision weights.

ReLoRA vocabulary (SPEC section 5): the per-merge update ``W_{merge k} -
W_{merge k-1}`` (one cycle's update) has rank <= r; the cumulative update
``W_t - W_0`` shows how merges accumulate rank; the LoRA update of one cycle is
``s B A`` with ``s = alpha / r``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._kernels import SVD_METHODS, finite_or_raise, svdvals
from .spectra import Spectrum, product_spectrum
from .validation import (
    DynamicsError,
    ShapeError,
    as_matrix_batch,
    as_tensor,
    check_compatible_pair,
    check_option,
    check_positive_int,
    compute_dtype,
    dtype_name,
)

__all__ = [
    "weight_update",
    "weight_updates",
    "merge_updates",
    "restart_updates",
    "cumulative_updates",
    "update_spectrum",
    "lora_update",
    "lora_update_spectrum",
]


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    if not dt.is_floating_point or dt in (torch.float16, torch.bfloat16):
        return torch.float32 if dt != torch.float64 else dt
    return dt


def _like(result: torch.Tensor, template: Any, dtype: torch.dtype) -> Any:
    """Return ``result`` as numpy if ``template`` was not a torch tensor."""
    if isinstance(template, torch.Tensor):
        return result.to(dtype)
    return result.to(dtype).cpu().numpy()


def _stack(weights: Any, *, name: str, caller: str) -> tuple[torch.Tensor, Any, torch.dtype]:
    """Validate a trajectory: a sequence of (m, n) matrices or a (T, ..., m, n) array."""
    if isinstance(weights, (list, tuple)):
        if len(weights) < 2:
            raise ShapeError(f"{caller}(): argument `{name}` needs at least 2 matrices, got {len(weights)}")
        ts = [as_tensor(w, name=f"{name}[{i}]", caller=caller) for i, w in enumerate(weights)]
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) != 1:
            raise ShapeError(f"{caller}(): all matrices in `{name}` must have the same shape, got {sorted(shapes)}")
        out_dtype = _result_dtype(*ts)
        template = weights[0]
        stacked = torch.stack([t.to(ts[0].device, compute_dtype(t.dtype, ts[0].device)) for t in ts])
    else:
        t = as_tensor(weights, name=name, caller=caller)
        if t.ndim < 3 or t.shape[0] < 2:
            raise ShapeError(
                f"{caller}(): argument `{name}` must be a sequence of >= 2 matrices or "
                f"an array of shape (T, ..., m, n) with T >= 2, got shape {tuple(t.shape)}"
            )
        out_dtype = _result_dtype(t)
        template = weights
        stacked = t
    x = as_matrix_batch(stacked, name=name, caller=caller)
    return x, template, out_dtype


def _checked_pair(new: Any, old: Any, caller: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``new`` and ``old`` as tensors and as matrix batches, checked for equal shape and one device."""
    tn = as_tensor(new, name="new", caller=caller)
    to = as_tensor(old, name="old", caller=caller)
    if tuple(tn.shape) != tuple(to.shape):
        raise ShapeError(
            f"{caller}(): `new` and `old` must have the same shape, got {tuple(tn.shape)} and {tuple(to.shape)}"
        )
    a = as_matrix_batch(tn, name="new", caller=caller)
    b = as_matrix_batch(to, name="old", caller=caller)
    check_compatible_pair(a, b, names=("new", "old"), caller=caller)
    return tn, to, a, b


def weight_update(new: Any, old: Any) -> Any:
    """``new - old`` for two weight matrices (or batches) of the same shape.

    Parameters
    ----------
    new, old
        ``(..., m, n)`` numpy arrays or torch tensors, e.g. ``W_t`` and ``W_{t-lag}``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Same framework as ``new``; dtype as described in the module docstring.
    """
    caller = "weight_update"
    tn, to, a, b = _checked_pair(new, old, caller)
    dt = torch.promote_types(a.dtype, b.dtype)
    return _like(a.to(dt) - b.to(dt), new, _result_dtype(tn, to))


def weight_updates(weights: Any, *, lag: int = 1) -> Any:
    """Updates along a trajectory: ``W_t - W_{t-lag}`` for ``t = lag .. T-1``.

    Parameters
    ----------
    weights
        A sequence of ``T`` matrices ``(m, n)`` (e.g. one per checkpoint) or an
        array ``(T, ..., m, n)``.
    lag
        Step distance, in entries of ``weights`` (>= 1).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(T - lag, ..., m, n)``; pass it to any metric for a batch of results.
    """
    caller = "weight_updates"
    lag = check_positive_int(lag, name="lag", caller=caller)
    x, template, out_dtype = _stack(weights, name="weights", caller=caller)
    if lag >= x.shape[0]:
        raise ShapeError(f"{caller}(): `lag`={lag} must be smaller than the number of matrices ({x.shape[0]})")
    return _like(x[lag:] - x[:-lag], template, out_dtype)


def merge_updates(merged_weights: Any) -> Any:
    """Per-merge (per ReLoRA cycle) updates ``W_{merge k} - W_{merge k-1}``.

    Parameters
    ----------
    merged_weights
        The effective weight right after each merge, preceded by the weight at
        the start of the first cycle: a sequence of ``K + 1`` matrices or an
        array ``(K + 1, ..., m, n)``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(K, ..., m, n)``.  Each has rank <= r (the LoRA rank) when the merges
        were the only change (frozen base, trainable embeddings aside).
    """
    caller = "merge_updates"
    x, template, out_dtype = _stack(merged_weights, name="merged_weights", caller=caller)
    return _like(x[1:] - x[:-1], template, out_dtype)


#: The former name of :func:`merge_updates`, kept so existing code and notebooks keep working.
restart_updates = merge_updates


def cumulative_updates(weights: Any) -> Any:
    """Cumulative updates ``W_t - W_0`` for ``t = 1 .. T-1``.

    Parameters
    ----------
    weights
        A sequence of ``T`` matrices or an array ``(T, ..., m, n)``; entry 0 is
        the reference ``W_0``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(T - 1, ..., m, n)``.
    """
    caller = "cumulative_updates"
    x, template, out_dtype = _stack(weights, name="weights", caller=caller)
    return _like(x[1:] - x[:1], template, out_dtype)


def update_spectrum(new: Any, old: Any, *, method: str = "auto") -> Spectrum:
    """Spectrum of ``new - old``, recording the weights' dtype (for the rank tolerance).

    Parameters
    ----------
    new, old
        ``(..., m, n)`` of the same shape.
    method
        Singular-value route (see :func:`dynamics.spectrum`).
    """
    caller = "update_spectrum"
    check_option(method, SVD_METHODS, name="method", caller=caller)
    tn, to, a, b = _checked_pair(new, old, caller)
    original = dtype_name(torch.promote_types(tn.dtype, to.dtype))
    dt = torch.promote_types(a.dtype, b.dtype)
    values, route = svdvals(a.to(dt) - b.to(dt), method)
    finite_or_raise(values, caller)
    return Spectrum(values, (a.shape[-2], a.shape[-1]), original, route)


def _check_lora(B: Any, A: Any, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    tb = as_tensor(B, name="B", caller=caller)
    ta = as_tensor(A, name="A", caller=caller)
    if tb.ndim < 2 or ta.ndim < 2 or tb.shape[-1] != ta.shape[-2]:
        raise ShapeError(
            f"{caller}(): expected `B` of shape (..., out, r) and `A` of shape "
            f"(..., r, in) with the same r, got B {tuple(tb.shape)} and A "
            f"{tuple(ta.shape)}. LoRA convention: W (out x in) + s * B @ A"
        )
    return tb, ta


def lora_update(B: Any, A: Any, *, scale: float) -> Any:
    """Dense LoRA update ``scale * B @ A`` (``out x in``), computed in float64.

    Forms the full matrix; for its spectrum use :func:`lora_update_spectrum`,
    which never does.

    Parameters
    ----------
    B
        ``(..., out, r)`` (``lora_b``).
    A
        ``(..., r, in)`` (``lora_a``).
    scale
        ``s = alpha / r``.  Required: merging without it is a known bug.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        Framework of ``B``; float32 at least, float64 if the factors are.
    """
    caller = "lora_update"
    tb, ta = _check_lora(B, A, caller)
    b = as_matrix_batch(tb, name="B", caller=caller)
    a = as_matrix_batch(ta, name="A", caller=caller)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise DynamicsError(f"{caller}(): `scale` must be a real number, got {scale!r}") from None
    dt = torch.promote_types(a.dtype, b.dtype)
    return _like(s * (b.to(dt) @ a.to(dt)), B, _result_dtype(tb, ta))


def lora_update_spectrum(B: Any, A: Any, *, scale: float) -> Spectrum:
    """Spectrum of the LoRA update ``scale * B @ A`` from the factors.

    QR of ``B`` (out x r) and of ``A^T`` (in x r), then the SVD of the r x r
    core; ``B @ A`` is never formed.  The Spectrum has ``shape = (out, in)``
    and ``min(out, in, r)`` stored values (the rest are exact zeros), so
    ``proportional_effective_rank`` divides by ``min(out, in)``.

    Parameters
    ----------
    B
        ``(..., out, r)``.
    A
        ``(..., r, in)``.
    scale
        ``s = alpha / r``.
    """
    caller = "lora_update_spectrum"
    tb, ta = _check_lora(B, A, caller)
    return product_spectrum(tb, ta, scale=scale, names=("B", "A"), caller=caller)
