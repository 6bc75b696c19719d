"""Representation similarity by canonical correlation: SVCCA and PWCCA.

Both compare two activation matrices recorded on the **same tokens**: ``X``
``(n, p)`` and ``Y`` ``(n, q)``, rows are tokens (or positions), columns
features (neurons); ``p`` and ``q`` may differ. Notation: ``Xc``, ``Yc`` are
the views centred over tokens (each feature minus its mean).

Canonical correlation analysis (CCA)
    finds unit-variance directions ``h_i = Xc a_i`` and ``g_i = Yc b_i`` (the
    canonical variates), mutually uncorrelated within each view, that
    maximise ``ρ_i = corr(h_i, g_i)`` in turn. Computed stably without
    covariance inverses: ``Xc = Q₁R₁`` (QR), ``R₁ = U₁S₁V₁ᵀ`` (SVD of the
    small ``p × p`` factor, which also reveals the rank), so ``B₁ = Q₁U₁``
    (columns with ``S₁`` above ``s₁·max(n, p)·eps``) is an orthonormal basis of
    the column space of ``Xc``; likewise ``B₂``. Then ``B₁ᵀB₂ = U Σ Vᵀ`` gives
    the canonical correlations ``ρ = diag(Σ)`` (clipped to ``[0, 1]``; there
    are ``c = min(rank Xc, rank Yc)`` of them) and the variates
    ``h_i = B₁ u_i`` (unit norm).

SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, "SVCCA: Singular Vector Canonical Correlation Analysis")
    reduce each centred view to its top singular directions holding a
    fraction ``keep`` (default 0.99) of its variance ``Σ s²``, then take the
    **mean** canonical correlation of the reduced views:
    ``SVCCA = (1/c') Σᵢ ρ'_i``, ``c' = min(k₁, k₂)``.

PWCCA (Morcos, Raghu & Bengio 2018, "Insights on representational similarity in neural networks with canonical correlation")
    the canonical correlations of the full views weighted by how much of the
    first view each canonical direction accounts for:
    ``PWCCA = Σᵢ αᵢ ρᵢ`` with ``α̃ᵢ = Σⱼ |⟨h_i, x_j⟩|`` over the centred
    neurons ``x_j`` (columns of ``Xc``) and ``αᵢ = α̃ᵢ / Σₖ α̃ₖ`` (``i = 1..c``).
    It is **not** symmetric: the weights come from ``X``.

Both lie in ``[0, 1]``: 1 when one view is an invertible linear map of the
other (for SVCCA exactly so when the reduction keeps every direction,
``keep = 1``: the SVD step is invariant to orthogonal maps and isotropic
scaling only), about 0 for independent data with enough tokens.

**Tokens ≫ features.** Because CCA is invariant to every invertible linear
map of a view (unlike CKA), it finds correlations in any data when the
token count ``n`` is not large against the feature count: with ``n <= p``
the centred view spans every centred direction and every canonical
correlation is 1 whatever the data. For independent Gaussian views the
largest spurious correlation is about ``√(p/n) + √(q/n)`` (Wachter 1980).
Hence ``n <= max(p, q)`` raises :class:`~dynamics.validation.ShapeError` and
``n < MIN_TOKENS_PER_FEATURE · max(p, q)`` emits a
:class:`~dynamics.validation.DynamicsWarning`.

Computed in torch on the inputs' device (float64 on CPU, float32 on CUDA
unless the input is float64). Imports only numpy, torch and :mod:`dynamics`'
maths core.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ._lru import BoundedLRU
from .validation import (
    DynamicsError,
    DynamicsWarning,
    ShapeError,
    as_matrix_batch,
    check_compatible_pair,
    check_same_batch,
)

__all__ = [
    "MIN_TOKENS_PER_FEATURE",
    "SVCCA_KEEP",
    "canonical_correlations",
    "svcca",
    "pwcca",
    "cca_metrics",
]

#: below ``MIN_TOKENS_PER_FEATURE * max(p, q)`` tokens SVCCA/PWCCA warn (spurious correlations inflate them).
MIN_TOKENS_PER_FEATURE = 5.0
#: the fraction of each view's variance the SVCCA reduction keeps (Raghu et al. 2017).
SVCCA_KEEP = 0.99


def _views(X: Any, Y: Any, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` (n, p) and ``Y`` (n, q) in one compute dtype on one device, checked for the tokens ≫ features rule."""
    x = as_matrix_batch(X, name="X", caller=caller, exact_ndim=2)
    y = as_matrix_batch(Y, name="Y", caller=caller, exact_ndim=2)
    check_same_batch(x, y, names=("X", "Y"), caller=caller, axis=-2)
    check_compatible_pair(x, y, names=("X", "Y"), caller=caller)
    n, features = x.shape[0], max(x.shape[1], y.shape[1])
    if n <= features:
        raise ShapeError(
            f"{caller}(): {n} tokens (rows) for {x.shape[1]} and {y.shape[1]} features: CCA needs more tokens "
            "than features (with n <= features every canonical correlation is 1 whatever the data); "
            f"use at least {math.ceil(MIN_TOKENS_PER_FEATURE * features)} tokens, or fewer features"
        )
    if n < MIN_TOKENS_PER_FEATURE * features:
        warnings.warn(
            f"{caller}(): only {n} tokens for {features} features (< {MIN_TOKENS_PER_FEATURE:g}x): canonical "
            f"correlations of unrelated data reach about sqrt(p/n) + sqrt(q/n) = "
            f"{math.sqrt(x.shape[1] / n) + math.sqrt(y.shape[1] / n):.2f}, so the similarity is inflated",
            DynamicsWarning,
            stacklevel=3,
        )
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(dt)


def _basis(x: torch.Tensor, name: str, caller: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the centred view's column space and the neurons' coordinates in it.

    ``x`` is ``(n, p)`` with ``n > p``. Returns ``B`` ``(n, r)`` (columns ordered by
    singular value, descending), ``C`` ``(r, p)`` with ``Xc = B C``, and the ``r``
    non-zero singular values ``s`` of ``Xc`` (``r`` its numerical rank).
    """
    xc = x - x.mean(dim=0, keepdim=True)
    q, r_factor = torch.linalg.qr(xc)
    u, s, vh = torch.linalg.svd(r_factor)
    tol = s[0] * max(x.shape) * torch.finfo(x.dtype).eps
    rank = int((s > tol).sum())
    if rank == 0:
        raise DynamicsError(
            f"{caller}(): argument `{name}` is constant over its rows (zero after centring), so canonical "
            "correlations are undefined; check that the activations vary across tokens"
        )
    return q @ u[:, :rank], s[:rank, None] * vh[:rank], s[:rank]


#: Bytes of the bases :func:`_cached_basis` keeps (least recently used dropped first).
BASIS_CACHE_BYTES = 64 << 20
_BASES: BoundedLRU[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = BoundedLRU(
    lambda: BASIS_CACHE_BYTES, lambda basis: sum(t.numel() * t.element_size() for t in basis)
)


def _cached_basis(x: torch.Tensor, name: str, caller: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_basis` of ``x``, remembered by content for CPU tensors (an analysis compares each step's activations
    with the previous and the final step's, and with the other run's: each view is decomposed once, not per pair).

    The key is the sha1 of the tensor's bytes (hashed in place, no copy) with its shape and dtype, so equal content gives the same (identical)
    result; at most :data:`BASIS_CACHE_BYTES` of bases are kept. Other devices are not cached.
    """
    if x.device.type != "cpu":
        return _basis(x, name, caller)
    import hashlib

    data = x.detach().contiguous().numpy()
    # sha1 of the buffer itself (no bytes copy); measured faster than blake2b/md5 on this data
    key = hashlib.sha1(data.data).digest() + repr((tuple(x.shape), str(x.dtype))).encode()
    hit = _BASES.get(key)
    if hit is not None:
        return hit
    out = _basis(x, name, caller)
    _BASES.put(key, out)
    return out


def _correlations(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, ρ)`` of ``m = b1ᵀ b2 = U diag(ρ) Vᵀ`` (``(r1, r2)``): left singular vectors ``(r1, c)`` and ρ in [0, 1]."""
    u, rho, _ = torch.linalg.svd(m, full_matrices=False)
    return u, rho.clamp(0.0, 1.0)


def _correlation_values(m: torch.Tensor) -> torch.Tensor:
    """ρ of ``m = b1ᵀ b2`` (``(r1, r2)``) clipped to [0, 1], descending: singular values only (no vectors)."""
    rho: torch.Tensor = torch.linalg.svdvals(m).clamp(0.0, 1.0)
    return rho


def _kept(s: torch.Tensor, keep: float) -> int:
    """Smallest ``k`` whose top-``k`` directions hold a fraction ``keep`` of ``Σ s²`` (at least 1)."""
    e = (s / s[0]).to("cpu", torch.float64).numpy() ** 2
    frac = np.cumsum(e) / e.sum()
    return min(int(np.searchsorted(frac, keep - 1e-12)) + 1, len(e))


def _check_keep(keep: Any, caller: str) -> float:
    try:
        k = float(keep)
    except (TypeError, ValueError):
        raise DynamicsError(f"{caller}(): argument `keep` must be a number in (0, 1], got {keep!r}") from None
    if not 0.0 < k <= 1.0:
        raise DynamicsError(f"{caller}(): argument `keep` must be in (0, 1] (a fraction of variance), got {keep!r}")
    return k


def _svcca(m: torch.Tensor, k1: int, k2: int) -> float:
    """SVCCA from ``m = b1ᵀ b2`` (at least ``(k1, k2)``; bases ordered by singular value): the reduced
    views' cross product ``b1[:, :k1]ᵀ b2[:, :k2]`` is the top-left block of ``m``."""
    rho = _correlation_values(m[:k1, :k2])
    return float(rho.double().mean())


def _pwcca(m: torch.Tensor, c1: torch.Tensor) -> float:
    """PWCCA from ``m = b1ᵀ b2`` (``(r1, r2)``) and the neurons' coordinates ``c1`` (``(r1, p)``, ``Xc = b1 c1``)."""
    u, rho = _correlations(m)
    # <h_i, x_j> = u_iᵀ B1ᵀ x_j = (Uᵀ C1)_ij, since Xc = B1 C1 and h_i = B1 u_i
    alpha = (u.mT @ c1).abs().sum(dim=-1).double()
    return float((alpha * rho.double()).sum() / alpha.sum())


def canonical_correlations(X: Any, Y: Any) -> np.ndarray:
    """Canonical correlations ``ρ₁ ≥ … ≥ ρ_c`` of two views on the same tokens (see the module docstring).

    Parameters
    ----------
    X
        ``(n, p)`` activations; rows are tokens.
    Y
        ``(n, q)``; the same ``n`` tokens, in the same order.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(c,)``, ``c = min(rank Xc, rank Yc)``, descending, in ``[0, 1]``.

    Raises
    ------
    ShapeError
        Not 2-D, different token counts, or ``n <= max(p, q)``.
    DynamicsError
        A view is constant over tokens.
    """
    caller = "canonical_correlations"
    x, y = _views(X, Y, caller)
    b1, _, _ = _basis(x, "X", caller)
    b2, _, _ = _basis(y, "Y", caller)
    rho = _correlation_values(b1.mT @ b2)
    out: np.ndarray = rho.to("cpu", torch.float64).numpy()
    return out


def svcca(X: Any, Y: Any, *, keep: float = SVCCA_KEEP) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation of the SVD-reduced views.

    Each centred view ``Xc = U S Vᵀ`` is reduced to its top ``k`` singular
    directions, ``k`` the smallest with ``Σ_{i≤k} s_i² ≥ keep · Σ s²``; then
    ``SVCCA = (1/min(k₁, k₂)) Σᵢ ρᵢ`` over the canonical correlations ``ρ`` of
    the reduced views (computed as in the module docstring).

    Parameters
    ----------
    X
        ``(n, p)`` activations, rows are tokens.
    Y
        ``(n, q)`` on the same tokens, in the same order.
    keep
        Fraction of each view's variance kept, in ``(0, 1]`` (default 0.99).

    Returns
    -------
    float
        In ``[0, 1]``. 1 for ``Y = X A`` with ``A`` orthogonal (times a scale);
        with ``keep = 1``, for any invertible ``A``. Near 0 for independent data
        with ``n ≫ p, q``. Symmetric in ``X`` and ``Y``.

    Raises
    ------
    ShapeError
        Not 2-D, different token counts, or ``n <= max(p, q)``.
    DynamicsError
        A view is constant over tokens, or ``keep`` is not in ``(0, 1]``.

    Warns
    -----
    DynamicsWarning
        ``n < MIN_TOKENS_PER_FEATURE · max(p, q)``: the value is inflated by spurious correlations.

    Examples
    --------
    >>> import torch, dynamics
    >>> X = torch.randn(1000, 8, dtype=torch.float64)
    >>> Q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
    >>> round(dynamics.svcca(X, X @ Q), 9)
    1.0
    """
    caller = "svcca"
    k = _check_keep(keep, caller)
    x, y = _views(X, Y, caller)
    b1, _, s1 = _basis(x, "X", caller)
    b2, _, s2 = _basis(y, "Y", caller)
    k1, k2 = _kept(s1, k), _kept(s2, k)
    return _svcca(b1[:, :k1].mT @ b2[:, :k2], k1, k2)


def pwcca(X: Any, Y: Any) -> float:
    """PWCCA similarity (Morcos et al. 2018): canonical correlations weighted by their share of ``X``.

    ``PWCCA = Σᵢ αᵢ ρᵢ``, ``αᵢ = α̃ᵢ / Σₖ α̃ₖ``, ``α̃ᵢ = Σⱼ |⟨h_i, x_j⟩|``:
    ``ρᵢ`` the canonical correlations of the centred views, ``h_i`` the
    unit-norm canonical variates of ``X`` (vectors over tokens), ``x_j`` the
    centred neurons (columns) of ``X``. Directions that account for much of
    ``X`` count more; noise directions with low correlation count less.

    Parameters
    ----------
    X
        ``(n, p)`` activations, rows are tokens; the weights come from this view.
    Y
        ``(n, q)`` on the same tokens, in the same order.

    Returns
    -------
    float
        In ``[0, 1]``. 1 when ``Y = X A`` for any invertible ``A`` (and when
        ``X = Y A``); near 0 for independent data with ``n ≫ p, q``. Not
        symmetric: ``pwcca(X, Y) != pwcca(Y, X)`` in general.

    Raises
    ------
    ShapeError
        Not 2-D, different token counts, or ``n <= max(p, q)``.
    DynamicsError
        A view is constant over tokens.

    Warns
    -----
    DynamicsWarning
        ``n < MIN_TOKENS_PER_FEATURE · max(p, q)``: the value is inflated by spurious correlations.
    """
    caller = "pwcca"
    x, y = _views(X, Y, caller)
    b1, c1, _ = _basis(x, "X", caller)
    b2, _, _ = _basis(y, "Y", caller)
    return _pwcca(b1.mT @ b2, c1)


def cca_metrics(X: Any, Y: Any, *, keep: float = SVCCA_KEEP) -> dict[str, float]:
    """``{"svcca": svcca(X, Y, keep=keep), "pwcca": pwcca(X, Y)}`` from one decomposition of each view."""
    caller = "cca_metrics"
    k = _check_keep(keep, caller)
    x, y = _views(X, Y, caller)
    b1, c1, s1 = _cached_basis(x, "X", caller)
    b2, _, s2 = _cached_basis(y, "Y", caller)
    m = b1.mT @ b2  # one (r1, r2) cross product for both metrics
    return {"svcca": _svcca(m, _kept(s1, k), _kept(s2, k)), "pwcca": _pwcca(m, c1)}
