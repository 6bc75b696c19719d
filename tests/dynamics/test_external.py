"""Checkpoints from outside the trainer: HF step folders, safetensors, weights_only torch files, hostile files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dynamics
from dynamics.analyze import AnalysisOptions, analyze_runs
from dynamics.cli import main
from dynamics.external import (
    UntrustedCheckpointError,
    canonical_name,
    find_checkpoints,
    import_checkpoints,
    load_matrices,
)
from dynamics.io import DynamicsIOError
from trainer.config import build_config
from trainer.hf import hf_config_dict, to_hf_state_dict
from trainer.model import Decoder


def _micro_state(seed: int):
    """Freshly initialised ``micro`` weights (our names) and the model config."""
    cfg = build_config(overrides=[f"seed={seed}"]).model
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Decoder(cfg).state_dict().items()}, cfg


@pytest.fixture(scope="module")
def hf_steps(tmp_path_factory):
    """A folder of Hugging Face LLaMA step directories (the published pico-decoder layout): step0/, step1000/."""
    root = tmp_path_factory.mktemp("hf") / "pico-micro"
    states = {}
    for step, seed in ((0, 0), (1000, 1)):
        state, cfg = _micro_state(seed)
        d = root / f"step{step}"
        d.mkdir(parents=True)
        save_file({k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(state).items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
        states[step] = state
    return root, states, cfg


def test_hf_keys_map_to_canonical_names():
    assert canonical_name("model.layers.3.self_attn.q_proj.weight") == "layers.3.attn.q.weight"
    assert canonical_name("model.layers.0.mlp.down_proj.weight") == "layers.0.mlp.down.weight"
    assert canonical_name("model.embed_tokens.weight") == "embed.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"
    assert canonical_name("layers.1.attn.o.weight") == "layers.1.attn.o.weight"  # ours: unchanged
    assert canonical_name("transformer.h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"


def test_step_directories_are_found_in_step_order(hf_steps, tmp_path):
    root, _, _ = hf_steps
    found = find_checkpoints(root)
    assert [s for s, _ in found] == [0, 1000]
    for name in ("checkpoint-20", "step_3", "not-a-step"):
        (tmp_path / name).mkdir()
        save_file({"w.weight": torch.ones(2, 3)}, str(tmp_path / name / "model.safetensors"))
    assert [s for s, _ in find_checkpoints(tmp_path)] == [3, 20]


def test_analyze_reads_a_hf_step_folder_like_a_run(hf_steps, tmp_path):
    root, states, cfg = hf_steps
    out = tmp_path / "results.parquet"
    assert main(["analyze", str(root), "--out", str(out), "--no-progress"]) == 0
    table = dynamics.read_results(out)
    assert set(table["step"]) == {0, 1000} and set(table["run"]) == {"pico-micro"}
    w = table[(table.kind == "weight") & (table.metric == "effective_rank")]
    q = w[(w.step == 1000) & (w.layer == 1) & (w.component == "attn.q")]["value"].item()
    expected = dynamics.effective_rank(states[1000]["layers.1.attn.q.weight"].to(torch.bfloat16).double().numpy())
    assert q == pytest.approx(expected, rel=1e-9)
    # config.json gave the head layout, so per-head circuits are analysed too
    assert {f"attn.ov.h{h}" for h in range(cfg.n_heads)} <= set(w["component"])
    upd = table[(table.kind == "update") & (table.step == 1000) & (table.component == "mlp.down")]
    assert len(upd[upd.metric == "numerical_rank"]) == cfg.n_layers
    # 1-D norm gains are not matrices: left out
    assert not any("norm" in c for c in table["component"])


def test_reimport_of_an_unchanged_source_is_skipped(hf_steps, tmp_path):
    root, _, _ = hf_steps
    dst = import_checkpoints(root, tmp_path / "imp", progress=False)
    before = (dst / "manifest.json").stat().st_mtime_ns
    model_file = dst / "checkpoints/step_001000/model.safetensors"
    before_model = model_file.stat().st_mtime_ns
    import_checkpoints(root, dst, progress=False)
    assert (dst / "manifest.json").stat().st_mtime_ns == before
    assert model_file.stat().st_mtime_ns == before_model
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["config"]["model"]["n_heads"] == 4 and manifest["config"]["imported"] is True


def test_a_relora_import_states_what_was_wrapped(hf_steps, tmp_path):
    """An imported ReLoRA run carries the wrapped targets and rank it was given; without them the import refuses."""
    root, _, _ = hf_steps
    with pytest.raises(dynamics.DynamicsError, match="relora.targets"):
        import_checkpoints(root, tmp_path / "bad", method="relora", progress=False)
    assert not (tmp_path / "bad").exists()
    dst = import_checkpoints(
        root, tmp_path / "qv", method="relora", relora={"targets": ["q", "v"], "rank": 4}, progress=False
    )
    run = dynamics.open_run(dst)
    assert (run.wrapped.targets, run.wrapped.rank, run.merge_every) == (("q", "v"), 4, None)
    table, errors = analyze_runs([dst], tmp_path / "r.parquet", options=AnalysisOptions.basic(), progress=False)
    assert errors == [] and set(table.loc[table["kind"] == "weight", "step"]) == {0, 1000}


def test_torch_state_dict_file_is_loaded_with_weights_only(tmp_path):
    state, _ = _micro_state(0)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": to_hf_state_dict(state), "epoch": 3}, path)
    mats = load_matrices([path])
    assert set(mats) == {k for k, v in state.items() if v.ndim == 2}
    torch.testing.assert_close(mats["layers.0.mlp.up.weight"], state["layers.0.mlp.up.weight"])


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    torch.save({"w.weight": torch.ones(2, 2), "evil": _Exploit(str(marker))}, path)
    with pytest.raises(UntrustedCheckpointError, match="refused"):
        load_matrices([path])
    assert main(["analyze", str(path), "--out", str(tmp_path / "r.parquet"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "refused" in err[0]
    assert not marker.exists()


def test_safetensors_with_a_hostile_header_is_reported_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"w.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)  # offsets far beyond the file
    with pytest.raises(DynamicsIOError, match="model.safetensors"):
        load_matrices([path])


def test_keep_going_skips_a_bad_input_and_analyses_the_rest(hf_steps, tmp_path):
    root, _, _ = hf_steps
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.warns(UserWarning, match="broken.safetensors"):
        table, errors = analyze_runs([bad, root], tmp_path / "r.parquet", keep_going=True, progress=False)
    assert len(errors) == 1 and "broken.safetensors" in errors[0]
    assert set(table["run"]) == {"pico-micro"}


def test_missing_and_empty_inputs_give_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, words in ((tmp_path / "nope", "not found"), (tmp_path / "empty", "no checkpoints found")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dynamics.cli",
                "analyze",
                str(target),
                "--out",
                str(tmp_path / "r.parquet"),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr
