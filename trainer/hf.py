"""Mapping between our canonical names and Hugging Face ``LlamaForCausalLM``.

The pico-decoder is architecturally a LLaMA model (RMSNorm, rotate-half RoPE,
GQA, SwiGLU, untied head, no biases), so export is a renaming of keys plus a
``config.json``. ``transformers`` is not needed to build either. The key map
itself (:func:`hf_key`, and its inverse for import) is in :mod:`trainer.run_format`.
A text run's tokenizer (:mod:`trainer.tokenizer`) is written beside the model
(:func:`hf_tokenizer_files`), so ``AutoTokenizer`` loads the matching pair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.config import ModelConfig
from trainer.run_format import DATA_DIR, DATA_META, MODEL_FILE, TOKENIZER_FILE, hf_key
from trainer.tokenizer import TextTokenizer, run_tokenizer

__all__ = ["hf_key", "to_hf_state_dict", "hf_config_dict", "hf_tokenizer_files", "export_hf"]


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a dense state dict (full-rank, or a ReLoRA run's effective weights) to HF LLaMA keys.

    Tensors are passed through unchanged; a key with no LLaMA equivalent raises ``KeyError``.
    """
    return {hf_key(k): v for k, v in state.items()}


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
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


def hf_tokenizer_files(tok: TextTokenizer, cfg: ModelConfig) -> dict[str, str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` texts for ``tok``.

    ``AutoTokenizer.from_pretrained`` then builds a ``PreTrainedTokenizerFast``
    that encodes exactly as the run did (no special tokens added; bytes runs
    get :func:`trainer.tokenizer.bytes_tokenizer_json`). The end-of-text token
    is both ``eos_token`` and ``bos_token``, as it is the context every
    document starts from in training.
    """
    special = {"bos_token": tok.eos_token, "eos_token": tok.eos_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.max_seq_len,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # a literal "<|endoftext|>" in text is text, as in training
    }
    return {
        TOKENIZER_FILE: tok.hf_json(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }


def export_hf(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Write checkpoint ``step`` (the latest when ``None``) of a run as a ``LlamaForCausalLM`` directory.

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (float32, HF key names)
    and ``export.json`` (source run, step, sha256 of the source weights), and for
    runs on text the tokenizer files (:func:`hf_tokenizer_files`). ReLoRA
    runs export their effective weights ``W + s·B·A`` (the checkpoint's dense
    ``model.safetensors``). The directory appears atomically; an existing one is refused.
    One export at a time writes ``out_dir``: it is locked by ``.<name>.lock`` beside it
    (:mod:`trainer.lock`), so a second export into it is refused naming the first.
    """

    from trainer.lock import DirectoryLock

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    with DirectoryLock(out_dir.parent, command="dynamics export", name=f".{out_dir.name}.lock"):
        return _export_hf(run_dir, out_dir, step)


def _export_hf(run_dir: Path, out_dir: Path, step: int | None) -> Path:
    """:func:`export_hf` under the export directory's lock."""
    from safetensors.torch import load_file, save_file

    from trainer.atomic import atomic_write_dir
    from trainer.checkpoint import checkpoint_entry, read_manifest, verify_checkpoint
    from trainer.config import config_from_dict
    from trainer.errors import CheckpointError

    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new export directory")
    manifest = read_manifest(run_dir)
    entry = checkpoint_entry(manifest, step)
    verify_checkpoint(run_dir, entry)
    cfg = config_from_dict({**manifest["config"], "init_from": None})
    data_dir = run_dir / DATA_DIR
    meta_path = data_dir / DATA_META
    tok = run_tokenizer(json.loads(meta_path.read_text()), data_dir) if meta_path.is_file() else None
    hf_config = hf_config_dict(cfg.model)
    tok_files: dict[str, str] = {}
    if tok is not None:
        tok_files = hf_tokenizer_files(tok, cfg.model)
        hf_config.update(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    weights = load_file(str(run_dir / entry["path"] / MODEL_FILE))
    state = to_hf_state_dict({k: v.to(torch.float32).contiguous() for k, v in weights.items()})
    provenance = {
        "source_run": str(run_dir.resolve()),
        "step": entry["step"],
        "tokens_seen": entry.get("tokens_seen"),
        "method": manifest["config"].get("method"),
        "source_sha256": entry["sha256"][MODEL_FILE],
        "format": "LlamaForCausalLM",
        "tokenizer": None if tok is None else tok.kind,
    }

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, text in tok_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n")

    atomic_write_dir(out_dir, fill)
    return out_dir
