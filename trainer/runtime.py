"""Runtime policy: where and how a run computes, said once for the trainer, the batch-size probe and the benchmarks.

* device: :func:`resolve_device` (``auto`` → CUDA when available), :func:`threads_hint`;
* precision: :func:`uses_bf16` and :func:`autocast_for` (bf16 autocast on CUDA by default),
  :func:`set_tf32` (TF32 for float32 matrix products on CUDA);
* compile: :func:`uses_compile` and :func:`training_loss` (``torch.compile`` on CUDA by default,
  through :class:`CompiledLoss`, which falls back to eager mode when compiling fails);
* out of memory: :func:`is_out_of_memory`, :func:`release_memory`;
* the optimizer and its learning rate: :func:`build_optimizer` (AdamW, decay on matrices only),
  :func:`lr_at` (the schedule of a config at update ``t``).

None of this is the training loop (``trainer.train``); this module imports no
other part of the trainer than its config, errors and schedules, so anything
may import it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.envvars import environ_set
from trainer.errors import ConfigError
from trainer.schedule import constant_factor, cosine_factor, jagged_cosine_factor, linear_factor

__all__ = [
    "resolve_device",
    "threads_hint",
    "uses_bf16",
    "autocast_for",
    "set_tf32",
    "uses_compile",
    "CompiledLoss",
    "training_loss",
    "is_out_of_memory",
    "release_memory",
    "build_optimizer",
    "lr_at",
]

#: A loss function of token ids and targets ``(b, T)`` int64 → a 0-d float tensor (nats/token).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# -- device ----------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The device of setting ``device``: ``auto`` is CUDA when available, else the CPU.

    Raises :class:`~trainer.errors.ConfigError` when CUDA is asked for and absent.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine; use device=cpu")
    return torch.device(name)


def threads_hint() -> None:
    """Use every core for intra-op parallelism unless the user said otherwise (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


@contextlib.contextmanager
def child_threads(n: int = 1) -> Iterator[None]:
    """Processes started inside the block use ``n`` threads for OpenMP and MKL (torch and BLAS in spawned
    workers), so parallel workers do not oversubscribe the cores; the environment is restored afterwards."""
    with environ_set({"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}):
        yield


# -- precision ---------------------------------------------------------------------------------------


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: ``precision=bf16``, or ``auto`` on CUDA."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the context every forward of the run is computed in: bf16 autocast (:func:`uses_bf16`) or none.

    Call it once per forward (``with autocast(): ...``): an autocast context is not reusable across threads.
    """
    if uses_bf16(cfg, device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def set_tf32(cfg: TrainConfig, device: torch.device) -> None:
    """On CUDA, let float32 matrix products use TF32 as ``cfg.tf32`` says (process-wide; bf16 ones unaffected)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


# -- compile -----------------------------------------------------------------------------------------


def uses_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the training loss is compiled: ``compile`` if set, else on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


class CompiledLoss:
    """``torch.compile`` of a loss function that falls back to eager mode, with one warning, if compiling fails.

    A failure to compile (a missing compiler toolchain, an unsupported op on an
    older torch) should cost speed, not the run. Running out of device memory is
    not a compiler failure: it is raised as it is and compiling stays on. Any
    other error that eager mode also raises (a bad input) comes from the eager call.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], **compile_kwargs: Any) -> None:
        self.eager = fn
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(fn, **compile_kwargs)

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # any compiler failure; eager mode (below) re-raises the real errors
                if is_out_of_memory(e):
                    raise
                self.compiled = None
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {first}); training continues without compile",
                    stacklevel=2,
                )
        return self.eager(*args)


def training_loss(loss: LossFn, cfg: TrainConfig, device: torch.device) -> LossFn:
    """The loss the training step calls: ``loss`` through :class:`CompiledLoss` when :func:`uses_compile`, else itself.

    Pass a bound method (``model.loss``): the module itself is not wrapped, so state-dict keys keep their names.
    """
    return CompiledLoss(loss) if uses_compile(cfg, device) else loss


# -- out of memory -----------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says device memory ran out: ``torch.cuda.OutOfMemoryError``, or a RuntimeError saying so."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def release_memory() -> None:
    """Collect garbage and, when CUDA is in use, return the caching allocator's free blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- optimizer and learning rate ---------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters, in ``named_parameters`` order; weight decay on matrices only (not norms).

    Fused on CUDA. ReLoRA's frozen base matrices (``requires_grad=False``) are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_at(cfg: TrainConfig, t: int) -> float:
    """Learning rate of update ``t`` (0-based): ``cfg.schedule``, or for ReLoRA the jagged cosine with lr restarts."""
    kw: dict[str, Any] = dict(total=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    if cfg.method == "relora":
        r = cfg.relora
        return cfg.lr * jagged_cosine_factor(
            t, lr_restart_every=r.lr_restart_period, lr_restart_warmup=r.lr_restart_warmup, **kw
        )
    factor = {"cosine": cosine_factor, "linear": linear_factor, "constant": constant_factor}[cfg.schedule]
    return cfg.lr * factor(t, **kw)
