"""The analysis table: known values, ReLoRA update ranks, caching, failures, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import dynamics
from dynamics.analyze import COLUMNS, AnalysisError, AnalysisOptions, analyze_runs, read_results
from dynamics.cli import main
from dynamics.summary import summarize
from trainer.config import build_config
from trainer.train import train

RANK = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = ["steps=8", "checkpoint_interval=4", "eval_interval=4", "seq_len=32", "batch_size=8", "warmup_steps=1",
            "data.train_tokens=40000", "data.val_tokens=4000", "eval_batches=1"]
    full = train(build_config(overrides=base), root / "full", progress=False)
    relora = train(build_config(overrides=base + ["method=relora", f"relora.rank={RANK}", "relora.alpha=8",
                                                  "relora.reset_every=4", "relora.restart_warmup=1"]),
                   root / "relora", progress=False)
    return full, relora


@pytest.fixture(scope="module")
def results(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "results.parquet"
    table, errors = analyze_runs(pair, out, progress=False)
    assert errors == []
    return table, out


def pick(table, **kw):
    m = np.ones(len(table), bool)
    for k, v in kw.items():
        m &= (table[k] == v).to_numpy()
    return table[m]


def test_schema_and_kinds(results):
    table, out = results
    assert list(table.columns) == COLUMNS
    assert set(table["method"]) == {"full", "relora"}
    kinds = set(pick(table, method="relora")["kind"])
    assert {"weight", "grad", "act", "update", "update_cumulative", "update_restart", "lora", "train"} <= kinds
    assert "update_restart" not in set(pick(table, method="full")["kind"])
    assert out.with_name("results.spectra.parquet").exists()
    assert read_results(out).shape == table.shape


def test_weight_metrics_match_a_direct_computation(results, pair):
    table, _ = results
    w = load_file(str(pair[0] / "checkpoints" / "step_000004" / "model.safetensors"))["layers.1.mlp.down.weight"]
    row = pick(table, run="full", step=4, layer=1, component="mlp.down", kind="weight", metric="proportional_effective_rank")
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    assert row["value"].item() == pytest.approx(np.exp(-(p * np.log(p)).sum()) / min(w.shape), rel=1e-9)


def test_relora_cycle_updates_have_rank_at_most_r_and_accumulate(results):
    table, _ = results
    wrapped = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
    restart = pick(table, run="relora", kind="update_restart", metric="numerical_rank")
    restart = restart[restart["component"].isin(wrapped)]
    assert len(restart) and restart["value"].max() <= RANK
    lora = pick(table, run="relora", kind="lora", metric="numerical_rank", step=4)
    assert len(lora) and lora["value"].max() <= RANK and lora["value"].min() >= 1
    cum = pick(table, run="relora", kind="update_cumulative", metric="numerical_rank", step=8)
    assert cum[cum["component"].isin(wrapped)]["value"].max() <= 2 * RANK  # two cycles
    full_cum = pick(table, run="full", kind="update_cumulative", metric="numerical_rank", step=8, component="mlp.up")
    assert full_cum["value"].min() > 2 * RANK  # full-rank training is not confined


def test_activation_rows_and_cka(results):
    table, _ = results
    cka = pick(table, run="full", kind="act", metric="cka_final", component="resid_post")
    assert len(cka) and cka["value"].between(0, 1 + 1e-9).all()
    assert set(pick(table, run="full", kind="act", metric="cka_prev")["step"]) == {4, 8}
    assert len(pick(table, run="full", kind="act", component="mlp.down.in", metric="proportional_effective_rank"))


def test_train_rows_every_step(results):
    table, _ = results
    loss = pick(table, run="full", kind="train", metric="loss")
    assert sorted(loss["step"]) == list(range(1, 9))


def test_rerun_uses_the_cache_and_a_changed_checkpoint_is_recomputed(results, pair, monkeypatch, tmp_path):
    table, out = results
    import dynamics.analyze as an

    def boom(*a, **k):
        raise AssertionError("recomputed a cached unit")

    monkeypatch.setattr(an, "analyze_unit", boom)
    again, _ = analyze_runs(pair, out, progress=False)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table.reset_index(drop=True))
    # a different run at the same path (different hashes in its manifest) is recomputed
    other = tmp_path / "full"
    shutil.copytree(pair[0], other)
    import json

    m = json.loads((other / "manifest.json").read_text())
    m["checkpoints"][1]["sha256"]["model.safetensors"] = "0" * 64
    from trainer.checkpoint import write_manifest

    write_manifest(other, m)  # a consistent manifest (valid checksum), only the hashes differ
    with pytest.raises(AssertionError, match="recomputed"):  # same name and cache, new hashes: not served from cache
        analyze_runs([other], out, progress=False)


def test_keep_going_analyses_the_rest(pair, tmp_path):
    broken = tmp_path / "relora"
    shutil.copytree(pair[1], broken)
    h5 = broken / "dynamics" / "step_000004.h5"
    h5.write_bytes(h5.read_bytes()[:200])
    with pytest.raises(AnalysisError, match="step 4"):
        analyze_runs([broken], tmp_path / "a.parquet", progress=False)
    with pytest.warns(UserWarning):
        table, errors = analyze_runs([broken], tmp_path / "b.parquet", keep_going=True, progress=False)
    assert len(errors) == 1 and "step 4" in errors[0] and "step_000004.h5" in errors[0]
    assert {0, 8} <= set(table["step"])


def test_parallel_workers_give_the_same_table(pair, results, tmp_path):
    table, _ = results
    par, errors = analyze_runs(pair, tmp_path / "p.parquet", workers=2, progress=False)
    key = ["run", "step", "layer", "component", "kind", "metric"]
    a = table.sort_values(key).reset_index(drop=True)
    b = par.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_summary_compares_methods(results):
    table, _ = results
    s = summarize(table)
    assert ("relora − full", "end") in s.columns
    assert "mlp.down" in s.index and not any("lora" in c for c in s.index)
    with pytest.raises(dynamics.DynamicsError, match="no rows"):
        summarize(table, kind="weight", metric="nope")


def test_cli_analyze_and_summary(pair, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["analyze", *map(str, pair), "--out", str(out), "--kinds", "weight,update", "--no-progress"]) == 0
    assert set(pd.read_csv(out)["kind"]) == {"weight", "update", "train", "run"}  # run: the seed row, always
    assert main(["summary", str(out)]) == 0
    assert "relora − full" in capsys.readouterr().out
    assert main(["analyze", str(pair[0]), "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["analyze", str(pair[0]), "--kinds", "weights", "--out", str(out)]) == 2
    assert main(["summary", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4


def test_issue9_rows_heavy_tails_spikes_subspaces_cross_run_and_seeds(results, pair, tmp_path):
    table, _ = results
    w = pick(table, kind="weight", method="full")
    # every whole matrix has a fit status; alpha only where the fit produced one, never NaN
    status = pick(w, metric="alpha_status")
    assert len(status) == len(pick(w, metric="mp_edge")) > 0
    assert set(status["value"]) <= {0.0, 1.0, 2.0, 3.0}
    alpha = pick(w, metric="alpha")
    assert len(alpha) == int((status["value"] <= 1).sum()) and np.isfinite(alpha["value"]).all()
    assert (alpha["value"] > 1).all()
    assert (pick(table, kind="grad", metric="signal_rank")["value"] >= 0).all()
    # intruders: none at the first checkpoint, counted for the wrapped projections only
    intr = pick(table, kind="weight", metric="intruders")
    assert (pick(intr, step=0)["value"] == 0).all() and set(intr["component"]) == {
        "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    # ReLoRA merges at 4 and 8: cycle 8 is compared with cycle 4, within [0, 1]
    ov = pick(table, kind="update_restart", metric="overlap_prev")
    assert set(ov["step"]) == {8} and ov["value"].between(0, 1).all()
    # cross-run rows live under the ReLoRA run; CKA at step 0 is 1 (same init, same probe)
    cross = pick(table, kind="cross_run")
    assert set(cross["method"]) == {"relora"} and set(cross["run"]) == {pair[1].name}
    assert {"update_overlap", "update_overlap_chance", "cka", "cka_debiased"} <= set(cross["metric"])
    np.testing.assert_allclose(pick(cross, step=0, metric="cka_debiased")["value"], 1.0, atol=1e-9)
    assert pick(cross, metric="update_overlap")["value"].between(0, 1).all()
    seeds = pick(table, kind="run", metric="seed")
    assert sorted(seeds["run"]) == sorted(p.name for p in pair) and (seeds["value"] == 0).all()
    # --basic: none of it
    basic, _ = analyze_runs(pair, tmp_path / "basic.parquet", options=AnalysisOptions.basic(), progress=False)
    assert not set(basic["metric"]) & {"alpha", "alpha_status", "signal_rank", "intruders", "overlap_prev"}
    assert "cross_run" not in set(basic["kind"])
    assert len(pick(basic, kind="weight", metric="proportional_effective_rank")) == len(
        pick(table, kind="weight", metric="proportional_effective_rank"))
