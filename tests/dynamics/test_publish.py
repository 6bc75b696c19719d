"""dynamics.publish and `dynamics analyze --log-to`: analysis curves in TensorBoard (and MLflow), read back with
the trackers' own readers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from dynamics.publish import publish, series
from dynamics.validation import DynamicsError

PER = "proportional_effective_rank"


def row(run, step, layer, component, kind, metric, value):
    return {"run": run, "method": "full", "step": step, "tokens": step * 10, "layer": layer, "component": component,
            "kind": kind, "metric": metric, "value": value}  # fmt: skip


@pytest.fixture
def table() -> pd.DataFrame:
    rows = []
    for step, shift in ((0, 0.0), (4, 0.1)):
        rows += [row("a", step, i, "attn.q", "weight", PER, 0.5 + 0.1 * i + shift) for i in range(3)]
        rows += [
            row("a", step, i, f"attn.ov.h{h}", "weight", PER, 0.2 * h + 0.01 * i) for i in range(2) for h in (0, 1)
        ]
        rows += [row("a", step, -1, "embed", "weight", "stable_rank", 3.0 + step)]
        rows += [row("a", step, 0, "attn.k", "weight", "condition_number", math.inf)]  # no finite value: no point
        rows += [row("a", step, 1, "attn.v", "weight", "condition_number", math.inf)]
        rows += [row("a", step, 0, "attn.v", "weight", "condition_number", 7.0)]  # the finite one only
        rows += [row("b", step, 0, "mlp.up", "grad", PER, 0.25)]
    rows += [row("a", 0, -1, "model", "run", "seed", 0.0)]  # not a curve
    return pd.DataFrame(rows)


def test_series_are_means_over_layers_and_heads(table) -> None:
    got = series(table)
    assert sorted(got) == ["a", "b"] and sorted(got["a"]) == [0, 4]
    a0, a4 = got["a"][0], got["a"][4]
    assert a0[f"weight/{PER}/attn.q"] == pytest.approx(0.6) and a4[f"weight/{PER}/attn.q"] == pytest.approx(0.7)
    assert a0[f"weight/{PER}/attn.ov"] == pytest.approx(np.mean([0.0, 0.01, 0.2, 0.21]))
    assert a4["weight/stable_rank/embed"] == 7.0
    assert a0["weight/condition_number/attn.v"] == 7.0
    assert "weight/condition_number/attn.k" not in a0
    assert not any(tag.startswith("run/") for tag in a0)
    assert got["b"][4] == {f"grad/{PER}/mlp.up": 0.25}
    with pytest.raises(DynamicsError, match="lacks the columns"):
        series(table.drop(columns=["metric"]))


def test_publish_to_tensorboard_reads_back(table, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    counts = publish(table, "tensorboard", tmp_path / "tb")
    expected = series(table)
    assert counts == {run: sum(len(v) for v in steps.values()) for run, steps in expected.items()}
    for run, steps in expected.items():
        acc = EventAccumulator(str(tmp_path / "tb" / run), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert tags == {tag for values in steps.values() for tag in values}
        for tag in tags:
            want = {s: v[tag] for s, v in steps.items() if tag in v}
            assert {e.step: e.value for e in acc.Scalars(tag)} == {
                s: pytest.approx(v, rel=1e-6) for s, v in want.items()
            }


def test_publish_to_mlflow_reads_back(table, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    publish(table, "mlflow", tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("relora-dynamics")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["a-analysis", "b-analysis"]
    history = client.get_metric_history(runs["a-analysis"], f"weight/{PER}/attn.q")
    assert {m.step: m.value for m in history} == {0: pytest.approx(0.6), 4: pytest.approx(0.7)}


def test_log_to_mistakes_are_one_line_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    from dynamics.cli import main

    missing = tmp_path / "no-such-run"  # never read: the checks come first
    assert main(["analyze", str(missing), "--log-to", "tensorbord", str(tmp_path / "tb")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --log-to: unknown tracker 'tensorbord'; choose from tensorboard, wandb, mlflow"
    )
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["analyze", str(missing), "--log-to", "tensorboard", str(tmp_path / "tb")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: logger=tensorboard needs the tensorboard package: pip install relora-dynamics[tensorboard]"
    )
    assert not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_analyze_log_to_tensorboard(trained_pair, tmp_path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dynamics.analyze import read_results
    from dynamics.cli import main

    out, tb = tmp_path / "results.parquet", tmp_path / "tb"
    args = ["analyze", *map(str, trained_pair), "--out", str(out), "--basic", "--kinds", "weight", "--no-progress"]
    assert main([*args, "--log-to", "tensorboard", str(tb)]) == 0
    assert "published" in capsys.readouterr().out
    table = read_results(out)
    rows = table[(table.kind == "weight") & (table.metric == PER) & (table.component == "mlp.down")]
    for run, per_run in rows.groupby("run"):
        acc = EventAccumulator(str(tb / str(run)), size_guidance={"scalars": 0})
        acc.Reload()
        want = per_run.groupby("step")["value"].mean()
        got = {e.step: e.value for e in acc.Scalars(f"weight/{PER}/mlp.down")}
        assert got == {int(s): pytest.approx(float(v), rel=1e-6) for s, v in want.items()}
        assert sorted(got) == [0, 4, 8]
