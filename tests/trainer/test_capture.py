"""Dense capture: the documented schema, canonical names, no effect on training, the effective-weight gradient."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from trainer import relora
from trainer.capture import (
    CAPTURE_SCHEMA_VERSION,
    activation_sites,
    capture_gradients,
    capture_model,
    choose_probe,
    estimate_bytes,
    gradient_names,
)
from trainer.checkpoint import load_checkpoint, read_manifest, write_manifest
from trainer.config import ConfigError, build_config
from trainer.model import Decoder
from trainer.train import Trainer, train

RELORA = ["method=relora", "relora.merge_every=4", "relora.lr_restart_warmup=1"]


def _h5(run: Path, step: int) -> h5py.File:
    return h5py.File(run / "dynamics" / f"step_{step:06d}.h5", "r")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_overrides) -> dict[str, Path]:
    """A full-rank and a ReLoRA micro run, 5 steps, checkpoints (and captures) at 0 and 5; token sample capped at 100."""
    base = [*fast_overrides, "steps=5", "capture.token_sample=100"]
    root = tmp_path_factory.mktemp("capture")
    return {
        "full": train(build_config(overrides=base), root / "full", progress=False),
        "relora": train(build_config(overrides=base + RELORA), root / "relora", progress=False),
    }


# micro: D=64, H·Hd=64, G·Hd=32, F=256, 4 layers, r=16; the shapes of data/README.md "Dynamics capture files"
D, Q, KV, F, R, L, K, N, T = 64, 64, 32, 256, 16, 4, 100, 8, 32
ACT = {
    "resid_pre": D,
    "attn.q": Q,
    "attn.k": KV,
    "attn.v": KV,
    "attn.o": D,
    "resid_mid": D,
    "mlp.gate": F,
    "mlp.up": F,
    "mlp.down": D,
    "resid_post": D,
}
ACT_IN = {"attn.o": Q, "mlp.down": F}
GRAD = {
    "attn.q": (Q, D),
    "attn.k": (KV, D),
    "attn.v": (KV, D),
    "attn.o": (D, Q),
    "mlp.gate": (F, D),
    "mlp.up": (F, D),
    "mlp.down": (D, F),
}


@pytest.mark.parametrize("method", ["full", "relora"])
def test_every_documented_dataset_has_its_documented_shape(runs, method):
    with _h5(runs[method], 5) as f:
        assert f.attrs["schema_version"] == CAPTURE_SCHEMA_VERSION == 1
        for key in (
            "step",
            "tokens_seen",
            "lr",
            "loss",
            "val_loss",
            "probe_loss",
            "grad_loss",
            "method",
            "wrapped",
            "merges",
            "lora_scale",
            "seed",
            "config",
            "code_version",
            "probe_sha256",
            "act_dtype",
            "grad_dtype",
        ):
            assert key in f.attrs, key
        assert (f.attrs["step"], f.attrs["tokens_seen"], f.attrs["method"]) == (5, 5 * 8 * 32, method)
        assert np.isfinite(f.attrs["loss"]) and np.isfinite(f.attrs["probe_loss"]) and f.attrs["lr"] >= 0
        assert json.loads(f.attrs["config"])["method"] == method
        probe = {
            "input_ids": ((N, T), np.int32),
            "windows": ((N,), np.int64),
            "token_index": ((K,), np.int64),
            "grad_input_ids": ((8, T), np.int32),
            "grad_windows": ((8,), np.int64),
        }
        assert {k: (f["probe"][k].shape, f["probe"][k].dtype) for k in f["probe"]} == probe
        expected = {}
        for i in range(L):
            expected.update({f"act/layers.{i}.{n}": ((K, w), np.float16) for n, w in ACT.items()})
            expected.update({f"act_in/layers.{i}.{n}": ((K, w), np.float16) for n, w in ACT_IN.items()})
            expected.update({f"grad/layers.{i}.{n}": (s, np.float32) for n, s in GRAD.items()})
            if method == "relora":
                for n, (out, inp) in GRAD.items():
                    expected[f"grad/layers.{i}.{n}.lora_a"] = ((R, inp), np.float32)
                    expected[f"grad/layers.{i}.{n}.lora_b"] = ((out, R), np.float32)
                    expected[f"weight/layers.{i}.{n}.lora_a"] = ((R, inp), np.float32)
                    expected[f"weight/layers.{i}.{n}.lora_b"] = ((out, R), np.float32)
        found = {f"{g}/{n}": (f[g][n].shape, f[g][n].dtype) for g in ("act", "act_in", "grad", "weight") for n in f[g]}
        assert found == expected
        for key in expected:
            ds = f[key]
            assert ds.chunks is not None and ds.compression == "gzip" and ds.fletcher32, key
        assert np.all(np.diff(f["probe/token_index"][()]) > 0) and f["probe/token_index"][-1] < N * T


def test_captured_names_are_the_module_paths(runs):
    for method, run in runs.items():
        cfg = build_config(overrides=["method=" + method] + (RELORA[1:] if method == "relora" else []))
        model = Decoder(cfg.model)
        if method == "relora":
            relora.wrap_model(model, cfg.relora, torch.Generator().manual_seed(0))
        paths = {n for n, _ in model.named_modules()}
        state_keys = {k.rsplit(".", 1)[0] for k in model.state_dict()}
        with _h5(run, 5) as f:
            for group in ("act", "act_in", "grad", "weight"):
                assert set(f[group]) <= paths, group
            assert set(f["grad"]) <= state_keys
            projections = {n for n in paths if n.split(".")[-1] in ("q", "k", "v", "o", "gate", "up", "down")}
            assert {n for n in f["grad"] if not n.endswith(("lora_a", "lora_b"))} == projections
            assert set(f["act"]) == projections | {n for n in paths if n.split(".")[-1].startswith("resid_")}


def test_effective_weight_gradient_equals_full_rank_gradient_of_merged_model():
    cfg = build_config(overrides=["model.n_layers=2", "method=relora", "relora.rank=4", "relora.dropout=0.3"])
    torch.manual_seed(0)
    model = Decoder(cfg.model)
    relora.wrap_model(model, cfg.relora, torch.Generator().manual_seed(1))
    with torch.no_grad():  # a non-zero adapter, so the effective weight differs from the frozen base
        for m in relora.relora_modules(model).values():
            m.lora_b.weight.normal_(0, 0.05)
    x = torch.randint(0, cfg.model.vocab_size, (3, 16))
    y = torch.randint(0, cfg.model.vocab_size, (3, 16))
    names = gradient_names(model, ("**",))
    model.eval()
    grads, loss = capture_gradients(model, x, y, names, device=torch.device("cpu"), batch_size=2)  # 2 chunks

    merged = Decoder(cfg.model)
    merged.load_state_dict(relora.dense_state_dict(model))
    merged_loss = merged.loss(x, y)
    merged_loss.backward()
    assert loss == pytest.approx(float(merged_loss.detach()), rel=1e-5)

    def close(a, b):  # float32 sums over 48 tokens in different orders
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

    for name, m in merged.named_modules():
        if name in grads:
            close(grads[name], m.weight.grad)
    assert any(n.endswith(".lora_a") for n in grads)
    model.loss(x, y).backward()  # eval mode: the factor gradients equal plain autograd's
    for name, m in relora.relora_modules(model).items():
        close(grads[f"{name}.lora_a"], m.lora_a.weight.grad)
        close(grads[f"{name}.lora_b"], m.lora_b.weight.grad)
        assert m.weight.grad is None  # the frozen base stays frozen


def test_capture_pass_leaves_model_rng_and_grads_untouched(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + RELORA + ["relora.dropout=0.5"])
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.setup()
    model = t.model
    model.train()
    sentinel = {p: torch.full_like(p, 7.0) for p in model.parameters() if p.requires_grad}
    for p, g in sentinel.items():
        p.grad = g
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    captured = capture_model(model, t.capturer.probe, cfg, device=t.device, batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is g for p, g in sentinel.items())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    again = capture_model(model, t.capturer.probe, cfg, device=t.device, batch_size=8)  # no dropout: deterministic
    for kind in ("act", "grad"):
        for name, arr in captured.data[kind].items():
            np.testing.assert_allclose(arr, again.data[kind][name], rtol=1e-5, atol=1e-6)
    t.cleanup()


@pytest.mark.parametrize("method", ["full", "relora"])
def test_weights_after_training_are_bit_identical_with_and_without_capture(tmp_path, fast_overrides, method):
    extra = ["steps=10"] + (RELORA + ["relora.dropout=0.2"] if method == "relora" else [])
    on = train(build_config(overrides=fast_overrides + extra), tmp_path / "on", progress=False)
    off = train(
        build_config(overrides=fast_overrides + extra + ["capture.enabled=false"]), tmp_path / "off", progress=False
    )
    assert (on / "dynamics" / "step_000010.h5").exists() and not (off / "dynamics").exists()
    a, b = load_checkpoint(on), load_checkpoint(off)
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for i in a.optimizer["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a.optimizer["state"][i][key], b.optimizer["state"][i][key])
    assert torch.equal(a.rng["torch"], b.rng["torch"])
    la = [json.loads(x).get("loss") for x in (on / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x).get("loss") for x in (off / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_probe_set_is_fixed_recorded_and_shared_across_seeds(runs, text_corpus):
    run = runs["full"]
    manifest = read_manifest(run)
    probe = manifest["probe"]
    assert len(probe["act"]["windows"]) == 8 and len(probe["grad"]["windows"]) == 8 and probe["act"]["n_tokens"] == K
    files = [_h5(run, s) for s in (0, 5)]
    try:
        for key in ("input_ids", "windows", "token_index", "grad_input_ids", "grad_windows"):
            assert np.array_equal(files[0]["probe"][key][()], files[1]["probe"][key][()])
        assert list(files[0]["probe/windows"][()]) == probe["act"]["windows"]
        assert files[0].attrs["probe_sha256"] == files[1].attrs["probe_sha256"] == probe["sha256"]
    finally:
        for f in files:
            f.close()
    for entry in manifest["checkpoints"]:  # every capture is listed with its hash
        from trainer.atomic import sha256_file

        assert entry["dynamics"]["path"] == f"dynamics/step_{entry['step']:06d}.h5"
        assert sha256_file(run / entry["dynamics"]["path"]) == entry["dynamics"]["sha256"]
    # the probe depends on the data and capture.seed only: full-rank and ReLoRA runs, any seed, share it
    assert read_manifest(runs["relora"])["probe"]["sha256"] == probe["sha256"]
    from trainer.data import prepare

    cfg = build_config(
        overrides=["data.source=text", f"data.path={text_corpus}", "seq_len=32", "seed=3", "capture.token_sample=100"]
    )
    data = prepare(cfg.data, run / "data")
    assert choose_probe(cfg, data.train, data.val).sha256 == probe["sha256"]


def test_capture_every_and_config_checks(tmp_path, fast_overrides):
    run = train(
        build_config(overrides=fast_overrides + ["steps=12", "capture.every=10"]), tmp_path / "r", progress=False
    )
    assert sorted(p.name for p in (run / "dynamics").iterdir()) == [
        "step_000000.h5",
        "step_000010.h5",
        "step_000012.h5",
    ]  # every 10th step, and the last
    entries = read_manifest(run)["checkpoints"]
    assert [e["step"] for e in entries if "dynamics" in e] == [0, 10, 12]
    for bad, needle in (
        (["capture.every=7"], "multiple of checkpoint_interval"),
        (["capture.act_dtype=bfloat16"], "capture.act_dtype must be one of"),
        (["capture.token_sample=0"], "capture.token_sample must be > 0"),
        (["capture.compression=zstd"], "capture.compression must be one of"),
    ):
        with pytest.raises(ConfigError, match=needle):
            build_config(overrides=fast_overrides + bad)


def test_resume_recaptures_an_unlisted_step_identically(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + ["steps=10"])
    ref = train(cfg, tmp_path / "ref", progress=False)
    t = Trainer(cfg, tmp_path / "split", progress=False)
    t.setup()
    t.run(stop_at=5)
    t.cleanup()
    split = tmp_path / "split"
    # a crash after the checkpoint was listed but before its capture was: no file, no manifest record
    manifest = json.loads((split / "manifest.json").read_text())
    del manifest["checkpoints"][-1]["dynamics"]
    write_manifest(split, manifest)  # as the trainer writes it (with a valid checksum)
    (split / "dynamics" / "step_000005.h5").unlink()
    (split / "dynamics" / ".step_000005.h5.abc.tmp").write_bytes(b"partial")
    train(cfg, split, resume=True, progress=False)
    assert not list((split / "dynamics").glob(".*"))
    assert [e["step"] for e in read_manifest(split)["checkpoints"] if "dynamics" in e] == [0, 5, 10]
    for step in (5, 10):
        with _h5(ref, step) as a, _h5(split, step) as b:
            for group in ("act", "act_in", "grad"):
                for name in a[group]:
                    assert np.array_equal(a[group][name][()], b[group][name][()]), (step, group, name)
            for key in ("step", "tokens_seen", "lr", "loss", "probe_loss", "grad_loss"):
                assert a.attrs[key] == b.attrs[key]


def test_default_volume_stays_within_tens_of_gb_at_small():
    tiny = estimate_bytes(build_config(preset="tiny"))
    small = estimate_bytes(build_config(preset="small"))
    assert tiny["total"] < small["total"] < 250e6  # 200 checkpoints of small: < 50 GB
    full = estimate_bytes(build_config(preset="small", overrides=["capture.token_sample=null"]))
    assert full["act"] > 2e9  # all 8 × 2048 positions: SPEC §4's "about 2.4 GB per checkpoint"


def test_sites_follow_the_globs():
    cfg = build_config(overrides=["capture.act_names=[layers.0.mlp.*]", "capture.grad_names=[lm_head,embed]"])
    model = Decoder(cfg.model)
    assert activation_sites(model, cfg.capture.act_names) == [
        ("act", "layers.0.mlp.gate"),
        ("act", "layers.0.mlp.up"),
        ("act_in", "layers.0.mlp.down"),
        ("act", "layers.0.mlp.down"),
    ]
    assert gradient_names(model, cfg.capture.grad_names) == ["embed", "lm_head"]
