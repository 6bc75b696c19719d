"""dynamics.io: lazy reading of a run, clear errors for damaged or future files, keep-going iteration.

On the session's trained pair (tests/conftest.py): checkpoints and captures at steps 0, 4, 8; ReLoRA rank 4, alpha 8.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dynamics.io import DynamicsIOError, SchemaVersionError, open_run
from dynamics.validation import DynamicsError, DynamicsWarning
from trainer.run_format import MANIFEST, RUN_SCHEMA_VERSION


@pytest.fixture
def runs(trained_pair) -> dict[str, Path]:
    """The shared full-rank and ReLoRA micro runs (read-only: :func:`copy` one to damage it)."""
    return {"full": trained_pair.full, "relora": trained_pair.relora}


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
    assert (run.steps, run.capture_steps, run.layers, run.method) == ([0, 4, 8], [0, 4, 8], [0, 1, 2, 3], "full")
    assert run.config["model"]["d_model"] == 64 and run.probe["sha256"]
    assert opened == [] and read == []
    names = run.names("act", 8)
    assert names[:3] == ["layers.0.resid_pre", "layers.0.attn.q", "layers.0.attn.k"] and read == []
    out = run.get("act", 8, "layers.2.resid_mid")
    assert list(out) == ["layers.2.resid_mid"] and out["layers.2.resid_mid"].shape == (256, 64)
    assert read == ["/act/layers.2.resid_mid"]
    assert [o.rsplit("/", 1)[-1] for o in opened if o.endswith(".h5")] == ["step_000008.h5"] * 2  # names, get


def test_get_kinds_shapes_and_tensors(runs):
    run = open_run(runs["full"])
    grads = run.get("grad", 8, "layers.*.mlp.down", as_tensor=True)
    assert list(grads) == [f"layers.{i}.mlp.down" for i in range(4)]
    assert all(
        isinstance(g, torch.Tensor) and g.shape == (64, 256) and g.dtype == torch.float32 for g in grads.values()
    )
    hidden = run.get("act_in", 8, "layers.0.mlp.down", dtype=np.float32)["layers.0.mlp.down"]
    assert hidden.shape == (256, 256) and hidden.dtype == np.float32
    assert run.get("act", 0, ["layers.0.attn.q", "layers.3.attn.v"]).keys() == {"layers.0.attn.q", "layers.3.attn.v"}
    w = run.weights(8, "layers.1.attn.*")
    assert {k: v.shape for k, v in w.items()} == {
        "layers.1.attn.q": (64, 64),
        "layers.1.attn.k": (32, 64),
        "layers.1.attn.v": (32, 64),
        "layers.1.attn.o": (64, 64),
    }
    assert run.get("weight", 8, "lm_head")["lm_head"].shape == (512, 64)
    every = run.weights(8)
    shapes = run.weight_shapes(8)  # from the header: the shapes the tensors have, in model order
    assert shapes == {k: v.shape for k, v in every.items()} and list(shapes) == run.names("weight", 8)
    attrs = run.attrs(8)
    assert attrs["step"] == 8 and attrs["schema_version"] == 1 and attrs["config"]["method"] == "full"
    assert run.token_index().shape == (256,) and run.probe_inputs()["input_ids"].shape == (8, 32)
    assert run.lora_factors(8) == {} and run.lora_scale is None
    assert run.wrapped.targets == () and run.wrapped.rank is None and run.merge_every is None
    assert [s for s, _ in run.iter("grad", "layers.0.attn.q")] == [0, 4, 8]
    assert run.check() == {}


def test_lora_factors_and_frozen_base(runs):
    run = open_run(runs["relora"])
    assert run.lora_scale == 8 / 4 and run.wrapped.rank == 4 and run.merge_every == 4
    assert run.wrapped.targets == ("q", "k", "v", "o", "gate", "up", "down")
    f = run.lora_factors(8, "layers.2.mlp.up")
    assert {k: v.shape for k, v in f.items()} == {"layers.2.mlp.up.lora_a": (4, 64), "layers.2.mlp.up.lora_b": (256, 4)}
    base = run.weights(8, "layers.2.mlp.up", merged=False)["layers.2.mlp.up"]
    effective = run.weights(8, "layers.2.mlp.up")["layers.2.mlp.up"]
    np.testing.assert_allclose(
        base + run.lora_scale * f["layers.2.mlp.up.lora_b"] @ f["layers.2.mlp.up.lora_a"], effective, atol=1e-6
    )
    with h5py.File(run.capture_path(8)) as h:  # the capture file holds the same factors
        np.testing.assert_array_equal(h["weight/layers.2.mlp.up.lora_a"][()], f["layers.2.mlp.up.lora_a"])
    assert "layers.0.attn.q.lora_b" in run.names("grad", 8)


def _rewrite_config(path: Path, edit) -> None:
    """Apply ``edit`` to the stored config of the run at ``path`` and rewrite its manifest (valid checksum)."""
    from trainer.checkpoint import write_manifest

    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest["config"])
    write_manifest(path, manifest)


@pytest.mark.parametrize("missing", ["targets", "rank"])
def test_relora_run_without_targets_or_rank_is_an_error_not_a_default(copy, missing):
    path = copy("relora")
    _rewrite_config(path, lambda config: config["relora"].pop(missing))
    run = open_run(path)  # opening reads no setting it does not need
    with pytest.raises(DynamicsIOError, match=f"manifest.json.*relora.{missing}") as e:
        _ = run.wrapped
    assert e.value.path == path / MANIFEST
    with pytest.raises(DynamicsIOError, match="manifest.json"):
        _ = run.lora_scale


def test_merge_period_of_an_old_manifest_is_read_under_its_old_key(copy):
    path = copy("relora")

    def old_keys(config: dict) -> None:
        config["relora"]["reset_every"] = config["relora"].pop("merge_every")

    _rewrite_config(path, old_keys)
    assert open_run(path).merge_every == 4
    _rewrite_config(path, lambda config: config["relora"].pop("reset_every"))
    with pytest.raises(DynamicsIOError, match="relora.merge_every"):
        _ = open_run(path).merge_every


def test_truncated_file_is_named_and_never_stops_an_analysis(copy):
    path = copy()
    bad = path / "dynamics" / "step_000008.h5"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    run = open_run(path)
    with pytest.raises(DynamicsIOError, match="step_000008.h5") as e:
        run.get("act", 8, "layers.0.resid_pre")
    assert e.value.path == bad and isinstance(e.value, DynamicsError) and isinstance(e.value, OSError)
    assert str(e.value).startswith(str(bad))  # the message alone, no errno decoration
    with pytest.warns(DynamicsWarning, match="step_000008.h5"):
        assert run.get("act", 8, "layers.0.resid_pre", errors="skip") == {}
    with pytest.warns(DynamicsWarning, match="skipping step 8"):
        assert [s for s, _ in run.iter("act", "layers.0.resid_pre")] == [0, 4]
    assert list(run.check()) == [8] and "step_000008.h5" in run.check()[8]
    with pytest.raises(DynamicsIOError):
        list(run.iter("act", errors="raise"))


def test_corrupted_bytes_are_reported_with_the_file(copy):
    path = copy()
    bad = path / "dynamics" / "step_000008.h5"
    raw = bytearray(bad.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = bytes(4096)
    bad.write_bytes(bytes(raw))
    run = open_run(path)
    problems = run.check()
    assert list(problems) == [8] and "step_000008.h5" in problems[8]
    with warnings.catch_warnings(record=True) as caught:  # reading every dataset: errors name the file, never crash
        warnings.simplefilter("always")
        for kind in ("act", "act_in", "grad"):
            for step, _ in run.iter(kind):
                assert step in (0, 4, 8)
    assert all("step_000008.h5" in str(w.message) for w in caught)


def test_future_schema_version_is_refused_clearly(copy):
    path = copy()
    with h5py.File(path / "dynamics" / "step_000008.h5", "r+") as f:
        f.attrs["schema_version"] = 99
    run = open_run(path)
    with pytest.raises(SchemaVersionError, match=r"step_000008.h5 has capture schema_version 99, newer .*upgrade"):
        run.get("grad", 8)
    assert run.get("grad", 0)  # the other steps still read
    manifest = path / MANIFEST
    assert RUN_SCHEMA_VERSION < 7
    manifest.write_text(
        manifest.read_text().replace(f'"schema_version": {RUN_SCHEMA_VERSION}', '"schema_version": 7', 1)
    )
    with pytest.raises(SchemaVersionError, match="manifest.json has schema_version 7"):
        open_run(path)


def test_user_mistakes_get_clear_errors(runs, tmp_path):
    run = open_run(runs["full"])
    with pytest.raises(DynamicsError, match="no capture at step 3; available: \\[0, 4, 8\\]"):
        run.get("act", 3)
    with pytest.raises(DynamicsError, match="`kind` must be one of"):
        run.get("activation", 8)
    with pytest.raises(DynamicsError, match="no act names match 'layers.9.*'; available: layers.0.resid_pre"):
        run.get("act", 8, "layers.9.*")
    with pytest.raises(DynamicsIOError, match="not a run directory"):
        open_run(tmp_path)
