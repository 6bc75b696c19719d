"""Model components: per-head OV / QK circuits (with GQA), SwiGLU and whole-layer views.

Weight conventions (torch ``nn.Linear`` layout, ``out x in``; ``d = d_model``,
``H = n_heads``, ``G = n_kv_heads``, ``hd = head_dim``)::

    w_q : (H * hd, d)     w_k, w_v : (G * hd, d)     w_o : (d, H * hd)
    w_gate, w_up : (hidden, d)                        w_down : (d, hidden)

Query head ``h`` uses KV head ``g = h // (H // G)`` (grouped-query attention).

* OV circuit of head ``h``: ``W_O^h @ W_V^g`` with ``W_O^h = w_o[:, h*hd:(h+1)*hd]``
  (d x hd) and ``W_V^g = w_v[g*hd:(g+1)*hd, :]`` (hd x d): a ``d x d`` matrix of
  rank <= hd that maps the residual stream read by the head to what it writes.
  The order matters: ``W_V^h W_O^h`` (hd x hd) is a different matrix.
* QK circuit of head ``h``: ``W_Q^h^T @ W_K^g`` (d x d, rank <= hd), the
  bilinear form of the attention score ``x_q^T (W_Q^h^T W_K^g) x_k``.

The ``*_spectra`` functions get the non-zero singular values from the factors
(QR of each factor, SVD of the hd x hd core; each KV head's QR is done once
and shared by its query group) without forming the d x d matrices.  The
returned :class:`~dynamics.Spectrum` has ``shape = (d, d)`` and batch shape
``(..., H)``; it stores ``hd`` values, the other ``d - hd`` being exact zeros.
Hence ``condition_number`` is ``inf`` (the circuit is rank-deficient by
construction; use ``truncated_condition_number``) and
``proportional_effective_rank`` divides by ``d`` (so it is <= hd / d);
divide ``effective_rank`` by ``hd`` for a per-head-dimension fraction.

All functions accept leading batch dimensions (e.g. layers stacked as
``(L, H * hd, d)``).
"""

from __future__ import annotations

from typing import Any

import torch

from ._kernels import direct_svdvals, finite_or_raise, r_factor
from .spectra import Spectrum
from .validation import (
    DynamicsError,
    ShapeError,
    as_matrix_batch,
    as_tensor,
    check_compatible_pair,
    check_positive_int,
    dtype_name,
)

__all__ = [
    "kv_head_index",
    "split_heads",
    "ov_circuit",
    "qk_circuit",
    "ov_circuit_spectra",
    "qk_circuit_spectra",
    "attention_views",
    "mlp_views",
    "layer_views",
]


# --------------------------------------------------------------------------- helpers


def _check_heads(n_heads: Any, n_kv_heads: Any, caller: str) -> tuple[int, int]:
    h = check_positive_int(n_heads, name="n_heads", caller=caller)
    g = check_positive_int(n_kv_heads, name="n_kv_heads", caller=caller)
    if h % g:
        raise DynamicsError(
            f"{caller}(): `n_heads`={h} must be a multiple of `n_kv_heads`={g} "
            "(grouped-query attention shares each KV head by n_heads // n_kv_heads "
            "query heads)"
        )
    return h, g


def kv_head_index(head: int, *, n_heads: int, n_kv_heads: int) -> int:
    """KV head used by query head ``head``: ``head // (n_heads // n_kv_heads)``."""
    caller = "kv_head_index"
    h, g = _check_heads(n_heads, n_kv_heads, caller)
    return _head_index(head, h, caller) // (h // g)


def _groups(h: int, g: int) -> torch.Tensor:
    return torch.arange(h) // (h // g)


def _framework(result: torch.Tensor, template: Any) -> Any:
    return result if isinstance(template, torch.Tensor) else result.cpu().numpy()


def _head_dim(size: int, n: int, *, name: str, axis_name: str, caller: str, shape: tuple[int, ...]) -> int:
    if size % n:
        raise ShapeError(
            f"{caller}(): `{name}` has shape {shape}; its {axis_name} dimension ({size}) "
            f"must be a multiple of the number of heads ({n})"
        )
    return size // n


def split_heads(w: Any, *, n_heads: int, axis: str = "out") -> Any:
    """Split a projection into per-head blocks.

    Parameters
    ----------
    w
        ``(..., n_heads * hd, d)`` for ``axis='out'`` (q, k, v: heads along the
        output rows) or ``(..., d, n_heads * hd)`` for ``axis='in'`` (o: heads
        along the input columns).
    n_heads
        Number of heads in ``w`` (use ``n_kv_heads`` for k and v).
    axis
        ``'out'`` or ``'in'``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(..., n_heads, hd, d)`` for ``'out'``, ``(..., n_heads, d, hd)`` for
        ``'in'`` (a view where possible; original dtype).
    """
    caller = "split_heads"
    n = check_positive_int(n_heads, name="n_heads", caller=caller)
    t = as_matrix_batch(w, name="w", caller=caller, convert=False, check_nonfinite=False)
    if axis == "out":
        hd = _head_dim(t.shape[-2], n, name="w", axis_name="row (output)", caller=caller, shape=tuple(t.shape))
        out = t.reshape(*t.shape[:-2], n, hd, t.shape[-1])
    elif axis == "in":
        hd = _head_dim(t.shape[-1], n, name="w", axis_name="column (input)", caller=caller, shape=tuple(t.shape))
        out = t.reshape(*t.shape[:-1], n, hd).movedim(-2, -3)
    else:
        raise DynamicsError(f"{caller}(): `axis` must be 'out' or 'in', got {axis!r}")
    return _framework(out, w)


def _validate_pair(
    w_read: Any,
    w_kv: Any,
    *,
    n_heads: int,
    n_kv_heads: int,
    names: tuple[str, str],
    read_axis: str,
    caller: str,
) -> tuple[torch.Tensor, torch.Tensor, int, int, int, str]:
    """Validate (w_o, w_v) or (w_q, w_k); return tensors, H, G, hd, original dtype."""
    h, g = _check_heads(n_heads, n_kv_heads, caller)
    ta = as_tensor(w_read, name=names[0], caller=caller)
    tb = as_tensor(w_kv, name=names[1], caller=caller)
    original = dtype_name(torch.promote_types(ta.dtype, tb.dtype))
    a = as_matrix_batch(ta, name=names[0], caller=caller)
    b = as_matrix_batch(tb, name=names[1], caller=caller)
    if read_axis == "in":  # w_o: (d, H*hd)
        d = a.shape[-2]
        hd = _head_dim(a.shape[-1], h, name=names[0], axis_name="column (input)", caller=caller, shape=tuple(a.shape))
        expect_a = f"(d, n_heads*hd) = ({d}, {h}*{hd})"
    else:  # w_q: (H*hd, d)
        d = a.shape[-1]
        hd = _head_dim(a.shape[-2], h, name=names[0], axis_name="row (output)", caller=caller, shape=tuple(a.shape))
        expect_a = f"(n_heads*hd, d) = ({h}*{hd}, {d})"
    if tuple(b.shape[-2:]) != (g * hd, d):
        raise ShapeError(
            f"{caller}(): `{names[1]}` must have shape (n_kv_heads*hd, d) = "
            f"({g}*{hd}, {d}) = {(g * hd, d)} to match `{names[0]}` of shape "
            f"{tuple(a.shape)} {expect_a}; got {tuple(b.shape)}"
        )
    check_compatible_pair(a, b, names=names, caller=caller)
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt), h, g, hd, original


def _head_index(head: Any, h: int, caller: str) -> int:
    """``head`` as an int in ``[0, h)``, or a DynamicsError naming ``caller``."""
    index = check_positive_int(head, name="head", caller=caller, minimum=0)
    if index >= h:
        raise DynamicsError(f"{caller}(): `head`={index} must be < n_heads={h}")
    return index


# --------------------------------------------------------------------------- circuits


def ov_circuit(w_o: Any, w_v: Any, *, head: int, n_heads: int, n_kv_heads: int) -> Any:
    """Dense OV circuit ``W_O^h @ W_V^g`` (d x d) of query head ``head``.

    Parameters
    ----------
    w_o
        ``(..., d, n_heads * hd)``.
    w_v
        ``(..., n_kv_heads * hd, d)``.
    head
        Query head index ``h``; the KV head is ``g = h // (n_heads // n_kv_heads)``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(..., d, d)``, computed in float64 on CPU; framework of ``w_o``.
    """
    caller = "ov_circuit"
    o, v, h, g, hd, _ = _validate_pair(
        w_o,
        w_v,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        names=("w_o", "w_v"),
        read_axis="in",
        caller=caller,
    )
    hh = _head_index(head, h, caller)
    gg = hh // (h // g)
    out = o[..., :, hh * hd : (hh + 1) * hd] @ v[..., gg * hd : (gg + 1) * hd, :]
    return _framework(out, w_o)


def qk_circuit(w_q: Any, w_k: Any, *, head: int, n_heads: int, n_kv_heads: int) -> Any:
    """Dense QK circuit ``W_Q^h^T @ W_K^g`` (d x d) of query head ``head``.

    Parameters
    ----------
    w_q
        ``(..., n_heads * hd, d)``.
    w_k
        ``(..., n_kv_heads * hd, d)``.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(..., d, d)``; framework of ``w_q``.
    """
    caller = "qk_circuit"
    q, k, h, g, hd, _ = _validate_pair(
        w_q,
        w_k,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        names=("w_q", "w_k"),
        read_axis="out",
        caller=caller,
    )
    hh = _head_index(head, h, caller)
    gg = hh // (h // g)
    out = q[..., hh * hd : (hh + 1) * hd, :].mT @ k[..., gg * hd : (gg + 1) * hd, :]
    return _framework(out, w_q)


def _circuit_spectra(
    left_heads: torch.Tensor, right_groups_t: torch.Tensor, h: int, g: int, d: int, original: str, caller: str
) -> Spectrum:
    """left_heads (..., H, d, hd); right_groups_t (..., G, d, hd) = transposed right factors."""
    r_left = r_factor(left_heads)  # (..., H, hd', hd)
    r_right = r_factor(right_groups_t)  # (..., G, hd', hd): one QR per KV head
    r_right = r_right.index_select(-3, _groups(h, g).to(r_right.device))  # (..., H, hd', hd)
    values = direct_svdvals(r_left @ r_right.mT)  # (..., H, hd')
    finite_or_raise(values, caller)
    return Spectrum(values, (d, d), original, "factored")


def ov_circuit_spectra(w_o: Any, w_v: Any, *, n_heads: int, n_kv_heads: int) -> Spectrum:
    """Spectra of all per-head OV circuits ``W_O^h @ W_V^g``, from the factors.

    Parameters
    ----------
    w_o
        ``(..., d, n_heads * hd)``.
    w_v
        ``(..., n_kv_heads * hd, d)``.

    Returns
    -------
    Spectrum
        Batch shape ``(..., n_heads)``, ``shape = (d, d)``, ``hd`` stored values
        per head (see the module docstring for what that implies).

    Examples
    --------
    >>> import torch, dynamics
    >>> w_v, w_o = torch.randn(4 * 32, 384), torch.randn(384, 12 * 32)
    >>> s = dynamics.ov_circuit_spectra(w_o, w_v, n_heads=12, n_kv_heads=4)
    >>> s.batch_shape, s.shape
    ((12,), (384, 384))
    """
    caller = "ov_circuit_spectra"
    o, v, h, g, hd, original = _validate_pair(
        w_o,
        w_v,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        names=("w_o", "w_v"),
        read_axis="in",
        caller=caller,
    )
    d = o.shape[-2]
    o_heads = o.reshape(*o.shape[:-1], h, hd).movedim(-2, -3)  # (..., H, d, hd)
    v_groups_t = v.reshape(*v.shape[:-2], g, hd, d).mT  # (..., G, d, hd)
    return _circuit_spectra(o_heads, v_groups_t, h, g, d, original, caller)


def qk_circuit_spectra(w_q: Any, w_k: Any, *, n_heads: int, n_kv_heads: int) -> Spectrum:
    """Spectra of all per-head QK circuits ``W_Q^h^T @ W_K^g``, from the factors.

    Parameters
    ----------
    w_q
        ``(..., n_heads * hd, d)``.
    w_k
        ``(..., n_kv_heads * hd, d)``.

    Returns
    -------
    Spectrum
        Batch shape ``(..., n_heads)``, ``shape = (d, d)``, ``hd`` stored values.
    """
    caller = "qk_circuit_spectra"
    q, k, h, g, hd, original = _validate_pair(
        w_q,
        w_k,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        names=("w_q", "w_k"),
        read_axis="out",
        caller=caller,
    )
    d = q.shape[-1]
    q_heads_t = q.reshape(*q.shape[:-2], h, hd, d).mT  # (..., H, d, hd)
    k_groups_t = k.reshape(*k.shape[:-2], g, hd, d).mT  # (..., G, d, hd)
    return _circuit_spectra(q_heads_t, k_groups_t, h, g, d, original, caller)


# --------------------------------------------------------------------------- views


def _cat(parts: list[tuple[str, Any]], dim: int, caller: str) -> tuple[torch.Tensor, Any]:
    ts = [as_matrix_batch(p, name=n, caller=caller, convert=False, check_nonfinite=False) for n, p in parts]
    other = -1 if dim == -2 else -2
    sizes = {tuple(t.shape[:-2]) + (t.shape[other],) for t in ts}
    if len(sizes) != 1:
        raise ShapeError(
            f"{caller}(): cannot concatenate "
            + ", ".join(f"`{n}` {tuple(t.shape)}" for (n, _), t in zip(parts, ts))
            + f" along dim {dim}: the batch and the {'input' if dim == -2 else 'output'} "
            "dimensions must agree"
        )
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.cat([t.to(dt) for t in ts], dim=dim), parts[0][1]


def attention_views(w_q: Any, w_k: Any, w_v: Any, w_o: Any) -> dict[str, Any]:
    """Whole-attention views: each projection and the concatenated ``qkv``.

    Returns
    -------
    dict
        ``{'q', 'k', 'v', 'o'}`` unchanged and ``'qkv'``: ``[w_q; w_k; w_v]``
        stacked along the output rows, ``((H + 2G) * hd, d)``: everything the
        attention reads from the residual stream.
    """
    qkv, tmpl = _cat([("w_q", w_q), ("w_k", w_k), ("w_v", w_v)], -2, "attention_views")
    return {"q": w_q, "k": w_k, "v": w_v, "o": w_o, "qkv": _framework(qkv, tmpl)}


def mlp_views(w_gate: Any, w_up: Any, w_down: Any) -> dict[str, Any]:
    """SwiGLU matrices ``down(silu(gate x) * up x)`` and the concatenated ``gate_up``.

    Returns
    -------
    dict
        ``{'gate', 'up', 'down'}`` unchanged and ``'gate_up'``: ``[w_gate; w_up]``
        stacked along the output rows, ``(2 * hidden, d)``.
    """
    gu, tmpl = _cat([("w_gate", w_gate), ("w_up", w_up)], -2, "mlp_views")
    return {"gate": w_gate, "up": w_up, "down": w_down, "gate_up": _framework(gu, tmpl)}


def layer_views(w_q: Any, w_k: Any, w_v: Any, w_o: Any, w_gate: Any, w_up: Any, w_down: Any) -> dict[str, Any]:
    """Every view of one decoder layer.

    Returns
    -------
    dict
        The entries of :func:`attention_views` and :func:`mlp_views`, plus
        ``'read'``: all matrices reading the residual stream stacked along
        rows, ``[w_q; w_k; w_v; w_gate; w_up]`` (``((H+2G)*hd + 2*hidden, d)``),
        and ``'write'``: all matrices writing to it side by side along
        columns, ``[w_o, w_down]`` (``(d, H*hd + hidden)``).
    """
    caller = "layer_views"
    out = attention_views(w_q, w_k, w_v, w_o)
    out.update(mlp_views(w_gate, w_up, w_down))
    read, tmpl = _cat([("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_gate", w_gate), ("w_up", w_up)], -2, caller)
    write, tmpl_w = _cat([("w_o", w_o), ("w_down", w_down)], -1, caller)
    out["read"] = _framework(read, tmpl)
    out["write"] = _framework(write, tmpl_w)
    return out
