"""Update matrices: their rank over training, their subspaces, and intruder dimensions of ``W_t`` against ``W_0``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

import dynamics.plots._style as S
from dynamics.plots._common import (
    MERGE_KIND,
    NoDataError,
    across_seeds,
    canonical_kind,
    check_table,
    drawable,
    has_seeds,
    merge_positions,
    pick_components,
    x_column,
)
from dynamics.plots._grid import grid
from dynamics.validation import DynamicsError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["UPDATE_KINDS", "UPDATE_TITLES", "plot_update_rank", "plot_subspaces", "plot_intruders"]

log = logging.getLogger(__name__)

#: Update kinds in panel order (``update_restart``, the former name of ``update_merge``, is still accepted).
UPDATE_KINDS: tuple[str, ...] = ("update", "update_cumulative", MERGE_KIND, "lora")
#: Short panel titles of the update kinds.
UPDATE_TITLES: dict[str, str] = {
    "update": "step update W_t − W_prev",
    "update_cumulative": "cumulative W_t − W_0",
    MERGE_KIND: "ReLoRA cycle W_k − W_(k−1)",
    "lora": "live adapter s·B·A",
}


def plot_update_rank(
    table: pd.DataFrame,
    *,
    metric: str = "proportional_effective_rank",
    kinds: Sequence[str] | None = None,
    components: Sequence[str] | str | None = None,
    x: str = "tokens",
) -> Figure:
    """Rank of the update matrices over training: one panel per update kind, methods overlaid.

    Kinds (those present, in this order): ``update`` (W_t − W_prev),
    ``update_cumulative`` (W_t − W_0), ``update_merge`` (one ReLoRA cycle, the
    update between merges k−1 and k, rank ≤ r) and ``lora`` (the live adapter
    s·B·A). Lines are the mean over layers and ``components`` (default every
    per-layer matrix the table holds for that kind); bands the 95 % t-interval
    across seeds of each run's mean when every method has two or more runs, else
    the range over layers and components. ReLoRA
    merges (:func:`merge_steps`) are dotted vertical lines; without a ReLoRA run
    there are none (logged).
    """
    caller = "plot_update_rank"
    table = check_table(table, caller)
    wanted = [canonical_kind(k) for k in kinds] if kinds is not None else list(UPDATE_KINDS)
    bad = [k for k in wanted if k not in UPDATE_KINDS]
    if bad:
        raise DynamicsError(f"{caller}: kinds must be among {list(UPDATE_KINDS)}, got {bad}")
    present = [k for k in wanted if ((table["kind"] == k) & (table["metric"] == metric)).any()]
    if not present:
        raise NoDataError(
            f"{caller}: the table has no update-matrix rows (kinds {wanted}) with metric={metric!r}; "
            f"kinds in the table: {sorted(set(table['kind']))}. Analyse with the update kinds "
            f"(`dynamics analyze --kinds weight,{','.join(UPDATE_KINDS)}`)."
        )
    parts = []
    for k in present:
        r, _ = pick_components(table[(table["kind"] == k) & (table["metric"] == metric)], caller, components, k)
        parts.append(r)
    rows = drawable(pd.concat(parts, ignore_index=True), caller, f"update {metric}")
    x = x_column(rows, x, caller)
    methods = S.methods_of(rows)
    merges = merge_positions(table, x)
    seeds = has_seeds(rows)
    if not merges:
        log.info(
            "%s: no ReLoRA merges found in the table (no relora run, or no update_merge rows / lr restarts); "
            "no merge marks",
            caller,
        )
    with S.theme():
        fig, axes = S.figure(1, len(present), panel=(3.4, 2.8), sharex=True, sharey=True)
        for ax, k in zip(axes[0], present):
            data = rows[rows["kind"] == k]
            if not data.empty and seeds and has_seeds(data):
                marker = "o" if data["step"].nunique() <= 30 else None
                S.band_lines(ax, across_seeds(data, ["method", x]), x, methods, marker=marker)
            elif not data.empty:
                S.method_lines(ax, data, x, methods)
            S.mark_merges([ax], merges)
            ax.set_title(UPDATE_TITLES[k])
            S.style_x(ax, x)
        S.outer_labels(axes, S.X_LABELS[x], S.short(metric))
        S.suptitle(
            fig,
            f"Update-matrix rank: {S.METRIC_LABELS.get(metric, metric)} (line: mean over layers and "
            + ("projections and seeds, band: 95% t-interval across seeds)" if seeds else "projections, band: range)"),
        )
        handles = S.method_handles(methods) + ([S.merge_handle()] if merges else [])
        S.legend(fig, handles, title="method")
    return fig


def plot_subspaces(table: pd.DataFrame, *, x: str = "tokens") -> Figure:
    """Overlap (mean cos² of principal angles) of ReLoRA cycle updates with the previous cycle, and of the
    ReLoRA and full-rank cumulative updates; dashed: the chance level of random subspaces.

    Columns: the matrices the table has these rows for (the ones the ReLoRA run wrapped).
    """
    return grid(
        table,
        [(MERGE_KIND, "overlap_prev", "cycle k vs k−1"), ("cross_run", "update_overlap", "ReLoRA vs full (W_t−W_0)")],
        "plot_subspaces",
        "Update subspaces: overlap, 1 = same, 0 = orthogonal",
        chance={0: (MERGE_KIND, "overlap_prev_chance"), 1: ("cross_run", "update_overlap_chance")},
        x=x,
    )


def plot_intruders(table: pd.DataFrame, *, x: str = "tokens") -> Figure:
    """Intruder dimensions: top singular vectors of ``W_t`` with max |cos| < threshold against ``W_0``'s."""
    return grid(
        table,
        [("weight", "intruders", "intruders (of top 10)")],
        "plot_intruders",
        "Intruder dimensions of W_t against W_0",
        x=x,
    )
