"""dynamics.report on synthetic results: the wording follows the statistics, the claims get verdicts only when tested."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from dynamics.report import ADJUST, CLAIMS, claims, headline_comparisons, headline_values, write_report
from dynamics.summary import COMPONENT_ORDER

STEPS = (0, 10, 20)
LAYERS = (0, 1)
PHENOMENA = ("overall", "agreement", "negation")


def make_results(effect: float, n_seeds: int = 3, seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A results table and an evaluation table for ``n_seeds`` seeds of both methods.

    ReLoRA's value = full-rank's + ``effect`` × (the study's direction) + small noise; each seed shares a base
    value between the methods (a paired design). ``effect = 0``: no true difference anywhere.
    """
    rng = np.random.default_rng(seed)
    rows, evals = [], []

    def add(run, method, step, layer, comp, kind, metric, value):
        rows.append(dict(run=run, method=method, step=step, tokens=step * 64, layer=layer, component=comp,
                         kind=kind, metric=metric, value=float(value)))  # fmt: skip

    bases = {s: rng.normal(0, 0.02, size=64) for s in range(n_seeds)}
    for s in range(n_seeds):
        for method in ("full", "relora"):
            run = method if s == 0 else f"{method}-seed{s}"
            sign = effect if method == "relora" else 0.0
            b = iter(bases[s])
            add(run, method, 0, -1, "model", "run", "seed", s)
            for step in STEPS:
                add(
                    run,
                    method,
                    step,
                    -1,
                    "model",
                    "train",
                    "loss",
                    4 - step / 10 + next(b) + sign + rng.normal(0, 0.003),
                )
                for comp in COMPONENT_ORDER:
                    base = next(b)
                    for layer in LAYERS:
                        noise = rng.normal(0, 0.003)
                        add(run, method, step, layer, comp, "weight", "proportional_effective_rank",
                            0.8 + base + noise - sign)  # fmt: skip
                        add(run, method, step, layer, comp, "grad", "proportional_effective_rank",
                            0.5 + base + noise - sign)  # fmt: skip
                        add(run, method, step, layer, comp, "grad", "log10_condition_number",
                            3 + base + noise + 5 * sign)  # fmt: skip
                        if step > 0:
                            add(run, method, step, layer, comp, "update_cumulative", "proportional_effective_rank",
                                0.4 + base + noise - sign)  # fmt: skip
            last = {"step": STEPS[-1], "tokens_seen": STEPS[-1] * 64, "method": method, "run": run, "seed": s}
            loss = 2.9 + next(b) + sign + rng.normal(0, 0.003)
            evals += [
                {**last, "metric": "val_loss", "phenomenon": None, "source": "validation", "value": loss},
                {**last, "metric": "val_ppl", "phenomenon": None, "source": "validation", "value": np.exp(loss)},
            ]
            for ph in PHENOMENA:
                acc = 0.8 + next(b) - sign + rng.normal(0, 0.003)
                evals.append({**last, "metric": "pair_acc", "phenomenon": ph, "source": "builtin", "value": acc})
    return pd.DataFrame(rows), pd.DataFrame(evals)


def _write(tmp_path, table, evals) -> str:
    path = write_report(
        tmp_path / "report.md",
        title="test",
        table=table,
        evals=evals,
        settings={"model": "synthetic"},
        figures=[],
        timings={"train": 1.0, "total (wall)": 2.0},
        scale="synthetic, 0.3M parameters",
        sizes="micro",
    )
    return path.read_text()


def _claims_rows(text: str) -> list[str]:
    section = text.split("## Claims of the study")[1].split("## Comparisons")[0]
    return [ln for ln in section.splitlines() if ln.startswith("| C")]


def test_headline_values_cover_every_comparison():
    table, evals = make_results(0.1)
    values = headline_values(table, evals)
    quantities = list(dict.fromkeys(values["quantity"]))
    assert quantities[:3] == ["validation loss (nats/token)", "validation perplexity", "minimal-pair accuracy: overall"]
    for short in ("weight PER", "gradient PER", "gradient log10 κ", "update PER"):
        assert [q for q in quantities if q.startswith(short + " · ")] == [f"{short} · {c}" for c in COMPONENT_ORDER]
    assert set(values["seed"]) == {0, 1, 2}
    # a component value is the run's layer mean at its final step
    q = values[(values["quantity"] == "weight PER · attn.q") & (values["run"] == "relora-seed1")]["value"].item()
    raw = table[(table.run == "relora-seed1") & (table.kind == "weight") & (table.component == "attn.q")]
    assert q == pytest.approx(raw[raw.step == 20]["value"].mean())


def test_no_true_difference_calls_nothing_significant(tmp_path):
    table, evals = make_results(0.0)
    comps = headline_comparisons(table, evals)
    assert len(comps) == 3 + len(PHENOMENA) - 1 + 4 * len(COMPONENT_ORDER)
    assert (comps["test"] == "paired t-test").all()
    assert not comps["significant"].any()
    text = _write(tmp_path, table, evals)
    assert "✓ |" not in text and not re.search(r"ReLoRA (lower|higher) \(", text)
    assert "no detectable difference" in text
    rows = _claims_rows(text)
    assert len(rows) == 6
    assert all("**inconclusive**" in r for r in rows[:5]) and "**not evaluable**" in rows[5]
    assert "Benjamini–Hochberg" in text and "Holm" in text  # the procedures are named
    assert not re.search(r"\b(better|worse)\b", text)


def test_large_planted_difference_is_found(tmp_path):
    table, evals = make_results(0.1)
    comps = headline_comparisons(table, evals)
    assert comps["significant"].all()
    loss = comps.loc["validation loss (nats/token)"]
    assert loss["difference low"] < 0.1 < loss["difference high"]
    text = _write(tmp_path, table, evals)
    assert "ReLoRA higher" in text and "ReLoRA lower" in text and "✓" in text
    verdicts = claims(table, evals, comparisons=comps)["verdict"]
    assert verdicts[[c.key for c in CLAIMS[:5]]].tolist() == ["supported"] * 5
    assert verdicts["C6"] == "not evaluable"
    assert "lower in 7 of 7 projections (7 with a" in claims(table, evals, comparisons=comps).loc["C3", "statistic"]
    # the opposite direction contradicts the claims
    flipped = claims(*make_results(-0.1))["verdict"]
    assert flipped[[c.key for c in CLAIMS[:5]]].tolist() == ["contradicted"] * 5


def test_single_seed_gives_no_verdicts(tmp_path):
    table, evals = make_results(0.1, n_seeds=1)
    text = _write(tmp_path, table, evals)
    assert "no comparison can be tested" in text and "not tested" in text
    rows = _claims_rows(text)
    assert all("**not testable**" in r for r in rows[:5]) and "**not evaluable**" in rows[5]
    assert not re.search(r"\b(supported|contradicted|inconclusive|better|worse)\b", text.replace("*", ""))
    assert not re.search(r"\bp (= \d|< 0\.001)", text) and "✓" not in text


def test_unpaired_runs_fall_back_to_welch(tmp_path):
    table, evals = make_results(0.1)
    table = table[table.kind != "run"]  # no seed rows
    evals = evals.drop(columns="seed")
    comps = headline_comparisons(table, evals)
    assert (comps["test"] == "Welch's t-test").all() and (comps["effect name"] == "Hedges' g").all()
    assert ADJUST == "bh"


def test_summary_command_prints_intervals_and_tests(tmp_path, capsys):
    from dynamics.cli import main

    table, _ = make_results(0.1)
    path = tmp_path / "results.parquet"
    table.to_parquet(path, index=False)
    assert main(["summary", str(path), "--kind", "grad"]) == 0
    out = capsys.readouterr().out
    assert "Across seeds" in out and "Benjamini–Hochberg" in out and "paired t-test" in out
    section = out.split("Across seeds")[1]
    for comp in COMPONENT_ORDER:
        line = next(ln for ln in section.splitlines() if ln.startswith(comp + " "))
        assert "Cohen's d_z" in line and line.rstrip().endswith("yes")  # planted difference: survives
    assert main(["summary", str(path), "--adjust", "holm"]) == 0
    assert "(Holm)" in capsys.readouterr().out
    one, _ = make_results(0.1, n_seeds=1)
    one.to_parquet(path, index=False)
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no interval across seeds and no test" in out and "Cohen" not in out
