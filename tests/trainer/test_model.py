"""The pico-decoder: sizes against SPEC, causality, reference logits, and that it can learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import MODEL_PRESETS
from trainer.hf import hf_config_dict, to_hf_state_dict
from trainer.model import Decoder, count_parameters
from trainer.names import matrix_names


@pytest.mark.parametrize("preset, expected_millions", [("tiny", 11.3), ("small", 64.6)])
def test_preset_parameter_counts_match_spec(preset, expected_millions):
    # SPEC §2: tiny ≈ 11.3M (reported 11.2M), small ≈ 64.6M parameters.
    with torch.device("meta"):
        model = Decoder(MODEL_PRESETS[preset])
    n = count_parameters(model)
    assert abs(n / 1e6 - expected_millions) < 0.06, n


def test_spec_architecture_of_tiny():
    cfg = MODEL_PRESETS["tiny"]
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_kv_heads) == (12, 96, 384, 12, 4)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (50304, 2048, 10000.0, 1e-6)


def test_module_paths_are_canonical_and_bias_free():
    model = Decoder(MODEL_PRESETS["micro"])
    names = {n for n, _ in model.named_modules()}
    assert set(matrix_names(4)) <= names
    for i in range(4):
        assert {f"layers.{i}.resid_pre", f"layers.{i}.resid_mid", f"layers.{i}.resid_post"} <= names
    keys = set(model.state_dict())
    assert {"embed.weight", "final_norm.weight", "lm_head.weight"} <= keys
    assert not any(k.endswith("bias") for k in keys)
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # untied


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = Decoder(MODEL_PRESETS["micro"]).eval()
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 512, (2, 6))  # change only the future
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, 512)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_logits_match_huggingface_llama():
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(MODEL_PRESETS["micro"], rope_theta=500.0, n_heads=8, n_kv_heads=2)
    torch.manual_seed(1)
    ours = Decoder(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hc = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hc)).eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not missing and not unexpected
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=0)


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = Decoder(MODEL_PRESETS["micro"])
    x = torch.randint(0, 512, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model.loss(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.5  # ≈ ln(512) at init
    assert loss.item() < 0.05
