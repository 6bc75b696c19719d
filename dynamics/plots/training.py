"""Training curves: training and validation loss, and minimal-pair accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

import dynamics.plots._style as S
from dynamics.plots._common import (
    NoDataError,
    across_seeds,
    available,
    check_table,
    drawable,
    has_seeds,
    merge_positions,
    select,
    x_column,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_loss"]


def plot_loss(table: pd.DataFrame, *, x: str = "tokens", smooth: int | None = None) -> Figure:
    """Training loss (smoothed, raw faint) and validation loss per run in nats/token; minimal-pair accuracy when present.

    ``smooth`` is the rolling-mean window over logged steps (default: about
    1/50 of the run). Runs of one method share its colour; ReLoRA merges are
    dotted vertical lines. With two or more runs (seeds) of every method, each
    method has one line per curve (the mean over seeds of each run's smoothed
    training loss, validation loss, accuracy) and a band, the 95 % t-interval
    across seeds.
    """
    caller = "plot_loss"
    table = check_table(table, caller)
    rows = select(
        table,
        caller,
        "train",
        ["loss", "val_loss", "pair_acc"],
        hint="Training logs (metrics.jsonl) are read by `dynamics analyze`.",
    )
    if not rows["metric"].isin(["loss", "val_loss"]).any():
        raise NoDataError(
            f"{caller}: the table has no kind='train' rows with metric 'loss' or 'val_loss'; "
            f"{available(table, 'train')}"
        )
    rows = drawable(rows, caller, "training-log")
    x = x_column(rows, x, caller)
    methods = S.methods_of(rows)
    pal = S.method_palette(methods)
    merges = merge_positions(table, x)
    has_acc = bool((rows["metric"] == "pair_acc").any())
    seeds = has_seeds(rows)
    with S.theme():
        fig, axes = S.figure(1, 2 if has_acc else 1, panel=(4.6, 3.0), sharex=True)
        ax = axes[0, 0]
        if seeds:
            _seed_curves(axes, rows, x, methods, smooth, has_acc)
        for _, r in rows.groupby("run", sort=True) if not seeds else ():
            colour = pal[r["method"].iloc[0]]
            train = r[r["metric"] == "loss"].sort_values("step")
            if not train.empty:
                window = smooth or max(1, len(train) // 50)
                if window > 1:
                    ax.plot(train[x], train["value"], color=colour, alpha=0.25, linewidth=0.6)
                ax.plot(train[x], train["value"].rolling(window, min_periods=1).mean(), color=colour, linewidth=1.6)
            val = r[r["metric"] == "val_loss"].sort_values("step")
            if not val.empty:
                ax.plot(val[x], val["value"], color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.2)
        ax.set_title("loss")
        ax.set_ylabel("loss (nats/token)")
        if has_acc:
            acc_ax = axes[0, 1]
            for _, r in rows[rows["metric"] == "pair_acc"].groupby("run", sort=True) if not seeds else ():
                r = r.sort_values("step")
                acc_ax.plot(r[x], r["value"], color=pal[r["method"].iloc[0]], marker="o", markersize=4, linewidth=1.4)
            acc_ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle="-", zorder=0)
            acc_ax.set_ylim(0, 1.02)
            acc_ax.set_title("minimal pairs (chance 0.5)")
            acc_ax.set_ylabel("minimal-pair accuracy")
        for a in axes[0]:
            a.set_xlabel(S.X_LABELS[x])
            S.style_x(a, x)
            S.mark_merges([a], merges)
        S.suptitle(
            fig,
            "Training and validation loss"
            + (" (lines: mean over seeds, bands: 95% t-interval across seeds)" if seeds else ""),
        )
        handles = S.method_handles(methods) + [
            S.handle("training (smoothed)", color="0.2", linewidth=1.6),
            S.handle("validation", color="0.2", linestyle="--", marker="o", markersize=4),
        ]
        if merges:
            handles.append(S.merge_handle())
        S.legend(fig, handles)
    return fig


def _seed_curves(
    axes: S.AxesGrid, rows: pd.DataFrame, x: str, methods: list[str], smooth: int | None, has_acc: bool
) -> None:
    """Mean over seeds and 95 % t-interval bands: smoothed training loss, validation loss (dashed), accuracy."""
    pal = S.method_palette(methods)
    ax = axes[0, 0]
    train = rows[rows["metric"] == "loss"].sort_values(["run", "step"])
    if not train.empty:
        window = smooth or max(1, int(train.groupby("run").size().median()) // 50)
        smoothed = train.assign(
            value=train.groupby("run")["value"].transform(lambda v: v.rolling(window, min_periods=1).mean())
        )
        S.band_lines(ax, across_seeds(smoothed, ["method", x]), x, methods, marker=None)
    val = across_seeds(rows[rows["metric"] == "val_loss"], ["method", x])
    for m in methods:
        v = val[val["method"] == m].sort_values(x)
        if v.empty:
            continue
        xs = v[x].to_numpy(dtype=float)
        ax.plot(xs, v["mean"], color=pal[m], linestyle="--", marker="o", markersize=4, linewidth=1.2)
        ax.fill_between(xs, v["low"], v["high"], color=pal[m], alpha=0.12, linewidth=0)
    if has_acc:
        S.band_lines(axes[0, 1], across_seeds(rows[rows["metric"] == "pair_acc"], ["method", x]), x, methods)
