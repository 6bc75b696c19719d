"""The analysis table: known values, ReLoRA update ranks, caching, failures, CLI (on the session's trained pair)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import dynamics
from dynamics.analyze import COLUMNS, AnalysisError, AnalysisOptions, analyze_runs, read_results
from dynamics.cli import main
from dynamics.summary import COMPONENT_ORDER, summarize
from trainer.run_format import RESULTS_COLUMNS

RANK = 4  # the shared pair's ReLoRA rank (tests/conftest.py)


@pytest.fixture
def pair(trained_pair):
    return trained_pair


@pytest.fixture
def results(analysed_pair):
    return analysed_pair


def pick(table, **kw):
    m = np.ones(len(table), bool)
    for k, v in kw.items():
        m &= (table[k] == v).to_numpy()
    return table[m]


def test_schema_and_kinds(results):
    table, out = results
    assert list(table.columns) == COLUMNS == list(RESULTS_COLUMNS)
    assert set(table["method"]) == {"full", "relora"}
    kinds = set(pick(table, method="relora")["kind"])
    assert {"weight", "grad", "act", "update", "update_cumulative", "update_merge", "lora", "train"} <= kinds
    assert "update_merge" not in set(pick(table, method="full")["kind"]) and "update_restart" not in set(table["kind"])
    assert out.with_name("results.spectra.parquet").exists()
    assert read_results(out).shape == table.shape


def test_weight_metrics_match_a_direct_computation(results, pair):
    table, _ = results
    w = load_file(str(pair[0] / "checkpoints" / "step_000004" / "model.safetensors"))["layers.1.mlp.down.weight"]
    row = pick(
        table, run="full", step=4, layer=1, component="mlp.down", kind="weight", metric="proportional_effective_rank"
    )
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    assert row["value"].item() == pytest.approx(np.exp(-(p * np.log(p)).sum()) / min(w.shape), rel=1e-9)


def test_relora_cycle_updates_have_rank_at_most_r_and_accumulate(results):
    table, _ = results
    wrapped = list(COMPONENT_ORDER)  # the pair's ReLoRA run wraps every projection
    cycle = pick(table, run="relora", kind="update_merge", metric="numerical_rank")
    cycle = cycle[cycle["component"].isin(wrapped)]
    assert len(cycle) and cycle["value"].max() <= RANK
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
    table, shared = results
    out = tmp_path / "cached" / shared.name  # a copy of the shared table and its cache, to re-run against
    shutil.copytree(shared.parent, out.parent)
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


def test_keep_going_never_hides_a_bug(pair, monkeypatch, tmp_path):
    """``--keep-going`` skips bad inputs only: a programming error (here a KeyError) surfaces."""
    import dynamics.analyze as an

    def bug(*args, **kwargs):
        raise KeyError("a bug, not a bad input")

    monkeypatch.setattr(an, "analyze_unit", bug)
    with pytest.raises(KeyError, match="a bug"):
        analyze_runs([pair.full], tmp_path / "bug.parquet", keep_going=True, progress=False)


def test_old_kind_name_is_an_alias(tmp_path):
    """``update_restart`` (the old name of ``update_merge``) selects the new kind; old tables read with it renamed."""
    assert AnalysisOptions(kinds=("weight", "update_restart")).kinds == ("weight", "update_merge")
    with pytest.raises(AnalysisError, match="unknown analysis kinds \\['weights'\\]"):
        AnalysisOptions(kinds=("weights",))
    old = pd.DataFrame(
        [
            {
                "run": "r",
                "method": "relora",
                "step": 4,
                "tokens": 1,
                "layer": 0,
                "component": "attn.q",
                "kind": "update_restart",
                "metric": "numerical_rank",
                "value": 2.0,
            }
        ],
        columns=COLUMNS,
    )
    old.to_csv(tmp_path / "old.csv", index=False)
    assert list(read_results(tmp_path / "old.csv")["kind"]) == ["update_merge"]


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
    assert (pick(intr, step=0)["value"] == 0).all() and set(intr["component"]) == set(COMPONENT_ORDER)
    # ReLoRA merges at 4 and 8: cycle 8 is compared with cycle 4, within [0, 1]
    ov = pick(table, kind="update_merge", metric="overlap_prev")
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
    assert not set(basic["metric"]) & {"alpha", "alpha_status", "signal_rank", "intruders", "overlap_prev", "gini"}
    assert "cross_run" not in set(basic["kind"])
    assert len(pick(basic, kind="weight", metric="proportional_effective_rank")) == len(
        pick(table, kind="weight", metric="proportional_effective_rank")
    )


def test_issue18_sparsity_norm_and_cca_rows(results, pair):
    """Gini/Hoyer/∞-norm of weights, gradients and updates; norms from the spectra; SVCCA/PWCCA beside CKA."""
    from dynamics.analyze import analyze_unit
    from dynamics.cross_run import cross_run_rows
    from dynamics.similarity import MIN_TOKENS_PER_FEATURE

    table, out = results
    for kind in ("weight", "grad", "update", "update_cumulative", "update_merge"):
        gini = pick(table, kind=kind, metric="gini")
        assert len(gini) and gini["value"].between(0, 1).all(), kind
        assert pick(table, kind=kind, metric="hoyer_sparsity")["value"].between(0, 1).all(), kind
        assert len(pick(table, kind=kind, metric="induced_inf_norm")) == len(gini), kind
    assert not len(pick(table, kind="lora", metric="gini"))  # factored s·B·A: spectral norms only
    # one weight's entry metrics against a direct computation from its checkpoint
    w = load_file(str(pair[0] / "checkpoints" / "step_000004" / "model.safetensors"))["layers.1.mlp.down.weight"]
    a = np.sort(np.abs(w.astype(np.float64)).ravel())
    n = a.size

    def value(metric):
        return pick(table, run="full", step=4, layer=1, component="mlp.down", kind="weight", metric=metric)[
            "value"
        ].item()

    assert value("gini") == pytest.approx(((2 * np.arange(1, n + 1) - n - 1) * a).sum() / (n * a.sum()), rel=1e-12)
    assert value("hoyer_sparsity") == pytest.approx((np.sqrt(n) - a.sum() / np.linalg.norm(a)) / (np.sqrt(n) - 1))
    assert value("induced_inf_norm") == pytest.approx(np.abs(w.astype(np.float64)).sum(axis=1).max(), rel=1e-12)
    # norms come from the stored spectrum: frobenius² = Σσ², nuclear = Σσ, spectral = σ₁, for every spectrum row
    keys = ["run", "step", "layer", "component", "kind"]
    spectra = pd.read_parquet(out.with_name("results.spectra.parquet"))
    norms = table[table["metric"].isin(["frobenius_norm", "nuclear_norm", "spectral_norm"])]
    norms = norms.pivot_table(index=keys, columns="metric", values="value").reset_index()
    joined = spectra.merge(norms, on=keys, how="left")
    assert len(joined) == len(spectra) and joined["frobenius_norm"].notna().all()
    sigma = joined["values"].map(np.asarray)
    np.testing.assert_allclose(joined["frobenius_norm"] ** 2, sigma.map(lambda s: (s**2).sum()), rtol=1e-10)
    np.testing.assert_allclose(joined["nuclear_norm"], sigma.map(np.sum), rtol=1e-10)
    np.testing.assert_allclose(joined["spectral_norm"], sigma.map(np.max), rtol=1e-12)
    # SVCCA/PWCCA rows exactly where the probe has MIN_TOKENS_PER_FEATURE tokens per feature (256 x 64 here: none)
    acts = dynamics.open_run(pair[0]).get("act", 4, "layers.0.resid_post")["layers.0.resid_post"]
    tokens, features = int(np.prod(acts.shape[:-1])), acts.shape[-1]
    enough = tokens >= MIN_TOKENS_PER_FEATURE * features
    assert bool(len(pick(table, kind="act", component="resid_post", metric="svcca_prev"))) == enough
    assert bool(len(pick(table, kind="cross_run", component="resid_post", metric="pwcca"))) == enough
    # with a lower threshold: ReLoRA vs full-rank at step 0 (same init, same probe) is 1; within a run in [0, 1]
    site = ("act:layers.*.resid_post",)
    cross = pd.DataFrame(
        cross_run_rows(
            str(pair[1]), str(pair[0]), 0, act_sites=site, label="r", updates=False, cca_min_tokens_per_feature=2
        )
    )
    for metric in ("svcca", "pwcca"):
        same = cross[cross["metric"] == metric]
        assert len(same) == 4 and np.allclose(same["value"], 1.0, atol=1e-6), metric  # the pair has 4 layers
    opts = AnalysisOptions.basic(kinds=("act",), act_sites=site, cca=True, cca_min_tokens_per_feature=2)
    rows = pd.DataFrame(analyze_unit(str(pair[0]), 4, opts)[0])
    within = rows[rows["metric"].isin(["svcca_prev", "pwcca_prev", "svcca_final", "pwcca_final"])]
    assert set(within["metric"]) == {"svcca_prev", "pwcca_prev", "svcca_final", "pwcca_final"}
    assert len(within) == 16 and within["value"].between(0, 1).all()
    assert (within["value"] > 0.5).all()  # 4 steps of training leave the residual stream closely related
