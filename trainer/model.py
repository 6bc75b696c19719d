"""The pico-decoder: a LLaMA-style decoder-only transformer, in one file.

Pre-norm blocks (RMSNorm → grouped-query attention with RoPE → residual;
RMSNorm → SwiGLU MLP → residual), a final RMSNorm and an untied LM head. No
biases, no dropout. Module paths are the canonical names of
:mod:`trainer.names` (``layers.3.attn.q``, ``layers.3.mlp.down`` ...), and
identity modules ``resid_pre``/``resid_mid``/``resid_post`` mark the residual
stream so hooks can capture it by name.

Shapes: ``B`` batch, ``T`` sequence length, ``D`` d_model, ``H`` query heads,
``G`` key/value heads, ``Hd`` head dim (``D // H``), ``F`` MLP hidden, ``V`` vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x²) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables for rotary embeddings, each ``(T, Hd)`` float32.

    Uses the "rotate half" layout (first half of each head pairs with the second
    half), the same as Hugging Face's LLaMA, so weights export unchanged.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, Hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, Hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, T, Hd)`` by position; ``cos``/``sin`` are ``(T, Hd)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; ``G`` KV heads serve ``H`` query heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, Hd)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, Hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # query head h reads KV head h // (H / G); SDPA does the grouping without copying K and V H/G times
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Hd)
        return self.o(y)  # (B, T, D)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; the input of ``down`` is the MLP hidden state ``(B, T, F)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One pre-norm transformer layer. Residual stream ``(B, T, D)`` in and out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.resid_pre = nn.Identity()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.resid_mid = nn.Identity()
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.resid_post = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.resid_pre(x)
        x = self.resid_mid(x + self.attn(self.attn_norm(x), cos, sin))
        return self.resid_post(x + self.mlp(self.mlp_norm(x)))


class Decoder(nn.Module):
    """The full model: token ids ``(B, T)`` int64 → logits ``(B, T, V)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.rope_cos: torch.Tensor  # (max_seq_len, Hd) float32 buffers, not saved in the state dict
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_chunk_tokens: int | None = None  # see loss(); set by the trainer from its config
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-style init: N(0, 0.02) everywhere, output projections scaled by 1/sqrt(2·layers), norms at 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``(B, T, D)`` of token ids ``(B, T)`` int64: the LM head's input."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, Hd)
        x = self.embed(idx)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))  # (B, T, V)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of ``targets`` ``(B, T)`` given ``idx`` ``(B, T)``; a 0-d float32 tensor.

        Fused with the LM head and chunked over tokens (:func:`trainer.loss.linear_cross_entropy`),
        so the float32 logits ``(B·T, V)`` are never held at once; ``loss_chunk_tokens``
        sets the chunk (``None``: about 512 MiB of logits; ``0``: the plain, unchunked loss).
        """
        h = self.hidden_states(idx)  # (B, T, D)
        if self.loss_chunk_tokens == 0:
            logits = self.lm_head(h)
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), chunk_tokens=self.loss_chunk_tokens
        )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (elements), optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
