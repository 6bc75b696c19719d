"""Seeds and confidence: per-component values of each run, and the method comparison across seed replicates.

A *replicate* is one run; its value for a component is the mean over layers
of ``metric`` at the run's final step (per-head circuits ``attn.ov.h3`` are
averaged into ``attn.ov``). :func:`seed_summary` compares the methods per
component with :func:`dynamics.stats.compare_methods`: per method the mean and
its 95 % Student-t interval (needs ``n >= 2``); the difference (ReLoRA −
full-rank) paired by seed (the ``kind = "run"``, ``metric = "seed"`` rows of
``dynamics analyze``) with the paired t-test (Wilcoxon signed-rank from 6
pairs on) and Cohen's d_z, or, for runs that cannot be paired, Welch's t-test
and Hedges' g; p-values adjusted across the components (Benjamini–Hochberg by
default). The test used is named in the ``test`` column; with too few
replicates the column says so and there is no p-value (never a silent number).
:func:`mean_interval` and :func:`paired_test` live in :mod:`dynamics.stats`
and are re-exported here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.stats import compare_methods, mean_interval, paired_test
from dynamics.summary import COMPONENT_ORDER
from dynamics.validation import DynamicsError

__all__ = [
    "replicate_values",
    "mean_interval",
    "paired_test",
    "seed_summary",
    "format_seed_summary",
]  # the middle two: dynamics.stats

_HEAD = r"\.h\d+$"


def replicate_values(table: pd.DataFrame, *, kind: str, metric: str, step: int | None = None) -> pd.DataFrame:
    """One value per (run, component): the layer mean of ``metric`` at each run's final step (or ``step``).

    Returns columns ``run, method, seed, component, value`` (``seed`` NaN-free:
    ``-1`` when the table has no seed row for the run).
    """
    rows = table[(table["kind"] == kind) & (table["metric"] == metric)].copy()
    rows = rows[~rows["component"].astype(str).str.contains(r"\.lora_[ab]$", regex=True)]
    if rows.empty:
        have = sorted(set(zip(table["kind"], table["metric"])))[:12]
        raise DynamicsError(f"seed summary: no rows with kind={kind!r} and metric={metric!r}; some available: {have}")
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce").astype(float)
    rows = rows[np.isfinite(rows["value"])]
    rows["component"] = rows["component"].astype(str).str.replace(_HEAD, "", regex=True)
    if step is None:
        rows = rows[rows["step"] == rows.groupby("run")["step"].transform("max")]
    else:
        rows = rows[rows["step"] == step]
    vals = rows.groupby(["run", "method", "component"], as_index=False)["value"].mean()
    seeds = table[(table["kind"] == "run") & (table["metric"] == "seed")].groupby("run")["value"].first()
    vals["seed"] = vals["run"].map(seeds).fillna(-1).astype(int)
    out: pd.DataFrame = vals[["run", "method", "seed", "component", "value"]]
    return out


def seed_summary(
    table: pd.DataFrame,
    *,
    kind: str = "weight",
    metric: str = "proportional_effective_rank",
    methods: tuple[str, str] = ("full", "relora"),
    step: int | None = None,
    adjust: str = "bh",
) -> pd.DataFrame:
    """Per component: each method's mean, 95 % interval and run count across seeds, and the test of the difference.

    Columns: ``<method> mean``, ``<method> ci95 low``, ``<method> ci95 high``,
    ``<method> n`` for both methods, then ``difference`` (mean of
    ``methods[1] − methods[0]``, paired by seed when possible),
    ``difference ci95 low``, ``difference ci95 high``, ``statistic``,
    ``p_value``, ``test`` (the test's name, or why none was run: the interval
    and test cells are empty (``None``) then, never a made-up number),
    ``effect size`` with its ``effect name`` (Cohen's d_z paired, Hedges' g
    unpaired), ``p_adjusted`` (``adjust``: ``"bh"`` Benjamini–Hochberg or
    ``"holm"``, across the components) and ``significant`` (adjusted p < 0.05).
    """
    vals = replicate_values(table, kind=kind, metric=metric, step=step)
    try:
        result = compare_methods(vals.rename(columns={"component": "quantity"}), methods=methods, adjust=adjust)
    except DynamicsError:
        raise DynamicsError(
            f"seed summary: no component has rows of both methods {list(methods)} for kind={kind!r}, metric={metric!r}"
        ) from None
    renamed = {f"{m} {b}": f"{m} ci95 {b}" for m in (*methods, "difference") for b in ("low", "high")}
    result = result.rename(columns=renamed)
    order = [c for c in COMPONENT_ORDER if c in result.index] + sorted(
        c for c in result.index if c not in COMPONENT_ORDER
    )
    result = result.loc[order]
    result.index.name = f"{kind} {metric} (layer mean, final step)"
    return result


def format_seed_summary(summary: pd.DataFrame, methods: tuple[str, str] = ("full", "relora")) -> str:
    """:func:`seed_summary` as a plain-text table: ``mean [95% CI]`` per method, Δ with its interval, the test,
    p, the effect size, the adjusted p and ``yes`` where the difference survives the adjustment."""
    from dynamics.stats import format_p

    def num(x: object) -> str:
        return "–" if x is None else f"{float(x):.4g}"  # type: ignore[arg-type]

    def ci(mean: object, lo: object, hi: object) -> str:
        return num(mean) if lo is None else f"{num(mean)} [{num(lo)}, {num(hi)}]"

    rows = {}
    for comp, r in summary.iterrows():
        cells = {
            f"{m} mean [95% CI] (n)": f"{ci(r[f'{m} mean'], r[f'{m} ci95 low'], r[f'{m} ci95 high'])} ({r[f'{m} n']})"
            for m in methods
        }
        cells["Δ relora − full [95% CI]"] = ci(r["difference"], r["difference ci95 low"], r["difference ci95 high"])
        cells["test"] = str(r["test"])
        cells["p"] = format_p(r["p_value"])
        cells["effect size"] = "–" if r["effect size"] is None else f"{r['effect name']} {float(r['effect size']):+.2f}"
        cells["adjusted p"] = format_p(r["p_adjusted"])
        cells["survives"] = {True: "yes", False: "no", None: "–"}[r["significant"]]
        rows[comp] = cells
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = summary.index.name
    return frame.to_string()
