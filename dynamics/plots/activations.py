"""Representations: linear CKA of activations over training, and between ReLoRA and full-rank runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import dynamics.plots._style as S
from dynamics.plots._common import check_table, drawable, ordered, pick_components, select
from dynamics.validation import DynamicsError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = ["plot_cka", "plot_cross_run_cka"]


def _panel(steps: Sequence[int], layers: Sequence[int]) -> tuple[float, float]:
    """Size of one layer × step heatmap panel in inches."""
    return min(0.45 * len(steps) + 2.0, 8.0), min(0.32 * len(layers) + 1.3, 5.0)


def _layer_by_step(data: pd.DataFrame, layers: Sequence[int], steps: Sequence[int]) -> pd.DataFrame:
    """``value`` as a layer × step grid (mean over runs); NaN where there is none."""
    grid = data.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
    return grid.reindex(index=list(layers), columns=list(steps))


def plot_cka(
    table: pd.DataFrame,
    *,
    metric: str = "cka_prev",
    sites: Sequence[str] | str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Linear CKA of activations as layer × checkpoint heatmaps; rows = sites, columns = methods.

    ``cka_prev`` compares each checkpoint with the previous one (how much the
    representation moved), ``cka_final`` with the final checkpoint (how
    settled it is). Each cell is the mean over a method's runs. One shared
    colour scale (up to 1) and colour bar. ``annotate`` writes the values in
    the cells (default: when the grid is small).
    """
    caller = "plot_cka"
    table = check_table(table, caller)
    if metric not in ("cka_prev", "cka_final"):
        raise DynamicsError(f"{caller}: metric must be 'cka_prev' or 'cka_final', got {metric!r}")
    rows = select(
        table,
        caller,
        "act",
        metric,
        hint="CKA needs captured activations at two or more checkpoints (`dynamics analyze` with kind act).",
    )
    rows, sites = pick_components(rows, caller, sites, "act")
    rows = drawable(rows, caller, f"act {metric}")
    methods = S.methods_of(rows)
    steps = sorted(int(s) for s in rows["step"].unique())
    layers = sorted(int(v) for v in rows["layer"].unique())
    if annotate is None:
        annotate = len(steps) <= 12 and len(layers) <= 12
    vmin = min(float(np.floor(rows["value"].min() * 20) / 20), 0.9)
    with S.theme():
        fig, axes = S.figure(len(sites), len(methods), panel=_panel(steps, layers), legend_width=1.0)
        mappable: AxesImage | None = None
        for i, site in enumerate(sites):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                data = rows[(rows["component"] == site) & (rows["method"] == method)]
                mappable = S.heatmap(ax, _layer_by_step(data, layers, steps), vmin, 1.0, annotate)
                ax.set_title(f"{S.label(method)} · {site}")
                ax.tick_params(axis="x", labelrotation=0)
                ax.tick_params(axis="y", labelrotation=0)
        S.outer_labels(axes, "checkpoint step", "layer")
        if mappable is not None:
            S.colorbar(fig, mappable, axes, S.METRIC_LABELS[metric])
        S.suptitle(fig, f"Activations: {S.METRIC_LABELS[metric]}")
    return fig


def plot_cross_run_cka(table: pd.DataFrame, *, sites: Sequence[str] | None = None) -> Figure:
    """Debiased and biased linear CKA between ReLoRA and full-rank activations, layer × step, one row per site.

    Each cell is the mean over seed pairs; the columns are the debiased and the biased estimate.
    """
    caller = "plot_cross_run_cka"
    table = check_table(table, caller)
    rows = select(
        table,
        caller,
        "cross_run",
        ["cka_debiased", "cka"],
        hint="Cross-run CKA needs a ReLoRA and a full-rank run with captured activations.",
    )
    rows = drawable(rows, caller, "cross-run CKA")
    sites = list(sites) if sites is not None else ordered(set(rows["component"]), "act")
    steps = sorted(int(s) for s in rows["step"].unique())
    layers = sorted(int(v) for v in rows["layer"].unique())
    vmin = min(0.0, float(np.floor(rows["value"].min() * 10) / 10))
    annotate = len(steps) <= 12 and len(layers) <= 12
    metrics = [("cka_debiased", "debiased CKA"), ("cka", "biased CKA")]
    with S.theme():
        fig, axes = S.figure(len(sites), 2, panel=_panel(steps, layers), legend_width=1.0)
        mappable: AxesImage | None = None
        for i, site in enumerate(sites):
            for j, (metric, name) in enumerate(metrics):
                data = rows[(rows["component"] == site) & (rows["metric"] == metric)]
                mappable = S.heatmap(axes[i, j], _layer_by_step(data, layers, steps), vmin, 1.0, annotate)
                axes[i, j].set_title(f"{name} · {site}")
        S.outer_labels(axes, "checkpoint step", "layer")
        if mappable is not None:
            S.colorbar(fig, mappable, axes, "CKA ReLoRA vs full-rank")
        S.suptitle(
            fig, "Cross-run similarity: ReLoRA vs full-rank activations on the shared probe set (mean over seed pairs)"
        )
    return fig
