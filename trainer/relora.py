"""ReLoRA: low-rank adapters that are periodically merged into the frozen weight (SPEC §3).

A wrapped projection computes ``W x + s · B (A dropout(x))`` with ``s = alpha / r``,
``W`` (out×in) frozen, ``A`` (r×in) Kaiming-uniform and ``B`` (out×r) zero at
init. The module keeps the base weight's state-dict key (``<name>.weight``) and
the factors are real submodules ``<name>.lora_a`` / ``<name>.lora_b``, so names
stay canonical.

The adapter dropout is :func:`trainer.keyed_dropout.keyed_dropout`: its mask is
a function of (seed, step, row of the global batch, the module's canonical
name) only, read from a :class:`~trainer.keyed_dropout.RowKeys` that all wrapped
modules of a model share and that the trainer fills before each micro-batch.
So a run draws the same masks however its global batch is split over processes
and gradient-accumulation steps, and needs no RNG state to resume. The RowKeys
is a plain attribute (neither parameter nor buffer): state dicts are unchanged.

ReLoRA's periodic events, one name each (periods in :class:`trainer.config.ReLoRAConfig`):

* a **merge** (:func:`merge_all`, every ``merge_every`` updates) sets
  ``W ← W + s·B·A`` (in float32, cast back), re-draws ``A`` and zeroes ``B``:
  the model's function is unchanged;
* an **optimizer reset** (:func:`prune_optimizer_state`, every
  ``optimizer_reset_every``) prunes the adapters' Adam state, acting on the very
  tensors ``torch.optim.AdamW`` reads at its next step;
* an **lr restart** (every ``lr_restart_every``) is part of the learning-rate
  schedule (:func:`trainer.schedule.jagged_cosine_factor`), not of this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ReLoRAConfig
from trainer.keyed_dropout import RowKeys, keyed_dropout, module_key


class ReLoRALinear(nn.Module):
    """A bias-free linear layer with a frozen base ``weight`` and a trainable low-rank adapter.

    ``name``: the canonical name (``layers.3.attn.q``), which keys the dropout
    masks (:func:`~trainer.keyed_dropout.module_key`); ``rows``: the model's
    shared :class:`~trainer.keyed_dropout.RowKeys` (a fresh one if ``None``;
    without keys set, the dropout is plain ``torch.nn.functional.dropout``).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        generator: torch.Generator,
        name: str = "",
        rows: RowKeys | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        if rank > min(out_features, in_features):
            raise ValueError(
                f"ReLoRA rank {rank} exceeds min(out, in) = {min(out_features, in_features)} of a {out_features}×{in_features} matrix"
            )
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale = rank, alpha / rank
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # (out, in), frozen
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=base.weight.device)  # weight (r, in)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=base.weight.device)  # weight (out, r)
        self.dropout_p = dropout
        self.dropout_key = module_key(name)  # int64 value, the same in every process
        self.rows = RowKeys() if rows is None else rows  # a plain attribute: not in the state dict
        self.init_adapter(generator)

    @torch.no_grad()
    def init_adapter(self, generator: torch.Generator) -> None:
        """``A`` ← Kaiming-uniform (drawn on CPU from ``generator``, so runs are device-independent), ``B`` ← 0."""
        a = torch.empty(self.lora_a.weight.shape, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5), as nn.Linear
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a.weight.copy_(a)
        self.lora_b.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (rows, ..., in) → (rows, ..., out). The adapter's product is accumulated into the base output by
        # one addmm (out = W x + s · (A x') Bᵀ), so the scale and the sum cost no extra passes over (N, out).
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        dropped = keyed_dropout(x, self.dropout_p, rows=self.rows, key=self.dropout_key, training=self.training)
        u = self.lora_a(dropped.reshape(-1, self.in_features))  # (N, r); masks keyed by x's first (row) axis
        out = torch.addmm(F.linear(x2, self.weight), u, self.lora_b.weight.T, alpha=self.scale)  # (N, out)
        return out.view(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The adapter's update ``s · B A`` ``(out, in)`` in float32."""
        return self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``W + s·B·A`` ``(out, in)``, computed in float32 and cast to ``W``'s dtype."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator) -> None:
        """The merge: ``W ← W + s·B·A`` then a fresh adapter; the layer's function is unchanged up to float32 rounding."""
        self.weight.copy_(self.effective_weight())
        self.init_adapter(generator)


def wrap_model(
    model: nn.Module, cfg: ReLoRAConfig, generator: torch.Generator, rows: RowKeys | None = None
) -> list[str]:
    """Replace every target projection (``cfg.targets``: q, k, v, o, gate, up, down) by a :class:`ReLoRALinear`.

    Embeddings, norms and the LM head stay full-rank and trainable. All wrapped
    modules share ``rows`` (a new :class:`~trainer.keyed_dropout.RowKeys` if
    ``None``; :func:`row_keys_of` finds it), which the trainer fills before each
    micro-batch. Returns the canonical names of the wrapped modules, in model order.
    """
    rows = RowKeys() if rows is None else rows
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in cfg.targets and name.startswith("layers."):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(
                parent,
                leaf,
                ReLoRALinear(
                    module,
                    rank=cfg.rank,
                    alpha=cfg.alpha,
                    dropout=cfg.dropout,
                    generator=generator,
                    name=name,
                    rows=rows,
                ),
            )
            wrapped.append(name)
    return wrapped


def relora_modules(model: nn.Module) -> dict[str, ReLoRALinear]:
    """Canonical name → wrapped module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ReLoRALinear)}


def row_keys_of(model: nn.Module) -> RowKeys | None:
    """The :class:`~trainer.keyed_dropout.RowKeys` the wrapped modules of ``model`` share (``None`` if none is wrapped)."""
    return next((m.rows for m in relora_modules(model).values()), None)


def merge_all(model: nn.Module, generator: torch.Generator) -> int:
    """The merge: merge and re-initialise every adapter; returns how many were merged."""
    mods = relora_modules(model)
    for m in mods.values():
        m.merge_and_reinit(generator)
    return len(mods)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under canonical keys, wrapped layers replaced by their effective ``W + s·B·A``.

    A full-rank and a ReLoRA model give the same keys.
    """
    mods = relora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in mods or owner.rsplit(".", 1)[0] in mods:
            continue
        out[key] = value
    for name, m in mods.items():
        out[f"{name}.weight"] = m.effective_weight()
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen bases and factors of every wrapped layer: ``<name>.weight`` (W), ``<name>.lora_a.weight``, ``<name>.lora_b.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, m in relora_modules(model).items():
        out[f"{name}.weight"] = m.weight
        out[f"{name}.lora_a.weight"] = m.lora_a.weight
        out[f"{name}.lora_b.weight"] = m.lora_b.weight
    return out


def lora_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The adapter factors ``A`` and ``B`` of every wrapped layer."""
    return [p for m in relora_modules(model).values() for p in (m.lora_a.weight, m.lora_b.weight)]


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], *, mode: str, ratio: float, generator: torch.Generator
) -> dict[str, float]:
    """The optimizer reset: zero a fraction of Adam's ``exp_avg``/``exp_avg_sq`` for ``params``, in place.

    The step counter is kept.

    ``mode``: ``none`` (no-op), ``full`` (zero all), ``random`` (zero each entry
    with probability ``ratio``, mask drawn on CPU from ``generator``) or
    ``magnitude`` (zero the ``ratio`` fraction of entries with the smallest
    ``|value|``, per state tensor). Returns the fraction of entries now zero.
    """
    if mode == "none":
        return {"zero_fraction": float("nan")}
    zeros, total = 0, 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if mode == "full":
                t.zero_()
            elif mode == "random":
                keep = torch.rand(t.shape, generator=generator) >= ratio
                t.mul_(keep.to(device=t.device, dtype=t.dtype))
            elif mode == "magnitude":
                k = int(ratio * t.numel())
                if k > 0:
                    threshold = t.abs().flatten().kthvalue(k).values
                    t.masked_fill_(t.abs() <= threshold, 0.0)
            else:
                raise ValueError(f"unknown optimizer reset mode {mode!r}")
            zeros += int((t == 0).sum())
            total += t.numel()
    return {"zero_fraction": zeros / total if total else float("nan")}
