"""Where the methods differ: a final-step, layer-mean metric per component (one run per method, or seeds)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import dynamics.plots._style as S
from dynamics.plots._common import (
    NoDataError,
    across_seeds,
    canonical_kind,
    check_table,
    drawable,
    has_seeds,
    merge_heads,
    ordered,
    select,
    without_factors,
)
from dynamics.seeds import seed_summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_component_summary", "plot_seed_summary"]


def plot_component_summary(
    table: pd.DataFrame, *, kind: str = "weight", metric: str = "proportional_effective_rank", step: int | None = None
) -> Figure:
    """Layer-mean ``metric`` per component at each run's final step (or ``step``), methods side by side.

    Bars are the mean over layers (and runs), whiskers the range over layers;
    with two or more runs (seeds) of every method, bars are the mean over seeds
    of each run's layer mean and whiskers its 95 % t-interval across seeds.
    Components: every component all methods have (projections, the per-head
    OV/QK circuits averaged over heads, ``embed``, ``lm_head`` ...), in
    :data:`dynamics.summary.COMPONENT_ORDER`; ReLoRA's adapter factors are left out.
    """
    caller = "plot_component_summary"
    table, kind = check_table(table, caller), canonical_kind(kind)
    rows = merge_heads(without_factors(select(table, caller, kind, metric)))
    per_method = [set(g["component"]) for _, g in rows.groupby("method")]
    comps = ordered(set.intersection(*per_method), kind) if per_method else []
    if not comps:
        raise NoDataError(f"{caller}: no {kind} {metric} component is present for every method")
    rows = drawable(rows[rows["component"].isin(comps)], caller, f"{kind} {metric}")
    if step is None:
        rows = rows[rows["step"] == rows.groupby("run")["step"].transform("max")]
    else:
        at = rows[rows["step"] == step]
        if at.empty:
            raise NoDataError(
                f"{caller}: no {kind} {metric} rows at step {step}; steps: "
                f"{sorted(int(s) for s in rows['step'].unique())}"
            )
        rows = at
    methods = S.methods_of(rows)
    final = {m: sorted({int(s) for s in rows.loc[rows["method"] == m, "step"]}) for m in methods}
    pal = S.method_palette(methods)
    seeds = has_seeds(rows)
    with S.theme():
        fig, axes = S.figure(1, 1, panel=(max(4.0, 0.55 * len(comps) * max(len(methods), 1) + 1.0), 3.2))
        ax = axes[0, 0]
        if seeds:
            _interval_bars(ax, across_seeds(rows, ["component", "method"]), comps, methods)
        else:
            _range_bars(ax, rows, comps, methods)
        ax.set_xlabel("component")
        ax.set_ylabel(S.short(metric))
        ax.tick_params(axis="x", labelrotation=30)
        where = "final step" if step is None else f"step {step}"
        what = (
            "bars: mean over seeds of the layer mean, whiskers: 95% t-interval across seeds"
            if seeds
            else "bars: layer mean, whiskers: range over layers"
        )
        ax.set_title(f"{S.KIND_LABELS.get(kind, kind)}: {S.METRIC_LABELS.get(metric, metric)} at the {where}\n{what}")
        runs = rows.groupby("method")["run"].nunique()
        handles = [
            S.handle(
                f"{S.label(m)} (step {', '.join(map(str, final[m]))}"
                + (f", n={int(runs[m])} seeds)" if seeds else ")"),
                color=pal[m],
                linewidth=6,
            )
            for m in methods
        ]
        S.legend(fig, handles, title="method")
    return fig


def _interval_bars(ax: Axes, stats: pd.DataFrame, comps: list[str], methods: list[str]) -> None:
    """Grouped bars at ``stats["mean"]`` per component and method, whiskers from ``low`` to ``high``."""
    pal = S.method_palette(methods)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        s = stats[stats["method"] == m].set_index("component").reindex(comps)
        xs = np.arange(len(comps)) - 0.4 + width * (j + 0.5)
        mean = s["mean"].to_numpy(dtype=float)
        lo, hi = s["low"].to_numpy(dtype=float), s["high"].to_numpy(dtype=float)
        ax.bar(xs, mean, width=width, color=pal[m])
        ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="0.2", capsize=3, linewidth=1.0)
    ax.set_xticks(range(len(comps)), comps)


def _range_bars(ax: Axes, rows: pd.DataFrame, comps: list[str], methods: list[str]) -> None:
    """Seaborn bars: mean over layers (and runs) per component and method, whiskers the range."""
    sns, _ = S.libs()
    sns.barplot(
        data=rows,
        x="component",
        y="value",
        hue="method",
        order=comps,
        hue_order=methods,
        palette=S.method_palette(methods),
        estimator="mean",
        errorbar=("pi", 100),
        capsize=0.15,
        err_kws={"linewidth": 1.0},
        legend=False,
        ax=ax,
    )


def plot_seed_summary(
    table: pd.DataFrame, *, kind: str = "weight", metric: str = "proportional_effective_rank"
) -> Figure:
    """Final-step layer-mean ``metric`` per component: each method's mean and 95 % interval across seeds, p-values.

    Needs two or more runs of each method (seed replicates); the numbers and the
    test named in the title are :func:`dynamics.seeds.seed_summary`'s. Above each
    component: the test's p and the Benjamini–Hochberg-adjusted p across the
    components, with ✓ where the difference survives (adjusted p < 0.05).
    """
    caller = "plot_seed_summary"
    table, kind = check_table(table, caller), canonical_kind(kind)
    runs = table[table["kind"] == kind].groupby("method")["run"].nunique()
    if runs.empty or (runs < 2).any():
        raise NoDataError(f"{caller}: needs >= 2 runs (seeds) of every method, got {runs.to_dict()}")
    summary = seed_summary(table, kind=kind, metric=metric)
    methods = [m for m in S.METHOD_ORDER if f"{m} mean" in summary.columns]
    pal = S.method_palette(methods)
    comps = list(summary.index)
    tests = sorted({t for t in summary["test"] if t})
    with S.theme():
        fig, axes = S.figure(1, 1, panel=(max(4.5, 0.7 * len(comps) + 1.0), 3.2))
        ax = axes[0, 0]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = np.arange(len(comps)) - 0.4 + width * (j + 0.5)
            mean = summary[f"{m} mean"].astype(float).to_numpy()
            lo = summary[f"{m} ci95 low"].astype(float).to_numpy()
            hi = summary[f"{m} ci95 high"].astype(float).to_numpy()
            ax.bar(xs, mean, width=width, color=pal[m])
            ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="0.2", capsize=3, linewidth=1.0)
        highs = summary[[f"{m} ci95 high" for m in methods]].astype(float).to_numpy()
        top = float(np.nanmax(highs)) if np.isfinite(highs).any() else 1.0
        lows = summary[[f"{m} ci95 low" for m in methods]].astype(float).to_numpy()
        span = top - min(0.0, float(np.nanmin(lows)) if np.isfinite(lows).any() else 0.0)
        for i, (p, q, sig) in enumerate(zip(summary["p_value"], summary["p_adjusted"], summary["significant"])):
            text = "not tested" if p is None else f"p={p:.2g}\nBH {q:.2g}{' ✓' if sig else ''}"
            ax.text(i, top + 0.03 * span, text, ha="center", va="bottom", fontsize=7)
        ax.set_ylim(top=top + 0.2 * span)
        ax.set_xticks(range(len(comps)), comps, rotation=30)
        ax.set_ylabel(S.short(metric))
        ax.set_title(
            f"{S.KIND_LABELS.get(kind, kind)}: {S.METRIC_LABELS.get(metric, metric)} at the final step\n"
            f"bars: mean over seeds, whiskers: 95% t-interval; p: {'; '.join(tests)}\n"
            "BH: p adjusted across components (Benjamini–Hochberg), ✓ where < 0.05"
        )
        S.legend(
            fig,
            [S.handle(f"{S.label(m)} (n={int(summary[f'{m} n'].max())})", color=pal[m], linewidth=6) for m in methods],
            title="method",
        )
    return fig
