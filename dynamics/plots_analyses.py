"""Figures of the analyses beyond spectral metrics (heavy tails, spikes, subspaces, intruders, cross-run CKA, seeds).

Same conventions as :mod:`dynamics.plots` (methods' colours, theme, one legend
outside, a :class:`~dynamics.validation.DynamicsError` naming what is missing).
Lines are the mean over layers; the band is the **95 % t-interval across
seeds** of that layer mean when every method has two or more runs, else the
range over layers (each figure's title says which).

============================== ==============================================================
:func:`plot_heavy_tails`       ESD power-law alpha of weights and gradients (status-ok fits only)
:func:`plot_signal_rank`       singular values above the Marchenko–Pastur edge, and their energy
:func:`plot_subspaces`         ReLoRA cycle-update overlap with the previous cycle; ReLoRA vs
                               full-rank cumulative-update overlap; chance levels dashed
:func:`plot_intruders`         intruder dimensions of ``W_t`` against ``W_0``
:func:`plot_cross_run_cka`     debiased (and biased) CKA ReLoRA vs full-rank, layer × step
:func:`plot_seed_summary`      final-step means with 95 % intervals per method and the test's p-value
============================== ==============================================================
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from dynamics import plots as P
from dynamics.validation import DynamicsError

__all__ = ["plot_heavy_tails", "plot_signal_rank", "plot_subspaces", "plot_intruders", "plot_cross_run_cka",
           "plot_seed_summary"]

WRAPPED = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def _t_interval(v: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    v = np.asarray(v, dtype=float)
    m = float(v.mean())
    if v.size < 2:
        return m, m
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m - half, m + half


def _rows(table: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    rows = table[(table["kind"] == kind) & (table["metric"] == metric)]
    return rows[rows["component"].isin(WRAPPED)]


def _grid(table: pd.DataFrame, specs: Sequence[tuple[str, str, str]], caller: str, title: str, *,
          chance: dict[int, tuple[str, str]] | None = None, keep=None, x: str = "tokens"):
    """Rows = ``specs`` (kind, metric, y label), columns = wrapped projections; method lines, layer mean.

    ``chance[i] = (kind, metric)``: a dashed grey line of that metric's mean in row ``i``.
    ``keep(rows, kind, metric)`` may filter the rows of a spec (e.g. status-ok fits).
    """
    table = P._check_table(table, caller)
    parts = []
    for i, (kind, metric, _) in enumerate(specs):
        r = _rows(table, kind, metric)
        if keep is not None:
            r = keep(table, r, kind, metric)
        parts.append(r.assign(_spec=i))
    rows = pd.concat(parts, ignore_index=True)
    if rows.empty:
        wanted = ", ".join(f"{k}/{m}" for k, m, _ in specs)
        raise DynamicsError(f"{caller}: the table has no rows of {wanted} for the wrapped projections; "
                            f"kinds in the table: {sorted(set(table['kind']))}. Run `dynamics analyze` without --basic.")
    rows, _ = P._finite(P._numeric(rows), caller)
    x = P._x(rows, x, caller)
    per_run = rows.groupby(["_spec", "method", "run", "component", "step"], as_index=False).agg(
        value=("value", "mean"), tokens=("tokens", "first"))
    methods = P._methods(rows)
    seeds = all(rows.loc[rows["method"] == m, "run"].nunique() >= 2 for m in methods)
    restarts = P._restart_positions(table, x)
    pal = P.method_palette(methods)
    present = [i for i in range(len(specs)) if (rows["_spec"] == i).any()]
    with P._theme():
        fig, axes = P._figure(len(present), len(WRAPPED), panel=(2.6, 2.2), sharex=True, sharey="row")
        for r, i in enumerate(present):
            kind, metric, ylabel = specs[i]
            for c, comp in enumerate(WRAPPED):
                ax = axes[r, c]
                data = (per_run if seeds else rows)
                data = data[(data["_spec"] == i) & (data["component"] == comp)]
                for m in methods:
                    d = data[data["method"] == m]
                    if d.empty:
                        continue
                    g = d.groupby(x)["value"]
                    band = g.agg(_t_interval) if seeds else g.agg(lambda v: (v.min(), v.max()))
                    xs = np.asarray(g.mean().index, dtype=float)
                    ax.plot(xs, g.mean().to_numpy(), color=pal[m], marker="o", markersize=3, linewidth=1.5)
                    ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=pal[m], alpha=0.2,
                                    linewidth=0)
                if chance and i in chance:
                    ch = _rows(table, *chance[i])
                    ch = ch[ch["component"] == comp]
                    if not ch.empty:
                        ax.axhline(float(pd.to_numeric(ch["value"]).mean()), color="0.5", linestyle="--",
                                   linewidth=1.0, zorder=0)
                P._mark_restarts([ax], restarts)
                ax.set_title(comp if r == 0 else "")
                ax.set_xlabel(P.X_LABELS[x] if r == len(present) - 1 else "")
                ax.set_ylabel(ylabel if c == 0 else "")
                P._style_x(ax, x)
        band = "95% t-interval across seeds" if seeds else "range over layers"
        fig.suptitle(f"{title} (line: layer mean, band: {band})", x=0.01, ha="left", fontsize=11)
        handles = P._method_handles(methods)
        if chance:
            handles.append(P._handle("chance (random subspaces)", color="0.5", linestyle="--"))
        if restarts:
            handles.append(P._restart_handle())
        P._legend(fig, handles, title="method")
    return fig


def _status_ok(table: pd.DataFrame, rows: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    """Alpha rows whose fit has status ok (``alpha_status == 0``)."""
    keys = ["run", "step", "layer", "component", "kind"]
    st = table[(table["kind"] == kind) & (table["metric"] == "alpha_status")][keys + ["value"]]
    ok = st[pd.to_numeric(st["value"]) == 0][keys]
    return rows.merge(ok, on=keys, how="inner")


def plot_heavy_tails(table: pd.DataFrame, *, x: str = "tokens"):
    """Power-law exponent alpha of the ESD of weights and gradients over training; only fits with status ``ok``."""
    return _grid(table, [("weight", "alpha", "weight α"), ("grad", "alpha", "gradient α")], "plot_heavy_tails",
                 "Heavy tails: ESD power-law exponent α (KS-ok fits; smaller α = heavier tail)", keep=_status_ok, x=x)


def plot_signal_rank(table: pd.DataFrame, *, x: str = "tokens"):
    """Singular values above the Marchenko–Pastur edge (signal rank) of weights and gradients, and their energy."""
    return _grid(table, [("weight", "signal_rank", "weight signal rank"),
                         ("weight", "signal_energy", "weight signal energy"),
                         ("grad", "signal_rank", "grad signal rank")], "plot_signal_rank",
                 "Spikes above the Marchenko–Pastur edge", x=x)


def plot_subspaces(table: pd.DataFrame, *, x: str = "tokens"):
    """Overlap (mean cos² of principal angles) of ReLoRA cycle updates with the previous cycle, and of the
    ReLoRA and full-rank cumulative updates; dashed: the chance level of random subspaces."""
    return _grid(table, [("update_restart", "overlap_prev", "cycle k vs k−1"),
                         ("cross_run", "update_overlap", "ReLoRA vs full (W_t−W_0)")], "plot_subspaces",
                 "Update subspaces: overlap, 1 = same, 0 = orthogonal",
                 chance={0: ("update_restart", "overlap_prev_chance"), 1: ("cross_run", "update_overlap_chance")}, x=x)


def plot_intruders(table: pd.DataFrame, *, x: str = "tokens"):
    """Intruder dimensions: top singular vectors of ``W_t`` with max |cos| < threshold against ``W_0``'s."""
    return _grid(table, [("weight", "intruders", "intruders (of top 10)")], "plot_intruders",
                 "Intruder dimensions of W_t against W_0", x=x)


def plot_cross_run_cka(table: pd.DataFrame, *, sites: Sequence[str] | None = None):
    """Debiased and biased linear CKA between ReLoRA and full-rank activations, layer × step, one row per site."""
    caller = "plot_cross_run_cka"
    table = P._check_table(table, caller)
    rows = P._select(table, caller, "cross_run", ["cka_debiased", "cka"],
                     hint="Cross-run CKA needs a ReLoRA and a full-rank run with captured activations.")
    rows, _ = P._finite(P._numeric(rows), caller)
    sites = list(sites) if sites is not None else P._ordered(set(rows["component"]), "act")
    steps = sorted(int(s) for s in rows["step"].unique())
    layers = sorted(int(v) for v in rows["layer"].unique())
    vmin = min(0.0, float(np.floor(rows["value"].min() * 10) / 10))
    annotate = len(steps) <= 12 and len(layers) <= 12
    metrics = [("cka_debiased", "debiased CKA"), ("cka", "biased CKA")]
    with P._theme():
        panel = (min(0.45 * len(steps) + 2.0, 8.0), min(0.32 * len(layers) + 1.3, 5.0))
        fig, axes = P._figure(len(sites), 2, panel=panel, legend_width=1.0)
        mappable = None
        for i, site in enumerate(sites):
            for j, (metric, label) in enumerate(metrics):
                data = rows[(rows["component"] == site) & (rows["metric"] == metric)]
                grid = data.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
                mappable = P._heatmap(axes[i, j], grid.reindex(index=layers, columns=steps), vmin, 1.0, annotate)
                axes[i, j].set_title(f"{label} · {site}")
        P._outer_labels(axes, "checkpoint step", "layer")
        if mappable is not None:
            fig.colorbar(mappable, ax=axes, label="CKA ReLoRA vs full-rank",
                         shrink=min(0.8, 3.0 / fig.get_figheight() + 0.2))
        fig.suptitle("Cross-run similarity: ReLoRA vs full-rank activations on the shared probe set "
                     "(mean over seed pairs)", x=0.01, ha="left", fontsize=11)
    return fig


def plot_seed_summary(table: pd.DataFrame, *, kind: str = "weight", metric: str = "proportional_effective_rank"):
    """Final-step layer-mean ``metric`` per component: each method's mean and 95 % interval across seeds, p-values.

    Needs two or more runs of each method (seed replicates); the test named in
    the title is :func:`dynamics.seeds.seed_summary`'s.
    """
    from dynamics.seeds import seed_summary

    caller = "plot_seed_summary"
    table = P._check_table(table, caller)
    runs = table[table["kind"] == kind].groupby("method")["run"].nunique()
    if runs.empty or (runs < 2).any():
        raise DynamicsError(f"{caller}: needs >= 2 runs (seeds) of every method, got {runs.to_dict()}")
    summary = seed_summary(table, kind=kind, metric=metric)
    methods = [m for m in P.METHOD_ORDER if f"{m} mean" in summary.columns]
    pal = P.method_palette(methods)
    comps = list(summary.index)
    tests = sorted({t for t in summary["test"] if t})
    with P._theme():
        fig, axes = P._figure(1, 1, panel=(max(4.5, 0.7 * len(comps) + 1.0), 3.2))
        ax = axes[0, 0]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = np.arange(len(comps)) - 0.4 + width * (j + 0.5)
            mean = summary[f"{m} mean"].astype(float).to_numpy()
            lo = summary[f"{m} ci95 low"].astype(float).to_numpy()
            hi = summary[f"{m} ci95 high"].astype(float).to_numpy()
            ax.bar(xs, mean, width=width, color=pal[m])
            ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="0.2", capsize=3, linewidth=1.0)
        top = np.nanmax(summary[[f"{m} ci95 high" for m in methods]].astype(float).to_numpy())
        for i, p in enumerate(summary["p_value"]):
            ax.text(i, top * 1.02, "–" if p is None else f"p={p:.2g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(comps)), comps, rotation=30)
        ax.set_ylabel(P._short(metric))
        ax.set_title(f"{P.KIND_LABELS.get(kind, kind)}: {P.METRIC_LABELS.get(metric, metric)} at the final step\n"
                     f"bars: mean over seeds, whiskers: 95% t-interval; p: {'; '.join(tests)}")
        P._legend(fig, [P._handle(f"{P._label(m)} (n={int(summary[f'{m} n'].max())})", color=pal[m], linewidth=6)
                        for m in methods], title="method")
    return fig
