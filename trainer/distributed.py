"""Data-parallel training under ``torchrun``: who am I, slice my share, average the gradients.

Launch with ``torchrun --nproc_per_node N -m dynamics.cli train ...`` (or
``python -m torch.distributed.run``). Without torchrun's environment
(``WORLD_SIZE`` unset or 1) everything here is a no-op and training is the
plain single-process loop.

Design. Every rank builds the same model from the seed and draws the same
global micro-batch (the data order is a pure function of ``(seed, step,
micro)``), keeps rows ``rank·b/W … (rank+1)·b/W`` of it, and after the last
micro-batch of the step the gradients are averaged with one all-reduce over a
flat buffer. Since the loss is a mean over equally many tokens per rank, the
averaged gradient is the gradient of the global batch, so an N-process run
matches the 1-process run with the same ``batch_size`` to float32 rounding,
and resuming with another world size continues the same trajectory.

Why not ``torch.nn.parallel.DistributedDataParallel``: ReLoRA changes the
trainable parameter set mid-run (the warm-start switch wraps the projections)
and DDP's buckets are fixed at construction; an explicit all-reduce of
whatever the optimizer holds is correct for both methods by construction. The
cost is no overlap of communication with the backward pass (one all-reduce
per optimizer step, after gradient accumulation).

Everything else that must agree across ranks already does: the ReLoRA merge
and re-initialisation and the optimizer-state pruning draw from the adapter
generator, seeded identically on every rank, and act on identical weights.
Adapter dropout is keyed (:mod:`trainer.keyed_dropout`): the mask of a row is a
function of (seed, step, the row's place in the step's global batch, module),
so rank ``k`` draws for rows :meth:`DistContext.shard_range` exactly the masks
the 1-process run draws for them, whatever the number of processes and of
accumulation steps. Only rank 0 evaluates, logs, prints, writes checkpoints
and captures dynamics; the others wait at a barrier after each checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard_range(self, b: int) -> range:
        """Which rows of a global micro-batch of ``b`` rows are this rank's: ``rank·b/W … (rank+1)·b/W − 1``."""
        n = b // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch ``(b, ...)``; ``b`` must be divisible by the world size."""
        if not self.enabled:
            return x
        rows = self.shard_range(x.shape[0])
        return x[rows.start : rows.stop]

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each ``p.grad`` by its mean over ranks (one all-reduce of a flat buffer)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (for logging the global loss)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def in_sync(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every rank holds bitwise-identical ``tensors`` (compares float64 sums and sums of squares).

        Ranks apply identical updates to identical averaged gradients, so their
        weights and optimizer states must agree exactly; the trainer checks this
        at every checkpoint and stops rather than save a state only rank 0 has.
        """
        if not self.enabled:
            return True
        local = (
            torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors])
            .reshape(-1)
            .cpu()
            if tensors
            else torch.zeros(1, dtype=torch.float64)
        )
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        if dist.get_backend() == "nccl":
            local_dev = local.cuda()
            gathered_dev = [g.cuda() for g in gathered]
            dist.all_gather(gathered_dev, local_dev)
            gathered = [g.cpu() for g in gathered_dev]
        else:
            dist.all_gather(gathered, local)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

    def close(self, *, synchronize: bool = False) -> None:
        """Leave the process group. ``synchronize`` (a run that finished normally on every rank): first wait
        for every rank to reach this point, so no rank tears its connections down while a peer still uses them
        (gloo could then abort a process with "terminate called without an active exception")."""
        if self.enabled and dist.is_initialized():
            if synchronize:
                dist.barrier()
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun job, or not under torchrun (``RANK`` unset): the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def init_from_env(device_type: str) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    NCCL on CUDA, gloo on CPU. Returns a single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local)
