"""Dropout whose mask is a pure function of (seed, step, row of the global batch, module), on any device.

``torch.nn.Dropout`` draws from the process's random stream, so which row of a
global batch gets which mask depends on how the batch is split over processes
and gradient-accumulation steps: a 2-process run, or a run with
``grad_accum=2``, is then a different run from the 1-process one. Here the mask
of element ``(t, j)`` of row ``r`` is

    keep = U(hash(row_key(seed, step, r), module_key, t · F + j)) ≥ p,

with ``U`` the top 24 bits of a SplitMix64 finaliser (Steele et al. 2014) as a
uniform in [0, 1): counter-based, so every process computes the masks of its
own rows, and any split of the global batch gives every row the same mask. The
hash is integer arithmetic on tensors, so the masks are bit-identical on CPU
and CUDA as well. Kept values are scaled by ``1 / (1 − p)``, as in
``torch.nn.functional.dropout``.

The trainer fills a :class:`RowKeys` (one ``int64`` key per local row) before
each micro-batch; modules read it. Outside training (no keys, or keys for
another number of rows) :func:`keyed_dropout` falls back to plain dropout.
"""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = ["RowKeys", "keyed_dropout", "module_key", "row_keys", "uniform_from_keys"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix(x: int) -> int:
    """SplitMix64 of a Python int (mod 2**64): the key mixer for seeds, steps and rows."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def module_key(name: str) -> int:
    """A stable 64-bit key (as int64) of a module's canonical name (``layers.3.attn.q``), the same in every process."""
    return _signed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def row_keys(seed: int, step: int, rows: range) -> list[int]:
    """Keys (int64 values) of global-batch rows ``rows`` of optimizer step ``step`` of a run seeded ``seed``."""
    base = _splitmix(_splitmix(seed & _MASK64) ^ (step & _MASK64))
    return [_signed(_splitmix(base ^ _splitmix(r))) for r in rows]


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _top24(keys: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser of int64 ``keys``, top 24 bits as int64 in [0, 2**24).

    Integer multiplication wraps modulo 2**64 on CPU and CUDA alike, so the result
    does not depend on the device.
    """
    z = keys + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return _shr(z ^ _shr(z, 31), 40)


def uniform_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) on the grid k / 2**24, same shape as int64 ``keys`` (see :func:`_top24`)."""
    return _top24(keys).to(torch.float32) * (1.0 / (1 << 24))


class RowKeys:
    """The keys of the rows of the micro-batch being computed, shared by every keyed-dropout module of a model.

    ``keys`` is an int64 tensor ``(rows,)`` on the model's device, refilled in
    place by :meth:`set` before each micro-batch (one host-to-device copy; the
    tensor object stays the same, so a compiled graph that reads it is reused).
    ``None`` until the trainer sets it.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None

    def set(self, seed: int, step: int, first_row: int, n_rows: int, device: torch.device | str) -> None:
        """Key rows ``first_row .. first_row + n_rows − 1`` of the global batch of ``step``."""
        host = torch.tensor(row_keys(seed, step, range(first_row, first_row + n_rows)), dtype=torch.int64)
        device = torch.empty(0, device=device).device  # "cuda" → "cuda:0", so an unchanged device is recognised
        if self.keys is None or self.keys.shape != host.shape or self.keys.device != device:
            self.keys = host.to(device)
        else:
            self.keys.copy_(host, non_blocking=True)

    def clear(self) -> None:
        self.keys = None


def keyed_dropout(x: torch.Tensor, p: float, *, rows: RowKeys | None, key: int, training: bool) -> torch.Tensor:
    """Dropout of ``x`` ``(rows, ..., features)`` with masks keyed by row and module ``key`` (see the module doc).

    Identity when not ``training`` or ``p == 0``. Falls back to
    ``torch.nn.functional.dropout`` when ``rows`` holds no keys for ``x.shape[0]``
    rows (a forward pass outside the trainer's steps, e.g. the batch-size probe).
    """
    if not training or p == 0.0:
        return x
    keys = None if rows is None else rows.keys
    if keys is None or x.ndim < 2 or keys.shape[0] != x.shape[0]:
        return torch.nn.functional.dropout(x, p, training=True)
    per_row = x[0].numel()
    offsets = torch.arange(per_row, device=x.device, dtype=torch.int64) * _signed(_GOLDEN)  # (per_row,)
    element_keys = (keys.to(x.device) + key)[:, None] + offsets[None, :]  # (rows, per_row)
    # u = k / 2**24 >= p  ⟺  k >= ceil(p · 2**24): compared as integers, no float uniforms materialised
    keep = (_top24(element_keys) >= math.ceil(p * (1 << 24))).view(x.shape)  # bool: what backward saves
    return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p))
