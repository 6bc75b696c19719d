"""Spectral metrics over training: a metric per layer, condition numbers, and raw singular value spectra."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    finite,
    has_seeds,
    merge_positions,
    numeric,
    ordered,
    pick_components,
    select,
    x_column,
)
from dynamics.validation import DynamicsError
from trainer.run_format import SPECTRA_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_rank_over_training", "plot_condition_numbers", "plot_spectra"]

log = logging.getLogger(__name__)


def plot_rank_over_training(
    table: pd.DataFrame,
    kind: str = "weight",
    metric: str = "proportional_effective_rank",
    *,
    components: Sequence[str] | str | None = None,
    x: str = "tokens",
) -> Figure:
    """``metric`` of ``kind`` per layer over training: rows = components, columns = methods, hue = layer.

    Parameters
    ----------
    table
        The results table (:func:`dynamics.analyze.read_results`).
    kind
        ``weight`` (default), ``grad``, ``act`` or an update kind.
    metric
        Any metric of that kind; default PER = effective rank / min(m, n).
    components
        Components to show, one row each (default: every per-layer matrix the
        table holds for every method, e.g. q, k, v, o, gate, up, down; for
        ``act`` every site). ``"attn.ov"`` / ``"attn.qk"`` are the per-head
        circuits averaged over heads.
    x
        ``"tokens"`` (default) or ``"step"``.

    Returns
    -------
    matplotlib.figure.Figure
        One line per layer (y = the value; several runs of a method averaged).
        With two or more runs (seeds) of every method, each layer's line has a
        band: the 95 % t-interval across seeds. ReLoRA merges are marked with
        dotted vertical lines in ReLoRA's column.
    """
    caller = "plot_rank_over_training"
    table, kind = check_table(table, caller), canonical_kind(kind)
    rows = select(table, caller, kind, metric)
    rows, comps = pick_components(rows, caller, components, kind)
    rows = drawable(rows, caller, f"{kind} {metric}")
    x = x_column(rows, x, caller)
    methods = S.methods_of(rows)
    layers = sorted(int(v) for v in rows["layer"].unique())
    pal = S.layer_palette(layers)
    merges = merge_positions(table, x)
    marker = "o" if rows["step"].nunique() <= 30 else None
    seeds = has_seeds(rows)
    sns, _ = S.libs()
    with S.theme():
        fig, axes = S.figure(len(comps), len(methods), panel=(3.6, 2.1), sharex=True, sharey=True)
        for i, comp in enumerate(comps):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                data = rows[(rows["component"] == comp) & (rows["method"] == method)]
                if not data.empty and seeds:
                    st = across_seeds(data, ["layer", x])
                    for lay in layers:
                        s_ = st[st["layer"] == lay]
                        xs = s_[x].to_numpy(dtype=float)
                        ax.plot(xs, s_["mean"], color=pal[lay], marker=marker, markersize=4, linewidth=1.4)
                        ax.fill_between(xs, s_["low"], s_["high"], color=pal[lay], alpha=0.15, linewidth=0)
                elif not data.empty:
                    sns.lineplot(
                        data=data,
                        x=x,
                        y="value",
                        hue="layer",
                        hue_order=layers,
                        palette=pal,
                        errorbar=None,
                        marker=marker,
                        markersize=4,
                        linewidth=1.4,
                        legend=False,
                        ax=ax,
                    )
                else:
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                if method == "relora":
                    S.mark_merges([ax], merges)
                ax.set_title(f"{S.label(method)} · {comp}")
                S.style_x(ax, x)
        S.outer_labels(axes, S.X_LABELS[x], S.short(metric))
        S.suptitle(
            fig,
            f"{S.KIND_LABELS.get(kind, kind)}: {S.METRIC_LABELS.get(metric, metric)} per layer"
            + ("\nline: mean over seeds, band: 95% t-interval across seeds" if seeds else ""),
        )
        handles = [
            S.handle(str(lay) if lay >= 0 else "model", color=pal[lay], linewidth=2, marker=marker, markersize=4)
            for lay in layers
        ]
        if merges and "relora" in methods:
            handles.append(S.merge_handle())
        S.legend(fig, handles, title="layer")
    return fig


def plot_condition_numbers(
    table: pd.DataFrame,
    kind: str = "grad",
    *,
    metric: str = "log10_condition_number",
    components: Sequence[str] | str | None = None,
    x: str = "tokens",
    col_wrap: int = 4,
) -> Figure:
    """Condition numbers of ``kind`` (default gradients) over training, one panel per component.

    Lines are the layer mean per method. Bands: with two or more runs (seeds)
    of every method, the 95 % t-interval across seeds of each run's layer mean
    (line = mean over seeds); with one run per method, the range over layers.
    ``metric`` is ``log10_condition_number`` (default, log10 σ₁/σ_k),
    ``log10_truncated_condition_number`` (σ_k = the smallest singular value
    above the rank tolerance), or a raw ``condition_number`` /
    ``truncated_condition_number``, drawn on a log y-axis. Infinite values
    (σ_k = 0) are left out and counted in the panel.
    """
    caller = "plot_condition_numbers"
    table, kind = check_table(table, caller), canonical_kind(kind)
    rows = select(table, caller, kind, metric)
    rows, comps = pick_components(rows, caller, components, kind)
    rows = numeric(rows)
    x = x_column(rows, x, caller)
    methods = S.methods_of(rows)
    merges = merge_positions(table, x)
    seeds = has_seeds(rows)
    ncols = min(col_wrap, len(comps))
    nrows = -(-len(comps) // ncols)
    with S.theme():
        fig, axes = S.figure(nrows, ncols, panel=(3.2, 2.4), sharex=True, sharey=True)
        for ax, comp in zip(axes.flat, comps):
            data, dropped = finite(rows[rows["component"] == comp], caller)
            if not data.empty and seeds:
                marker = "o" if data["step"].nunique() <= 30 else None
                S.band_lines(ax, across_seeds(data, ["method", x]), x, methods, marker=marker)
            elif not data.empty:
                S.method_lines(ax, data, x, methods)
            if dropped:
                ax.text(
                    0.98,
                    0.02,
                    f"{dropped} infinite left out",
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color="0.4",
                    transform=ax.transAxes,
                )
            S.mark_merges([ax], merges)
            ax.set_title(comp)
            if metric in S.LOG_METRICS:
                ax.set_yscale("log")
            S.style_x(ax, x)
        for ax in list(axes.flat)[len(comps) :]:
            ax.set_visible(False)
        S.outer_labels(axes, S.X_LABELS[x], S.short(metric))
        for ax in list(axes.flat)[len(comps) - ncols : len(comps)]:  # bottom panel of each column
            ax.set_xlabel(S.X_LABELS[x])
            ax.xaxis.label.set_visible(True)
            ax.xaxis.set_tick_params(labelbottom=True)
        S.suptitle(
            fig,
            f"{S.KIND_LABELS.get(kind, kind)}: {S.METRIC_LABELS.get(metric, metric)} "
            + (
                "(line: layer mean, mean over seeds; band: 95% t-interval across seeds)"
                if seeds
                else "(line: layer mean, band: range over layers)"
            ),
        )
        handles = S.method_handles(methods) + ([S.merge_handle()] if merges else [])
        S.legend(fig, handles, title="method")
    return fig


def plot_spectra(
    spectra: pd.DataFrame,
    steps: Sequence[int] | None = None,
    component: str = "mlp.down",
    layer: int | None = None,
    *,
    kind: str = "weight",
    normalize: bool = False,
    max_steps: int = 5,
) -> Figure:
    """Singular values σ_i (log scale) of one matrix at a few checkpoints; one panel per method.

    Parameters
    ----------
    spectra
        The side file ``<results stem>.spectra.parquet`` (columns
        :data:`trainer.run_format.SPECTRA_COLUMNS`: ``run, method, step, layer,
        component, kind, shape, values``; values descending).
    steps
        Checkpoints to draw (default: up to ``max_steps`` evenly spaced ones, first and last included).
    component, layer, kind
        Which matrix (default the SwiGLU down projection of the middle layer, weights).
    normalize
        Divide by σ₁ so the spectra's shapes compare across steps.

    Several runs of a method: the first (by name) is drawn. Zero singular
    values are left out (a log axis cannot show them).
    """
    caller = "plot_spectra"
    if not isinstance(spectra, pd.DataFrame):
        raise DynamicsError(
            f"{caller}: expected the spectra table (<results stem>.spectra.parquet) as a DataFrame, "
            f"got {type(spectra).__name__}"
        )
    missing = [c for c in SPECTRA_COLUMNS if c not in spectra.columns]
    if missing:
        raise DynamicsError(
            f"{caller}: the spectra table lacks columns {missing}; expected the .spectra.parquet "
            "file written next to the results by `dynamics analyze`"
        )
    rows = spectra[(spectra["kind"] == kind) & (spectra["component"] == component)]
    if rows.empty:
        kinds = sorted(set(spectra["kind"]))
        comps = ordered(set(spectra.loc[spectra["kind"] == kind, "component"]))
        raise NoDataError(
            f"{caller}: no spectra with kind={kind!r} and component={component!r}; kinds: {kinds}; "
            f"components of kind {kind!r}: {comps or 'none'}"
        )
    layers = sorted(int(v) for v in rows["layer"].unique())
    if layer is None:
        layer = layers[len(layers) // 2]
    elif layer not in layers:
        raise NoDataError(f"{caller}: no {kind} spectra of {component} at layer {layer}; layers: {layers}")
    rows = rows[rows["layer"] == layer]
    available = sorted(int(s) for s in rows["step"].unique())
    if steps is None:
        idx = np.unique(np.linspace(0, len(available) - 1, min(max_steps, len(available))).round().astype(int))
        steps = [available[i] for i in idx]
    else:
        steps = [int(s) for s in steps]
        absent = [s for s in steps if s not in available]
        if absent:
            raise NoDataError(
                f"{caller}: no spectra at steps {absent} for layers.{layer}.{component} ({kind}); steps: {available}"
            )
    methods = S.methods_of(rows)
    sns, _ = S.libs()
    pal = dict(zip(steps, sns.color_palette("viridis", len(steps))))
    name = f"layers.{layer}.{component}" if layer >= 0 else component
    with S.theme():
        fig, axes = S.figure(1, len(methods), panel=(3.8, 3.0), sharex=True, sharey=True)
        for ax, method in zip(axes[0], methods):
            sub = rows[rows["method"] == method]
            runs = sorted(set(sub["run"]))
            if len(runs) > 1:
                log.info("%s: %d %s runs; drawing %s", caller, len(runs), method, runs[0])
            for step in steps:
                rec = sub[(sub["run"] == runs[0]) & (sub["step"] == step)]
                if rec.empty:
                    continue
                v = np.asarray(rec["values"].iloc[0], dtype=float)
                if normalize and v.size and v[0] > 0:
                    v = v / v[0]
                i = np.arange(1, v.size + 1)
                keep = v > 0  # zeros cannot be drawn on a log axis
                ax.plot(i[keep], v[keep], color=pal[step], linewidth=1.5)
            ax.set_yscale("log")
            ax.set_title(f"{S.label(method)} · {name}")
        S.outer_labels(axes, "index i (descending)", "σ_i / σ₁" if normalize else "singular value σ_i")
        S.suptitle(fig, f"Singular value spectra of {S.KIND_LABELS.get(kind, kind)}")
        S.legend(fig, [S.handle(f"step {s}", color=pal[s], linewidth=2) for s in steps], title="checkpoint")
    return fig
