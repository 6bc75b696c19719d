"""Spikes above noise: singular values beyond the Marchenko–Pastur bulk edge.

A random ``m×n`` matrix with i.i.d. zero-mean entries of variance ``v`` has, for
large ``m, n``, all its singular values inside ``[sqrt(v)·|√m − √n|,
sqrt(v)·(√m + √n)]`` (Marchenko & Pastur 1967; the largest one converges to
the upper edge, with Tracy–Widom fluctuations of order ``sqrt(v)·(√m+√n)·
min(m, n)^(−2/3)``). Singular values above the edge ``σ₊ = sqrt(v)(√m + √n)``
are structure that noise of that size cannot produce.

Here ``v`` is the *same variance* as the matrix itself, the mean squared entry
``‖M‖_F² / (m·n) = Σσ² / (m·n)`` (so it is computed from the spectrum alone).
Strong spikes also raise this estimate, so :func:`signal_rank` is conservative:
a lower bound on the number of directions above the noise of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spectra import Spectrum, spectrum
from .validation import DynamicsError, ShapeError

__all__ = ["SignalRank", "mp_edge", "signal_rank"]


@dataclass(frozen=True)
class SignalRank:
    """Singular values above the Marchenko–Pastur edge of a matrix.

    Attributes
    ----------
    edge : float
        ``σ₊ = sqrt(variance)·(√m + √n)``, in the units of the singular values.
    rank : int
        ``#{σ_i > σ₊}`` ("signal rank"), in ``[0, min(m, n)]``.
    energy : float
        ``Σ_{σ_i > σ₊} σ_i² / Σ σ_i²``, in ``[0, 1]`` (0 for the zero matrix).
    variance : float
        The entry variance used.
    """

    edge: float
    rank: int
    energy: float
    variance: float

    def metrics(self) -> dict[str, float]:
        """Table rows: ``mp_edge``, ``signal_rank``, ``signal_energy``."""
        return {"mp_edge": self.edge, "signal_rank": float(self.rank), "signal_energy": self.energy}


def mp_edge(shape: tuple[int, int], variance: float) -> float:
    """Upper Marchenko–Pastur edge ``sqrt(variance)·(√m + √n)`` of the singular values of an ``m×n`` noise matrix."""
    try:
        m, n = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"mp_edge(): `shape` must be (m, n), got {shape!r}") from None
    if m < 1 or n < 1:
        raise ShapeError(f"mp_edge(): `shape` must have m, n >= 1, got {shape!r}")
    if not math.isfinite(variance) or variance < 0:
        raise DynamicsError(f"mp_edge(): `variance` must be a finite number >= 0, got {variance!r}")
    return math.sqrt(variance) * (math.sqrt(m) + math.sqrt(n))


def signal_rank(M: Any, *, variance: float | None = None) -> SignalRank:
    """Count the singular values of ``M`` above the Marchenko–Pastur edge of noise of the same shape and variance.

    Parameters
    ----------
    M
        One matrix ``(m, n)`` (numpy / torch, any real dtype) or a single-matrix
        :class:`~dynamics.Spectrum` (reused: no new SVD; a factored spectrum's
        implied zeros count as zeros).
    variance
        Entry variance of the noise; default ``Σσ² / (m·n)``, the matrix's own
        mean squared entry.

    Returns
    -------
    SignalRank
        A Gaussian random matrix gives rank 0 (rarely 1: the top value
        fluctuates around the edge); adding a rank-``k`` signal whose singular
        values are well above the edge gives ``k``.
    """
    caller = "signal_rank"
    spec = M if isinstance(M, Spectrum) else spectrum(M, name="M", caller=caller)
    if spec.batch_shape:
        raise ShapeError(
            f"{caller}(): expects one matrix, got a batch of shape {spec.batch_shape}; loop over the batch (spec[i])"
        )
    m, n = spec.shape
    s = spec.values.astype(np.float64)
    energy = float(np.sum(s**2))
    v = energy / (m * n) if variance is None else float(variance)
    edge = mp_edge((m, n), v)
    above = s > edge
    frac = float(np.sum(s[above] ** 2) / energy) if energy > 0 else 0.0
    return SignalRank(edge=edge, rank=int(above.sum()), energy=frac, variance=v)
