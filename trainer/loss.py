"""Cross-entropy fused with the LM head, computed a chunk of tokens at a time.

The plain loss ``F.cross_entropy((h @ Wᵀ).float(), y)`` materialises the
float32 logits ``(N, V)`` of every token at once (and autograd keeps them for
the backward pass): at ``N = 64·2048`` tokens and ``V = 50 304`` that is 26 GB.
:func:`linear_cross_entropy` computes the same mean loss and the same gradients
for ``h`` and ``W`` while holding the logits of at most ``chunk_tokens`` tokens.

How: during the forward pass each chunk's logits are formed, reduced to the
loss (log-sum-exp minus the target logit), and, when gradients are wanted,
turned straight into the chunk's gradient ``∂L/∂logits = (softmax − onehot)/N``,
which is contracted with ``W`` (giving ``∂L/∂h``) and with ``h`` (accumulated
into ``∂L/∂W`` in float32). The backward pass then only scales those stored
gradients by the incoming gradient. No logits are recomputed, so the FLOPs are
those of the plain loss; the memory is ``O(chunk·V + N·D + V·D)``.

Precision follows the plain loss: under autocast the matrix products run in the
autocast dtype (as ``nn.Linear`` would) and everything after them in float32.
The results equal the plain loss's up to float32 summation order (tests check
``rtol 1e-5`` in float32).
"""

from __future__ import annotations

import torch

#: Default budget for one chunk's float32 logits; the chunk holds ``budget // (4·V)`` tokens.
DEFAULT_CHUNK_BYTES = 512 * 2**20
IGNORE_INDEX = -100  # targets equal to this do not count, as in F.cross_entropy


def auto_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits ``(chunk, V)`` take at most ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(1, vocab_size)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``targets``, gradients formed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
        want_grad: bool,
    ) -> torch.Tensor:
        # hidden (N, D), weight (V, D), targets (N,) int64, all on one device; the products run in compute_dtype
        n_tokens = hidden.shape[0]
        hidden_dtype = hidden.dtype
        hidden, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        inv_count = 1.0 / count.clamp(min=1).to(torch.float32)  # 0-d; a NaN loss comes from 0/0 below
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden_dtype, device=hidden.device) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        for start in range(0, n_tokens, chunk):
            stop = min(start + chunk, n_tokens)
            h = hidden[start:stop]  # (n, D)
            y = targets[start:stop]  # (n,)
            keep = valid[start:stop]  # (n,) bool
            y_safe = torch.where(keep, y, torch.zeros_like(y))
            logits = (h @ weight_c.T).float()  # (n, V) float32: the only chunk-sized buffer
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            target_logit = logits.gather(1, y_safe[:, None]).squeeze(1)  # (n,)
            loss_sum += torch.where(keep, lse - target_logit, torch.zeros_like(lse)).sum()
            if grad_hidden is not None and grad_weight is not None:  # want_grad
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                rows = torch.arange(stop - start, device=probs.device)
                probs[rows, y_safe] -= 1.0
                probs.mul_((keep.to(torch.float32) * inv_count)[:, None])  # ∂L/∂logits (n, V)
                g = probs.to(compute_dtype)
                grad_hidden[start:stop] = g @ weight_c  # (n, D)
                grad_weight += (g.T @ h).float()  # (V, D), summed over chunks in float32
            del logits
        loss = loss_sum / count.to(torch.float32)  # NaN when every target is ignored, like F.cross_entropy
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        # (a float32 weight under bf16 autocast gets its float32 gradient, unrounded)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy was called without gradients wanted; cannot backpropagate")
        scale = grad_loss.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of logits ``hidden @ weightᵀ``, never holding more than one chunk of logits.

    Args:
        hidden: ``(N, D)`` final hidden states (float32, or any float dtype).
        weight: ``(V, D)`` LM-head weight.
        targets: ``(N,)`` int64 token ids; entries equal to ``-100`` are ignored.
        chunk_tokens: tokens per chunk (``None``: :func:`auto_chunk_tokens`, 512 MiB of float32 logits).

    Returns:
        A 0-d float32 tensor: the mean over non-ignored targets (NaN if there are none).
        Its gradients with respect to ``hidden`` and ``weight`` equal those of
        ``F.cross_entropy((hidden @ weight.T).float(), targets)`` up to float32 rounding.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy expects hidden (N, D) and weight (V, D); got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one token")
    chunk = auto_chunk_tokens(weight.shape[0]) if chunk_tokens is None else int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the products run as nn.Linear's would under this autocast
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets.long(), chunk, compute_dtype, want_grad)
