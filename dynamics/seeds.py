"""Seeds and confidence: mean and 95 % interval across seed replicates, and a paired test of the method difference.

A *replicate* is one run; its value for a component is the mean over layers
of ``metric`` at the run's final step (per-head circuits ``attn.ov.h3`` are
averaged into ``attn.ov``). Per method, over its replicates: mean, the 95 %
Student-t interval ``mean ± t_{0.975, n−1}·sd/√n`` (needs ``n ≥ 2``). The
method difference (ReLoRA − full-rank) is tested per component with a
**paired t-test** (``scipy.stats.ttest_rel``) on runs paired by seed (the
``kind = "run"``, ``metric = "seed"`` rows of ``dynamics analyze``); runs that
cannot be paired by seed get **Welch's t-test** (``scipy.stats.ttest_ind``,
``equal_var=False``). The test used is named in the ``test`` column; with too
few replicates the column says so and there is no p-value (never a silent
number).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from dynamics.summary import COMPONENT_ORDER
from dynamics.validation import DynamicsError

__all__ = ["replicate_values", "mean_interval", "paired_test", "seed_summary"]

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


def mean_interval(values: npt.ArrayLike, confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)`` of the Student-t interval; ``low``/``high`` are ``None`` with fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise DynamicsError("mean_interval(): no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_test(a: npt.ArrayLike, b: npt.ArrayLike, *, paired: bool = True) -> dict[str, Any]:
    """Test ``mean(b − a) = 0``: paired t-test (``paired``, equal lengths) or Welch's t-test.

    Returns ``{"test": name, "n": pairs or (n_a, n_b), "statistic": t or None, "p_value": p or None}``;
    ``statistic``/``p_value`` are ``None`` (and ``test`` says why) when there are
    too few values or no variation to test.
    """
    from scipy import stats

    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n: int | tuple[int, int]
    if paired:
        if xa.shape != xb.shape:
            raise DynamicsError(f"paired_test(): paired samples need equal lengths, got {xa.size} and {xb.size}")
        name, n = "paired t-test (scipy.stats.ttest_rel)", int(xa.size)
        if xa.size < 2:
            return {"test": f"no test: {xa.size} seed pair (need >= 2)", "n": n, "statistic": None, "p_value": None}
        if np.allclose(xb - xa, (xb - xa)[0]):
            return {"test": "no test: identical differences in every pair", "n": n, "statistic": None, "p_value": None}
        res = stats.ttest_rel(xb, xa)
    else:
        name, n = "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)", (int(xa.size), int(xb.size))
        if min(xa.size, xb.size) < 2:
            return {
                "test": f"no test: {min(xa.size, xb.size)} run of a method (need >= 2)",
                "n": n,
                "statistic": None,
                "p_value": None,
            }
        if np.ptp(xa) == 0 and np.ptp(xb) == 0:
            return {"test": "no test: no variation within either method", "n": n, "statistic": None, "p_value": None}
        res = stats.ttest_ind(xb, xa, equal_var=False)
    return {"test": name, "n": n, "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def seed_summary(
    table: pd.DataFrame,
    *,
    kind: str = "weight",
    metric: str = "proportional_effective_rank",
    methods: tuple[str, str] = ("full", "relora"),
    step: int | None = None,
) -> pd.DataFrame:
    """Per component: each method's mean, 95 % interval and run count across seeds, and the test of the difference.

    Columns: ``<method> mean``, ``<method> ci95 low``, ``<method> ci95 high``,
    ``<method> n`` for both methods, then ``difference`` (mean of
    ``methods[1] − methods[0]``, paired by seed when possible), ``statistic``,
    ``p_value`` and ``test`` (the test's name, or why none was run; the interval
    and test cells are empty (``None``) then, never a made-up number).
    """
    vals = replicate_values(table, kind=kind, metric=metric, step=step)
    a_name, b_name = methods
    out = []
    for comp, g in vals.groupby("component", sort=False):
        row: dict[str, Any] = {"component": comp}
        per: dict[str, pd.DataFrame] = {}
        for m in methods:
            x = g[g["method"] == m].sort_values("seed")
            per[m] = x
            if x.empty:
                row.update({f"{m} mean": None, f"{m} ci95 low": None, f"{m} ci95 high": None, f"{m} n": 0})
                continue
            mean, lo, hi = mean_interval(x["value"].to_numpy())
            row.update({f"{m} mean": mean, f"{m} ci95 low": lo, f"{m} ci95 high": hi, f"{m} n": len(x)})
        a, b = per[a_name], per[b_name]
        if a.empty or b.empty:
            continue
        seeds_a, seeds_b = a["seed"].tolist(), b["seed"].tolist()
        pairable = len(seeds_a) == len(set(seeds_a)) and sorted(seeds_a) == sorted(seeds_b) and -1 not in seeds_a
        if pairable:
            av = a.set_index("seed")["value"]
            bv = b.set_index("seed")["value"].reindex(av.index)
            test = paired_test(av.to_numpy(), bv.to_numpy(), paired=True)
            diff = float((bv - av).mean())
        else:
            test = paired_test(a["value"].to_numpy(), b["value"].to_numpy(), paired=False)
            diff = float(b["value"].mean() - a["value"].mean())
        row.update(
            {"difference": diff, "statistic": test["statistic"], "p_value": test["p_value"], "test": test["test"]}
        )
        out.append(row)
    if not out:
        raise DynamicsError(
            f"seed summary: no component has rows of both methods {list(methods)} for kind={kind!r}, metric={metric!r}"
        )
    result = pd.DataFrame(out).set_index("component")
    order = [c for c in COMPONENT_ORDER if c in result.index] + sorted(
        c for c in result.index if c not in COMPONENT_ORDER
    )
    result = result.loc[order].astype(object)
    result.index.name = f"{kind} {metric} (layer mean, final step)"
    return result
