"""How many sequences fit in one forward/backward pass: a micro-batch finder for GPU memory.

:func:`find_micro_batch` is the search, pure logic over a ``try_step(b)``
callable that raises an out-of-memory error when micro-batch ``b`` does not
fit: it doubles ``b`` from ``start`` until a try fails or ``limit`` is reached,
then bisects between the last size that fitted and the first that did not. It
assumes memory grows with ``b`` (true of a training step).

:class:`TrainStepProbe` is the real ``try_step`` for a
:class:`~trainer.config.TrainConfig`: the trainer's model (``method=relora``:
ReLoRA-wrapped), its AdamW (:func:`trainer.runtime.build_optimizer`, fused on
CUDA), bf16 autocast where the trainer uses it and ``torch.compile`` where the
config asks for it (the policies of :mod:`trainer.runtime`), running whole training steps on random token ids of
``seq_len`` at micro-batch ``b``, and recording the peak allocated memory.

:func:`measure_batch_size` combines the two for ``dynamics batch-size`` and
:func:`split_batch` turns the result into ``batch_size``/``grad_accum`` for a
target number of sequences per optimizer step.

What the probe does not see: the periodic evaluation (no gradients, so less
than a step at the same micro-batch), the dynamics capture (its own, small
batch), other processes on the GPU and allocator fragmentation over a long
run. The suggestion picks a divisor of the target, which usually leaves
headroom; keep some when the largest size is used directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer import relora
from trainer.config import TrainConfig
from trainer.model import Decoder
from trainer.runtime import (  # is_out_of_memory, release_memory: importable from here as before
    CompiledLoss,
    autocast_for,
    build_optimizer,
    is_out_of_memory,
    release_memory,
    uses_bf16,
    uses_compile,
)

__all__ = [
    "GIB",
    "is_out_of_memory",
    "release_memory",
    "find_micro_batch",
    "split_batch",
    "training_model",
    "TrainStepProbe",
    "BatchSizeReport",
    "measure_batch_size",
]

GIB = 2**30


def _fits(try_step: Callable[[int], None], b: int) -> bool:
    """Run ``try_step(b)``: ``True`` if it returns, ``False`` on out-of-memory; any other exception propagates."""
    oom = False
    try:
        try_step(b)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        oom = True  # leave the except block first: the traceback holds the failed step's tensors
    if torch.cuda.is_initialized():  # each try starts from the same free GPU memory
        release_memory()
    return not oom


def find_micro_batch(try_step: Callable[[int], None], *, start: int = 1, limit: int) -> int:
    """Largest micro-batch ``b`` in ``[1, limit]`` for which ``try_step(b)`` does not run out of memory.

    Tries ``start, 2·start, 4·start, …`` (capped at ``limit``) until one fails,
    then bisects between the last size that fitted and the first that did not;
    if ``start`` itself fails, bisects below it. Returns 0 when not even a
    micro-batch of 1 fits. Out of memory means ``torch.cuda.OutOfMemoryError``
    or a ``RuntimeError`` whose message contains "out of memory"; any other
    exception propagates. Between tries the CUDA cache is emptied (when CUDA is
    in use), so each try starts from the same free memory.

    Parameters
    ----------
    try_step
        Runs whatever must fit at micro-batch ``b`` (sequences); raises on out-of-memory.
    start
        First size tried (>= 1).
    limit
        Largest size considered (>= ``start``); never exceeded.

    Examples
    --------
    >>> def try_step(b):
    ...     if b > 40:
    ...         raise RuntimeError("CUDA out of memory")
    >>> find_micro_batch(try_step, limit=1024)
    40
    """
    if not (isinstance(start, int) and start >= 1):
        raise ValueError(f"find_micro_batch: start must be an integer >= 1, got {start!r}")
    if not (isinstance(limit, int) and limit >= start):
        raise ValueError(f"find_micro_batch: limit must be an integer >= start={start}, got {limit!r}")
    good, bad, b = 0, None, start
    while bad is None:
        if _fits(try_step, b):
            good = b
            if b == limit:
                return b
            b = min(2 * b, limit)
        else:
            bad = b
    while bad - good > 1:  # invariant: good fits (or is 0), bad does not
        mid = (good + bad) // 2
        if _fits(try_step, mid):
            good = mid
        else:
            bad = mid
    return good


def split_batch(max_micro: int, target: int) -> tuple[int, int]:
    """``(micro_batch, grad_accum)`` for ``target`` sequences per step with micro-batches of at most ``max_micro``.

    ``micro_batch`` is the largest divisor of ``target`` not above ``max_micro``, so
    ``batch_size=target`` with ``grad_accum=target // micro_batch`` is a valid config.
    """
    if target < 1 or max_micro < 1:
        raise ValueError(
            f"split_batch: need target >= 1 and max_micro >= 1, got target={target}, max_micro={max_micro}"
        )
    micro = next(d for d in range(min(max_micro, target), 0, -1) if target % d == 0)
    return micro, target // micro


def training_model(cfg: TrainConfig, device: torch.device | str) -> Decoder:
    """The model a run of ``cfg`` trains, on ``device`` in train mode: :class:`~trainer.model.Decoder` initialised
    from ``cfg.seed`` (the caller's RNG is left as it was), ReLoRA-wrapped for ``method=relora`` (the state after
    the warm start), with the trainer's loss settings (``loss_chunk_tokens``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Decoder(cfg.model).to(device)
    model.loss_chunk_tokens = cfg.loss_chunk_tokens
    if cfg.method == "relora":
        relora.wrap_model(model, cfg.relora, torch.Generator().manual_seed(cfg.seed + 1))
    return model.train()


class TrainStepProbe:
    """A ``try_step`` for :func:`find_micro_batch`: real training steps of ``cfg``'s model at micro-batch ``b``.

    The model (:func:`training_model`) and its optimizer are built once and
    reused, so optimizer state is resident as in a run past its first step.
    Each call runs ``steps`` forward/backward/AdamW steps on random token ids
    ``(b, seq_len)`` int64 and, on CUDA, stores the peak allocated bytes of the
    call in ``peaks[b]``. With compile on (``uses_compile``), each call
    compiles the loss afresh for its shape, as the trainer compiles for its one
    shape (tens of seconds per try on a GPU; ``compile=false`` searches faster
    and, eager steps usually needing more memory, more conservatively).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str, *, steps: int = 2) -> None:
        self.cfg, self.device, self.steps = cfg, torch.device(device), steps
        self.model = training_model(cfg, self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.bf16 = uses_bf16(cfg, self.device)
        self.autocast = autocast_for(cfg, self.device)
        self.compiled = uses_compile(cfg, self.device)
        self.peaks: dict[int, int] = {}  # micro-batch → peak allocated bytes of one call (CUDA only)

    def __call__(self, micro_batch: int) -> None:
        """Run ``steps`` training steps at ``micro_batch`` sequences; raises the device's out-of-memory error if they do not fit."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator().manual_seed(micro_batch)
        rows = torch.randint(self.cfg.model.vocab_size, (micro_batch, self.cfg.context + 1), generator=gen)
        x = rows[:, :-1].contiguous().to(self.device)  # (b, T) int64
        y = rows[:, 1:].contiguous().to(self.device)  # (b, T) int64
        if self.compiled:
            torch.compiler.reset()  # no graph of another size left (this resets every compiled function of the process)
            loss_fn = CompiledLoss(
                self.model.loss, dynamic=False
            )  # as the trainer: a compiler failure falls back to eager
            self._run(loss_fn, x, y)
            self.compiled = loss_fn.compiled is not None
        else:
            self._run(self.model.loss, x, y)
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peaks[micro_batch] = torch.cuda.max_memory_allocated(self.device)

    def _run(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """``steps`` training steps of ``loss_fn`` on ids ``x`` and targets ``y`` ``(b, T)`` int64."""
        try:
            for _ in range(self.steps):
                with self.autocast():
                    loss = loss_fn(x, y)
                loss.backward()
                del loss
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.optimizer.zero_grad(set_to_none=True)  # a step that ran out of memory leaves no gradients behind


@dataclass(frozen=True)
class BatchSizeReport:
    """What :func:`measure_batch_size` found. Sizes count sequences of ``seq_len`` tokens; memory in bytes."""

    device_name: str
    total_bytes: int  # the device's memory
    seq_len: int
    max_micro_batch: int  # largest micro-batch that fits (0: none), capped at the search limit
    limit: int
    max_peak_bytes: int | None  # peak allocated at max_micro_batch
    target_batch: int
    micro_batch: int  # suggested: largest divisor of target_batch <= max_micro_batch
    grad_accum: int  # target_batch // micro_batch
    peak_bytes: int | None  # peak allocated at micro_batch
    compiled: bool
    bf16: bool


def measure_batch_size(
    cfg: TrainConfig,
    *,
    target_batch: int,
    limit: int | None = None,
    device: torch.device | str = "cuda",
    echo: Callable[[str], None] | None = None,
) -> BatchSizeReport:
    """Find the largest micro-batch of ``cfg`` on a CUDA ``device`` and split ``target_batch`` accordingly.

    ``limit`` caps the search (default ``target_batch``: larger micro-batches are
    never needed). ``echo`` receives one line per try. Raises ``ValueError`` when
    ``device`` is not CUDA (peak memory is measured with ``torch.cuda``) and
    :class:`MemoryError` when not even one sequence fits.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_batch_size needs a CUDA device, got {device}")
    limit = target_batch if limit is None else limit
    probe = TrainStepProbe(cfg, device)
    say = echo or (lambda _msg: None)

    def try_step(b: int) -> None:
        try:
            probe(b)
        except Exception as e:
            say(f"micro-batch {b}: {'out of memory' if is_out_of_memory(e) else type(e).__name__}")
            raise
        say(f"micro-batch {b}: fits, peak {probe.peaks[b] / GIB:.2f} GiB")

    best = find_micro_batch(try_step, start=min(8, limit), limit=limit)  # fewer tries; below 8 is bisected if 8 fails
    if best == 0:
        raise MemoryError(f"not even one sequence of {cfg.context} tokens fits on {torch.cuda.get_device_name(device)}")
    micro, accum = split_batch(best, target_batch)
    if micro not in probe.peaks:
        try_step(micro)
    release_memory()
    return BatchSizeReport(
        device_name=torch.cuda.get_device_name(device),
        total_bytes=torch.cuda.get_device_properties(device).total_memory,
        seq_len=cfg.context,
        max_micro_batch=best,
        limit=limit,
        max_peak_bytes=probe.peaks.get(best),
        target_batch=target_batch,
        micro_batch=micro,
        grad_accum=accum,
        peak_bytes=probe.peaks.get(micro),
        compiled=probe.compiled,
        bf16=probe.bf16,
    )
