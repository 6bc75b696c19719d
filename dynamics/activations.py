"""Activation metrics: effective rank (centred or not), anisotropy, linear CKA.

SVCCA and PWCCA (canonical-correlation similarity, invariant to every invertible
linear map, so they need tokens >> features) are in :mod:`dynamics.similarity`.

Activations are ``(tokens, features)`` matrices (rows are tokens / positions),
or batches ``(..., tokens, features)``.  All computations run in float64 on
CPU (float32 on CUDA unless float64); half-precision inputs are upcast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._kernels import SVD_METHODS, Result, as_result, finite_or_raise, svdvals
from .spectra import Spectrum
from .validation import (
    DynamicsError,
    ShapeError,
    as_matrix_batch,
    as_tensor,
    check_compatible_pair,
    check_option,
    check_same_batch,
    dtype_name,
)

__all__ = [
    "activation_spectrum",
    "activation_effective_rank",
    "anisotropy",
    "linear_cka",
    "debiased_linear_cka",
]


def activation_spectrum(X: Any, *, center: bool = True, method: str = "auto") -> Spectrum:
    """Spectrum of an activation matrix, optionally centred over tokens.

    Parameters
    ----------
    X
        ``(..., tokens, features)``.
    center
        Subtract the per-feature mean over tokens first (default).  Centring
        removes the common offset (which otherwise dominates ``s_1``) and
        lowers the rank by at most one; PER still divides by
        ``min(tokens, features)``.
    method
        Singular-value route (see :func:`dynamics.spectrum`); with tokens >>
        features ``'auto'`` uses the float64 features x features Gram matrix.

    Returns
    -------
    Spectrum
        ``shape = (tokens, features)``; every metric derives from it.
    """
    caller = "activation_spectrum"
    check_option(method, SVD_METHODS, name="method", caller=caller)
    t = as_tensor(X, name="X", caller=caller)
    original = dtype_name(t)
    x = as_matrix_batch(t, name="X", caller=caller)
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
    values, route = svdvals(x, method)
    finite_or_raise(values, caller)
    return Spectrum(values, (x.shape[-2], x.shape[-1]), original, route)


def activation_effective_rank(X: Any, *, center: bool = True, method: str = "auto") -> Result:
    """Effective rank of ``(tokens, features)`` activations (natural log).

    Parameters
    ----------
    X
        ``(..., tokens, features)``.
    center
        Centre each feature over tokens first (default True).

    Returns
    -------
    float or numpy.ndarray
        In ``[1, min(tokens, features)]``; 0 if the (centred) matrix is zero,
        e.g. a single token with ``center=True``.

    Examples
    --------
    >>> import torch, dynamics
    >>> X = torch.randn(2048, 384)
    >>> 300 < dynamics.activation_effective_rank(X) <= 384
    True
    """
    return activation_spectrum(X, center=center, method=method).effective_rank()


def anisotropy(X: Any) -> Result:
    """Mean pairwise cosine similarity of the rows of ``X``, excluding self-pairs.

    ``(||sum_i u_i||**2 - n) / (n (n - 1))`` with ``u_i = x_i / ||x_i||``: the
    same value as averaging the ``n (n - 1)`` off-diagonal cosines, in
    ``O(n d)`` time and memory (no ``n x n`` matrix).  In ``[-1/(n-1), 1]``;
    1 when all rows point the same way, about 0 for random directions.

    Parameters
    ----------
    X
        ``(..., n, d)`` with ``n >= 2`` tokens; every row must be non-zero.

    Raises
    ------
    DynamicsError
        A row has zero norm (its cosine similarity is undefined), or ``n < 2``.
    """
    caller = "anisotropy"
    x = as_matrix_batch(X, name="X", caller=caller)
    n = x.shape[-2]
    if n < 2:
        raise ShapeError(
            f"{caller}(): argument `X` needs at least 2 rows (tokens) for a pairwise "
            f"similarity, got shape {tuple(x.shape)}"
        )
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        zero = torch.nonzero(norms[..., 0] == 0)
        raise DynamicsError(
            f"{caller}(): argument `X` has {zero.shape[0]} all-zero row(s) (first at "
            f"index {tuple(zero[0].tolist())}); cosine similarity is undefined for "
            "them. Drop those rows (e.g. padding positions) first."
        )
    total = (x / norms).sum(dim=-2)
    sq = (total * total).sum(dim=-1)
    value = (sq - n) / (n * (n - 1))
    return as_result(value.to("cpu", torch.float64).numpy().clip(-1.0 / (n - 1), 1.0))


def _paired_activations(X: Any, Y: Any, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` and ``Y`` as ``(..., tokens, features)`` batches: same token count, one device, broadcastable batches."""
    x = as_matrix_batch(X, name="X", caller=caller)
    y = as_matrix_batch(Y, name="Y", caller=caller)
    check_same_batch(x, y, names=("X", "Y"), caller=caller, axis=-2)
    check_compatible_pair(x, y, names=("X", "Y"), caller=caller)
    return x, y


def linear_cka(X: Any, Y: Any, *, route: str = "auto") -> Result:
    """Linear centred kernel alignment (Kornblith et al. 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear kernels on
    column-centred features; equivalently
    ``||Yc^T Xc||_F**2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.

    Parameters
    ----------
    X
        ``(..., n, p)`` activations (rows are the same n tokens in X and Y).
    Y
        ``(..., n, q)``; ``q`` may differ from ``p``.
    route
        ``'features'`` (p x q, p x p, q x q cross-products: cheap when
        ``n >> p, q``), ``'tokens'`` (n x n Gram matrices: cheap when
        ``n << p, q``), or ``'auto'`` (the cheaper by flop count).

    Returns
    -------
    float or numpy.ndarray
        In ``[0, 1]``; invariant to orthogonal transforms and isotropic scaling
        of either argument.

    Raises
    ------
    DynamicsError
        If X or Y is constant over tokens (zero after centring): CKA is
        undefined (0/0) there.
    """
    caller = "linear_cka"
    check_option(route, ("auto", "features", "tokens"), name="route", caller=caller)
    x, y = _paired_activations(X, Y, caller)
    dt = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dt), y.to(dt)
    route = _cka_route(route, x.shape[-2], x.shape[-1], y.shape[-1])
    parts = [_linear_cka_block(xb, yb, route) for xb, yb in _blocks(x, y)]
    return as_result(_linear_cka_value(parts, x, y, caller))


def _linear_cka_value(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], x: torch.Tensor, y: torch.Tensor, caller: str
) -> np.ndarray:
    """:func:`linear_cka` (float64 numpy of the batch shape) from its blocks' ``(CKA, ||Xc||, ||Yc||)``."""
    nx = torch.cat([pt[1].reshape(-1) for pt in parts])
    ny = torch.cat([pt[2].reshape(-1) for pt in parts])
    for name, nrm in (("X", nx), ("Y", ny)):
        if bool((nrm == 0).any()):
            raise DynamicsError(
                f"{caller}(): argument `{name}` is constant over its rows (zero after "
                "centring), so CKA is undefined (0/0); check that the activations "
                "vary across tokens"
            )
    batch = np.broadcast_shapes(tuple(x.shape[:-2]), tuple(y.shape[:-2]))
    value = torch.cat([pt[0].reshape(-1) for pt in parts]).reshape(batch).to("cpu", torch.float64).numpy()
    finite_or_raise(value, caller)
    clipped: np.ndarray = np.clip(value, 0.0, 1.0)
    return clipped


def linear_cka_against(X: Any, Ys: list[Any]) -> list[np.ndarray]:
    """``[linear_cka(X, Y) for Y in Ys]`` (route ``'auto'``; float64 numpy arrays of the batch shape) with ``X``
    centred once and its own kernel (or feature-space) product computed once: the same numbers as the separate
    calls. The ``Ys`` must share one shape (a unit compares a site with its previous and its final capture); else
    the calls are made one by one."""
    if len({tuple(np.shape(y)) for y in Ys}) > 1:
        return [np.asarray(linear_cka(X, y), dtype=np.float64) for y in Ys]
    caller = "linear_cka"
    pairs = [_paired_activations(X, y, caller) for y in Ys]
    if not pairs:
        return []
    dt = torch.promote_types(pairs[0][0].dtype, pairs[0][1].dtype)
    pairs = [(x.to(dt), y.to(dt)) for x, y in pairs]
    x = pairs[0][0]
    route = _cka_route("auto", x.shape[-2], x.shape[-1], pairs[0][1].shape[-1])
    parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in pairs]
    for blocks in zip(*(_blocks(x, y) for _, y in pairs)):
        xc, nx = _centred_scaled(blocks[0][0])
        k = xc @ xc.mT if route == "tokens" else None
        for i, (_, yb) in enumerate(blocks):
            yc, ny = _centred_scaled(yb)
            products = _feature_products(xc, yc) if k is None else _kernel_products(k, yc @ yc.mT)
            parts[i].append(_biased_part(products, nx, ny))
    return [_linear_cka_value(part, x, y, caller) for part, (_, y) in zip(parts, pairs)]


def _cka_route(route: str, n: int, p: int, q: int) -> str:
    """``route`` itself, or for ``'auto'`` the cheaper by flop count for ``n`` tokens of ``p`` and ``q`` features:
    ``'features'`` (three feature-space products, ``n·(pq + p² + q²)``) or ``'tokens'`` (two kernels, ``n²·(p + q)``)."""
    if route != "auto":
        return route
    return "features" if p * q + p * p + q * q <= n * (p + q) else "tokens"


#: Elements of one centred block (tokens x features, summed over the block's matrices) that
#: :func:`linear_cka` and :func:`debiased_linear_cka` centre at a time: a batch is processed a few
#: matrices at a time so the temporaries stay small enough to be reused by the allocator.
_BLOCK_ELEMENTS = 1 << 20
#: Centred views whose Frobenius norms lie in ``[2**-_SAFE_EXP, 2**_SAFE_EXP]`` are used unscaled:
#: every product and squared norm of the CKA formulas then stays far inside the float range.
_SAFE_EXP = 100.0


def _blocks(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``x`` (..., n, p) and ``y`` (..., n, q) into a few matrices at a time (views, no copies).

    Only when both have the same batch shape (no broadcasting); otherwise one block, the whole pair.
    The blocks follow the row-major order of the flattened batch.
    """
    if x.shape[:-2] != y.shape[:-2] or x.ndim == 2:
        return [(x, y)]
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    step = max(1, _BLOCK_ELEMENTS // max(1, n * max(p, q, n)))
    xf = x.reshape(-1, n, p) if x.is_contiguous() else None
    yf = y.reshape(-1, n, q) if y.is_contiguous() else None
    if xf is None or yf is None or step >= xf.shape[0]:
        return [(x, y)]
    return [(xf[i : i + step], yf[i : i + step]) for i in range(0, xf.shape[0], step)]


def _centred_scaled(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Zc, ||Zc||_F)`` of a batch ``z`` (..., n, p): one centred copy ``Zc`` (..., n, p), norms (...).

    When every norm is in ``[2**-_SAFE_EXP, 2**_SAFE_EXP]`` the copy is returned unscaled (the CKA
    ratios are scale invariant); otherwise it is divided in place by its norm (zero norms left as is),
    which keeps the products from overflowing or underflowing.
    """
    zc = z - z.mean(dim=-2, keepdim=True)
    nrm = torch.linalg.matrix_norm(zc)
    lo, hi = 2.0**-_SAFE_EXP, 2.0**_SAFE_EXP
    if not bool(((nrm >= lo) & (nrm <= hi)).all()):
        zc.div_(torch.where(nrm == 0, torch.ones_like(nrm), nrm)[..., None, None])
    return zc, nrm


def _linear_cka_block(x: torch.Tensor, y: torch.Tensor, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Biased linear CKA of a block ``x`` (..., n, p), ``y`` (..., n, q) and the centred views' norms."""
    xc, nx = _centred_scaled(x)
    yc, ny = _centred_scaled(y)
    return _biased_part(_products(xc, yc, route), nx, ny)


def _biased_part(
    products: tuple[torch.Tensor, torch.Tensor, torch.Tensor], nx: torch.Tensor, ny: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's ``(CKA, ||Xc||, ||Yc||)`` for :func:`_linear_cka_value` from its :func:`_products`."""
    hxy, hxx, hyy = products
    return hxy / (hxx * hyy), nx, ny


def _products(xc: torch.Tensor, yc: torch.Tensor, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tr(KL), ||K||_F, ||L||_F)`` (each (...)) of the centred views' linear kernels ``K = Xc Xcᵀ``,
    ``L = Yc Ycᵀ``: from the feature-space products (``tr(KL) = ||Ycᵀ Xc||²_F``, ``||K||_F = ||Xcᵀ Xc||_F``) or
    from the n×n kernels (``route`` ``'features'`` / ``'tokens'``)."""
    if route == "features":
        return _feature_products(xc, yc)
    return _kernel_products(xc @ xc.mT, yc @ yc.mT)


def _feature_products(xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.linalg.matrix_norm(yc.mT @ xc) ** 2,
        torch.linalg.matrix_norm(xc.mT @ xc),
        torch.linalg.matrix_norm(yc.mT @ yc),
    )


def _kernel_products(k: torch.Tensor, l_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (k * l_).sum(dim=(-2, -1)), torch.linalg.matrix_norm(k), torch.linalg.matrix_norm(l_)


def _unbiased_hsic(
    k_diag: torch.Tensor,
    k_rows: torch.Tensor,
    k_total: torch.Tensor,
    kl: torch.Tensor,
    l_diag: torch.Tensor,
    l_rows: torch.Tensor,
    l_total: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """HSIC_1 (Song et al. 2012) from the pieces of K and L with their diagonals removed.

    ``*_diag``: the diagonals (..., n); ``*_rows``: row sums of the zero-diagonal
    kernels (..., n); ``*_total``: their grand sums (...); ``kl``: ``tr(K̃ L̃)`` (...).
    """
    term = kl + k_total * l_total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k_rows * l_rows).sum(dim=-1)
    return term / (n * (n - 3))


def _debiased_block(
    x: torch.Tensor, y: torch.Tensor, n: int, route: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(HSIC_1(K, L), HSIC_1(K, K), HSIC_1(L, L))`` (each (...)) of a block ``x`` (..., n, p), ``y`` (..., n, q).

    ``route`` ``'features'``: from the feature-space products (``tr(KL) = ||Ycᵀ Xc||²_F``, no n×n matrix);
    ``'tokens'``: from the n×n kernels themselves. The views may be unscaled (see :func:`_centred_scaled`); the
    ratio of :func:`debiased_linear_cka` is scale invariant and stays within the float range for the norms kept
    unscaled.
    """
    xc, _ = _centred_scaled(x)
    yc, _ = _centred_scaled(y)
    if route == "tokens":
        return _debiased_from_kernels(xc @ xc.mT, yc @ yc.mT, n)
    return _debiased_from_features(xc, yc, n, _feature_products(xc, yc))


def _debiased_from_features(
    xc: torch.Tensor, yc: torch.Tensor, n: int, products: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_debiased_block`'s three HSIC_1 from the centred views and their :func:`_feature_products`
    (``tr(KL)``, ``||K||_F``, ``||L||_F``: no n×n matrix)."""

    def pieces(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        diag = (z * z).sum(dim=-1)  # K_ii, (..., n)
        rows = z @ z.sum(dim=-2, keepdim=True).mT  # K 1, (..., n, 1)
        rows = rows[..., 0] - diag  # K̃ 1
        return diag, rows, rows.sum(dim=-1)

    kd, kr, kt = pieces(xc)
    ld, lr, lt = pieces(yc)
    kl, k_norm, l_norm = products  # tr(K̃ L̃) = tr(KL) − Σ K_ii L_ii below
    hxy = _unbiased_hsic(kd, kr, kt, kl - (kd * ld).sum(dim=-1), ld, lr, lt, n)
    hxx = _unbiased_hsic(kd, kr, kt, k_norm**2 - (kd * kd).sum(dim=-1), kd, kr, kt, n)
    hyy = _unbiased_hsic(ld, lr, lt, l_norm**2 - (ld * ld).sum(dim=-1), ld, lr, lt, n)
    return hxy, hxx, hyy


def _debiased_from_kernels(
    k: torch.Tensor, l_: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_debiased_block`'s three HSIC_1 from the kernels ``K``, ``L`` (..., n, n) of the centred views."""

    def pieces(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        diag = torch.diagonal(g, dim1=-2, dim2=-1)  # K_ii, (..., n)
        rows = g.sum(dim=-1) - diag  # K̃ 1
        return diag, rows, rows.sum(dim=-1)

    kd, kr, kt = pieces(k)
    ld, lr, lt = pieces(l_)

    def trace(a: torch.Tensor, b: torch.Tensor, ad: torch.Tensor, bd: torch.Tensor) -> torch.Tensor:
        t: torch.Tensor = (a * b).sum(dim=(-2, -1)) - (ad * bd).sum(dim=-1)  # tr(K̃ L̃), K and L symmetric
        return t

    hxy = _unbiased_hsic(kd, kr, kt, trace(k, l_, kd, ld), ld, lr, lt, n)
    hxx = _unbiased_hsic(kd, kr, kt, trace(k, k, kd, kd), kd, kr, kt, n)
    hyy = _unbiased_hsic(ld, lr, lt, trace(l_, l_, ld, ld), ld, lr, lt, n)
    return hxy, hxx, hyy


def debiased_linear_cka(X: Any, Y: Any, *, route: str = "auto") -> Result:
    """Debiased linear CKA: :func:`linear_cka` with the unbiased HSIC estimator (Song et al. 2012).

    ``CKA_1 = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` with linear
    kernels ``K = Xc Xcᵀ``, ``L = Yc Ycᵀ`` on column-centred features and

    ``HSIC_1 = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``,

    ``K̃`` being ``K`` with its diagonal set to zero. The biased estimator of
    :func:`linear_cka` is pulled towards 1 when the feature count is not small
    against the token count ``n`` (independent random features of width
    ``p ≳ n`` give biased CKA near 1); the debiased one is near 0 for them.

    Parameters
    ----------
    X
        ``(..., n, p)`` activations, ``n >= 4`` (rows are the same tokens in X and Y).
    Y
        ``(..., n, q)``.
    route
        ``'features'`` (p x q, p x p, q x q cross-products, no n x n matrix: cheap when ``n >> p, q``),
        ``'tokens'`` (the n x n kernels: cheap when ``n << p, q``; 4x faster for 512 tokens of 1536
        features), or ``'auto'`` (the cheaper by flop count, as :func:`linear_cka` chooses). The routes agree
        to rounding.

    Returns
    -------
    float or numpy.ndarray
        Near 1 for the same representation up to rotation and scale; near 0 for
        unrelated ones; may be slightly negative (it is an unbiased estimate, not
        clipped).

    Raises
    ------
    DynamicsError
        ``n < 4``, or ``HSIC_1(K, K) <= 0`` for either argument (constant
        features, or too few tokens for the estimate): undefined, never NaN.
    """
    caller = "debiased_linear_cka"
    check_option(route, ("auto", "features", "tokens"), name="route", caller=caller)
    x, y, n = _debiased_inputs(X, Y, caller)
    route = _cka_route(route, n, x.shape[-1], y.shape[-1])
    parts = [_debiased_block(xb, yb, n, route) for xb, yb in _blocks(x, y)]
    return as_result(_debiased_value(parts, x, y, caller))


def _debiased_inputs(X: Any, Y: Any, caller: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``X``, ``Y`` validated and in one dtype (:func:`_paired_activations`), and their token count ``n >= 4``."""
    x, y = _paired_activations(X, Y, caller)
    n = x.shape[-2]
    if n < 4:
        raise DynamicsError(f"{caller}(): the unbiased HSIC estimator needs at least 4 rows (tokens), got {n}")
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(dt), n


def _debiased_value(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], x: torch.Tensor, y: torch.Tensor, caller: str
) -> np.ndarray:
    """:func:`debiased_linear_cka` (float64 numpy of the batch shape) from its blocks' three HSIC_1."""
    batch = np.broadcast_shapes(tuple(x.shape[:-2]), tuple(y.shape[:-2]))
    hxy, hxx, hyy = (torch.cat([pt[i].reshape(-1) for pt in parts]).reshape(batch) for i in range(3))
    for name, h in (("X", hxx), ("Y", hyy)):
        if bool((h <= 0).any()):
            raise DynamicsError(
                f"{caller}(): HSIC_1 of `{name}` with itself is <= 0 (constant features, or too few "
                "tokens for the unbiased estimate), so debiased CKA is undefined"
            )
    value: np.ndarray = (hxy / torch.sqrt(hxx * hyy)).to("cpu", torch.float64).numpy()
    finite_or_raise(value, caller)
    return value


def linear_and_debiased_cka(X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(linear_cka(X, Y), debiased_linear_cka(X, Y))`` (route ``'auto'``) as float64 numpy arrays of the batch
    shape, from one centring of each view and one set of kernel (or feature-space) products: the same numbers as
    the two calls, for about half their cost (the cross-run rows give both). Raises as either would."""
    caller = "debiased_linear_cka"
    x, y, n = _debiased_inputs(X, Y, caller)
    route = _cka_route("auto", n, x.shape[-1], y.shape[-1])
    biased, debiased = [], []
    for xb, yb in _blocks(x, y):
        xc, nx = _centred_scaled(xb)
        yc, ny = _centred_scaled(yb)
        if route == "features":
            products = _feature_products(xc, yc)
            debiased.append(_debiased_from_features(xc, yc, n, products))
        else:
            k, l_ = xc @ xc.mT, yc @ yc.mT
            products = _kernel_products(k, l_)
            debiased.append(_debiased_from_kernels(k, l_, n))
        biased.append(_biased_part(products, nx, ny))
    return _linear_cka_value(biased, x, y, "linear_cka"), _debiased_value(debiased, x, y, caller)
