"""Mapping between our canonical names and Hugging Face ``LlamaForCausalLM``.

The pico-decoder is architecturally a LLaMA model (RMSNorm, rotate-half RoPE,
GQA, SwiGLU, untied head, no biases), so export is a renaming of keys plus a
``config.json``. ``transformers`` is not needed to build either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from trainer.config import ModelConfig

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}


def hf_key(key: str) -> str:
    """Our state-dict key (``layers.3.attn.q.weight``) → the HF key (``model.layers.3.self_attn.q_proj.weight``)."""
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no Hugging Face LLaMA equivalent for {key!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a dense state dict (full-rank, or a ReLoRA run's effective weights) to HF LLaMA keys."""
    return {hf_key(k): v for k, v in state.items()}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A ``config.json`` for ``LlamaForCausalLM`` equivalent to ``cfg``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def export_hf(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Write checkpoint ``step`` (the latest when ``None``) of a run as a ``LlamaForCausalLM`` directory.

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (float32, HF key names)
    and ``export.json`` (source run, step, sha256 of the source weights). ReLoRA
    runs export their effective weights ``W + s·B·A`` (the checkpoint's dense
    ``model.safetensors``). The directory appears atomically; an existing one is refused.
    """
    from safetensors.torch import load_file, save_file

    from trainer.atomic import atomic_write_dir
    from trainer.checkpoint import CheckpointError, checkpoint_entry, read_manifest, verify_checkpoint
    from trainer.config import config_from_dict

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new export directory")
    manifest = read_manifest(run_dir)
    entry = checkpoint_entry(manifest, step)
    verify_checkpoint(run_dir, entry)
    cfg = config_from_dict({**manifest["config"], "init_from": None})
    weights = load_file(str(run_dir / entry["path"] / "model.safetensors"))
    state = to_hf_state_dict({k: v.to(torch.float32).contiguous() for k, v in weights.items()})
    provenance = {"source_run": str(run_dir.resolve()), "step": entry["step"], "tokens_seen": entry.get("tokens_seen"),
                  "method": manifest["config"].get("method"), "source_sha256": entry["sha256"]["model.safetensors"],
                  "format": "LlamaForCausalLM"}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg.model), indent=2) + "\n")
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n")

    atomic_write_dir(out_dir, fill)
    return out_dir
