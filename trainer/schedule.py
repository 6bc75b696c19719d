"""Learning-rate schedules as pure functions of the step: ``lr(t) = lr_max · factor(t)``.

``t`` is the index of the optimizer update about to be taken (0 for the first).
"""

from __future__ import annotations

import math


def cosine_factor(t: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup ``t / warmup``, then cosine from 1 down to ``min_ratio`` at ``t = total``."""
    if t < warmup:
        return t / warmup
    progress = min(max((t - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_factor(t: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then linear decay from 1 to ``min_ratio`` at ``t = total``."""
    if t < warmup:
        return t / warmup
    progress = min(max((t - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 1 - (1 - min_ratio) * progress


def jagged_cosine_factor(
    t: int, *, total: int, warmup: int, lr_restart_every: int, lr_restart_warmup: int, min_ratio: float
) -> float:
    """ReLoRA's cosine with lr restarts (SPEC §3).

    With ``c(t) = m + (1 − m)·½(1 + cos(π (t − W0)/(T − W0)))``, lr restart
    period ``R`` and lr restart warmup ``Wr``: ``t < W0`` → ``t / W0``;
    ``t ≥ R`` and ``u = t mod R < Wr`` → ``(u / Wr) · c(k·R + Wr)``
    (``k = t div R``), so the factor is exactly 0 at every lr restart step
    ``k·R``; otherwise ``c(t)``.
    """

    def c(s: int) -> float:
        progress = min(max((s - warmup) / max(total - warmup, 1), 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if t < warmup:
        return t / warmup
    if t >= lr_restart_every and lr_restart_warmup > 0:
        k, u = divmod(t, lr_restart_every)
        if u < lr_restart_warmup:
            return (u / lr_restart_warmup) * c(k * lr_restart_every + lr_restart_warmup)
    return c(t)


def constant_factor(t: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then 1."""
    return t / warmup if t < warmup else 1.0
