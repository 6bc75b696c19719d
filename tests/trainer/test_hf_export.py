"""`dynamics export --to hf`: a directory transformers loads, with our logits (ReLoRA: the live adapters' function)."""

from __future__ import annotations

import json

import pytest
import torch

from dynamics.cli import main
from trainer.config import build_config
from trainer.train import Trainer

transformers = pytest.importorskip("transformers")

RELORA = ["method=relora", "relora.rank=4", "relora.alpha=8", "relora.merge_every=4", "relora.lr_restart_warmup=1"]


def test_one_key_map_both_ways():
    """Export (trainer.hf) and import (dynamics.external) use the one map of trainer.run_format, inverse of each other."""
    from dynamics.external import canonical_name
    from trainer import run_format
    from trainer.hf import hf_key, to_hf_state_dict
    from trainer.model import Decoder

    assert hf_key is run_format.hf_key
    state = Decoder(build_config().model).state_dict()
    hf = to_hf_state_dict(state)
    assert "model.layers.0.self_attn.q_proj.weight" in hf and "model.embed_tokens.weight" in hf
    assert {canonical_name(k) for k in hf} == set(state)
    with pytest.raises(KeyError, match="no Hugging Face LLaMA equivalent"):
        hf_key("layers.0.attn.q.lora_a.weight")


@pytest.mark.parametrize("method", ["full", "relora"])
def test_exported_model_reproduces_the_trained_model_logits(tmp_path, fast_overrides, method):
    overrides = fast_overrides + ["steps=6", "checkpoint_interval=6"] + (RELORA if method == "relora" else [])
    trainer = Trainer(build_config(overrides=overrides), tmp_path / "run", progress=False, echo=lambda s: None)
    trainer.setup()
    trainer.run()
    trainer.cleanup()
    if method == "relora":  # step 6 is mid-cycle: the adapters hold a non-zero update that export must include
        assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_b" in n)

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--step", "6", "--to", "hf", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "export.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert json.loads((out / "export.json").read_text())["step"] == 6

    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    model = trainer.model.eval()
    tokens = torch.randint(0, trainer.cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_directory_and_a_missing_step(tmp_path, fast_overrides, capsys):
    from trainer.train import train

    train(
        build_config(overrides=fast_overrides + ["steps=3", "checkpoint_interval=3"]), tmp_path / "run", progress=False
    )
    (tmp_path / "taken").mkdir()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--step", "7", str(tmp_path / "new")]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
