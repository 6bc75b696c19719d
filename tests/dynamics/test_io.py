"""dynamics.io: lazy reading of a run, clear errors for damaged or future files, keep-going iteration."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dynamics.io import DynamicsIOError, SchemaVersionError, open_run
from dynamics.validation import DynamicsError, DynamicsWarning
from trainer.config import build_config
from trainer.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus) -> dict[str, Path]:
    """Full-rank and ReLoRA micro runs, 5 steps, checkpoints and captures at 0 and 5."""
    base = ["data.source=text", f"data.path={text_corpus}", "seq_len=32", "batch_size=8", "eval_interval=5",
            "eval_batches=2", "checkpoint_interval=5", "warmup_steps=2", "steps=5"]
    root = tmp_path_factory.mktemp("io")
    relora = ["method=relora", "relora.reset_every=4", "relora.restart_warmup=1"]
    return {"full": train(build_config(overrides=base), root / "full", progress=False),
            "relora": train(build_config(overrides=base + relora), root / "relora", progress=False)}


@pytest.fixture
def copy(runs, tmp_path):
    """A private copy of a run, to damage."""
    def make(method: str = "full") -> Path:
        return Path(shutil.copytree(runs[method], tmp_path / method))
    return make


def test_opening_a_run_reads_no_hdf5_and_get_reads_only_what_is_asked(runs, monkeypatch):
    opened, read = [], []
    real_open, real_getitem = h5py.File.__init__, h5py.Dataset.__getitem__

    def spy_open(self, name, *a, **k):
        opened.append(str(name))
        return real_open(self, name, *a, **k)

    def spy_getitem(self, key):
        read.append(self.name)
        return real_getitem(self, key)

    monkeypatch.setattr(h5py.File, "__init__", spy_open)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy_getitem)
    run = open_run(runs["full"])
    assert (run.steps, run.capture_steps, run.layers, run.method) == ([0, 5], [0, 5], [0, 1, 2, 3], "full")
    assert run.config["model"]["d_model"] == 64 and run.probe["sha256"]
    assert opened == [] and read == []
    names = run.names("act", 5)
    assert names[:3] == ["layers.0.resid_pre", "layers.0.attn.q", "layers.0.attn.k"] and read == []
    out = run.get("act", 5, "layers.2.resid_mid")
    assert list(out) == ["layers.2.resid_mid"] and out["layers.2.resid_mid"].shape == (256, 64)
    assert read == ["/act/layers.2.resid_mid"]
    assert [o.rsplit("/", 1)[-1] for o in opened if o.endswith(".h5")] == ["step_000005.h5"] * 2  # names, get


def test_get_kinds_shapes_and_tensors(runs):
    run = open_run(runs["full"])
    grads = run.get("grad", 5, "layers.*.mlp.down", as_tensor=True)
    assert list(grads) == [f"layers.{i}.mlp.down" for i in range(4)]
    assert all(isinstance(g, torch.Tensor) and g.shape == (64, 256) and g.dtype == torch.float32 for g in grads.values())
    hidden = run.get("act_in", 5, "layers.0.mlp.down", dtype=np.float32)["layers.0.mlp.down"]
    assert hidden.shape == (256, 256) and hidden.dtype == np.float32
    assert run.get("act", 0, ["layers.0.attn.q", "layers.3.attn.v"]).keys() == {"layers.0.attn.q", "layers.3.attn.v"}
    w = run.weights(5, "layers.1.attn.*")
    assert {k: v.shape for k, v in w.items()} == {"layers.1.attn.q": (64, 64), "layers.1.attn.k": (32, 64),
                                                 "layers.1.attn.v": (32, 64), "layers.1.attn.o": (64, 64)}
    assert run.get("weight", 5, "lm_head")["lm_head"].shape == (512, 64)
    attrs = run.attrs(5)
    assert attrs["step"] == 5 and attrs["schema_version"] == 1 and attrs["config"]["method"] == "full"
    assert run.token_index().shape == (256,) and run.probe_inputs()["input_ids"].shape == (8, 32)
    assert run.lora_factors(5) == {} and run.lora_scale is None
    assert [s for s, _ in run.iter("grad", "layers.0.attn.q")] == [0, 5]
    assert run.check() == {}


def test_lora_factors_and_frozen_base(runs):
    run = open_run(runs["relora"])
    assert run.lora_scale == 32 / 16
    f = run.lora_factors(5, "layers.2.mlp.up")
    assert {k: v.shape for k, v in f.items()} == {"layers.2.mlp.up.lora_a": (16, 64), "layers.2.mlp.up.lora_b": (256, 16)}
    base = run.weights(5, "layers.2.mlp.up", merged=False)["layers.2.mlp.up"]
    effective = run.weights(5, "layers.2.mlp.up")["layers.2.mlp.up"]
    np.testing.assert_allclose(base + run.lora_scale * f["layers.2.mlp.up.lora_b"] @ f["layers.2.mlp.up.lora_a"],
                               effective, atol=1e-6)
    with h5py.File(run.capture_path(5)) as h:  # the capture file holds the same factors
        np.testing.assert_array_equal(h["weight/layers.2.mlp.up.lora_a"][()], f["layers.2.mlp.up.lora_a"])
    assert "layers.0.attn.q.lora_b" in run.names("grad", 5)


def test_truncated_file_is_named_and_never_stops_an_analysis(copy):
    path = copy()
    bad = path / "dynamics" / "step_000005.h5"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    run = open_run(path)
    with pytest.raises(DynamicsIOError, match="step_000005.h5") as e:
        run.get("act", 5, "layers.0.resid_pre")
    assert e.value.path == bad and isinstance(e.value, DynamicsError)
    with pytest.warns(DynamicsWarning, match="step_000005.h5"):
        assert run.get("act", 5, "layers.0.resid_pre", errors="skip") == {}
    with pytest.warns(DynamicsWarning, match="skipping step 5"):
        assert [s for s, _ in run.iter("act", "layers.0.resid_pre")] == [0]
    assert list(run.check()) == [5] and "step_000005.h5" in run.check()[5]
    with pytest.raises(DynamicsIOError):
        list(run.iter("act", errors="raise"))


def test_corrupted_bytes_are_reported_with_the_file(copy):
    path = copy()
    bad = path / "dynamics" / "step_000005.h5"
    raw = bytearray(bad.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 4096] = bytes(4096)
    bad.write_bytes(bytes(raw))
    run = open_run(path)
    problems = run.check()
    assert list(problems) == [5] and "step_000005.h5" in problems[5]
    with warnings.catch_warnings(record=True) as caught:  # reading every dataset: errors name the file, never crash
        warnings.simplefilter("always")
        for kind in ("act", "act_in", "grad"):
            for step, out in run.iter(kind):
                assert step in (0, 5)
    assert all("step_000005.h5" in str(w.message) for w in caught)


def test_future_schema_version_is_refused_clearly(copy):
    path = copy()
    with h5py.File(path / "dynamics" / "step_000005.h5", "r+") as f:
        f.attrs["schema_version"] = 99
    run = open_run(path)
    with pytest.raises(SchemaVersionError, match=r"step_000005.h5 has capture schema_version 99, newer .*upgrade"):
        run.get("grad", 5)
    assert run.get("grad", 0)  # the other steps still read
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version": 1', '"schema_version": 7', 1))
    with pytest.raises(SchemaVersionError, match="manifest.json has schema_version 7"):
        open_run(path)


def test_user_mistakes_get_clear_errors(runs, tmp_path):
    run = open_run(runs["full"])
    with pytest.raises(DynamicsError, match="no capture at step 3; available: \\[0, 5\\]"):
        run.get("act", 3)
    with pytest.raises(DynamicsError, match="`kind` must be one of"):
        run.get("activation", 5)
    with pytest.raises(DynamicsError, match="no act names match 'layers.9.*'; available: layers.0.resid_pre"):
        run.get("act", 5, "layers.9.*")
    with pytest.raises(DynamicsIOError, match="not a run directory"):
        open_run(tmp_path)
