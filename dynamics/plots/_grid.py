"""One layout shared by the analyses beyond spectral metrics: rows = (kind, metric), columns = matrices.

Each panel draws one line per method: the mean over layers of a metric over
training. The band is the **95 % t-interval across seeds** of that layer mean
(:func:`dynamics.plots._common.across_seeds`) when every method has two or more runs,
else the range over layers; the figure's title says which. The columns are the
per-layer matrices the table holds for those metrics (so a ReLoRA run that
wrapped only q and v gets q and v columns for its wrapped-only metrics), in
:data:`dynamics.summary.COMPONENT_ORDER`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import dynamics.plots._style as S
from dynamics.plots._common import (
    NoDataError,
    across_seeds,
    check_table,
    finite,
    has_seeds,
    is_head,
    merge_positions,
    numeric,
    ordered,
    per_layer,
    without_factors,
    x_column,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: A row filter of one spec: ``keep(table, rows, kind, metric) -> rows``.
Keep = Callable[[pd.DataFrame, pd.DataFrame, str, str], pd.DataFrame]


def matrix_rows(table: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    """Rows of ``kind`` / ``metric`` for per-layer matrices (no adapter factors, no per-head circuits)."""
    rows = without_factors(table[(table["kind"] == kind) & (table["metric"] == metric)])
    rows = rows[~is_head(rows)]
    return rows[rows["component"].isin(per_layer(rows))]


def grid(
    table: pd.DataFrame,
    specs: Sequence[tuple[str, str, str]],
    caller: str,
    title: str,
    *,
    chance: dict[int, tuple[str, str]] | None = None,
    keep: Keep | None = None,
    x: str = "tokens",
) -> Figure:
    """Rows = ``specs`` (kind, metric, y label) that have data, columns = the matrices present; method lines.

    ``chance[i] = (kind, metric)``: a dashed grey line at that metric's mean in row ``i``.
    ``keep(table, rows, kind, metric)`` may filter the rows of a spec (e.g. status-ok fits).
    Raises :class:`NoDataError` when no spec has a finite value.
    """
    table = check_table(table, caller)
    parts = []
    for i, (kind, metric, _) in enumerate(specs):
        r = matrix_rows(table, kind, metric)
        if keep is not None:
            r = keep(table, r, kind, metric)
        parts.append(r.assign(_spec=i))
    rows, _ = finite(numeric(pd.concat(parts, ignore_index=True)), caller)
    if rows.empty:
        wanted = ", ".join(f"{k}/{m}" for k, m, _ in specs)
        raise NoDataError(
            f"{caller}: the table has no rows of {wanted} for per-layer matrices; "
            f"kinds in the table: {sorted(set(table['kind']))}. Run `dynamics analyze` without --basic."
        )
    x = x_column(rows, x, caller)
    comps = ordered(set(rows["component"]))
    methods = S.methods_of(rows)
    seeds = has_seeds(rows)
    merges = merge_positions(table, x)
    pal = S.method_palette(methods)
    present = [i for i in range(len(specs)) if (rows["_spec"] == i).any()]
    with S.theme():
        fig, axes = S.figure(len(present), len(comps), panel=(2.6, 2.2), sharex=True, sharey="row")
        for row, i in enumerate(present):
            _, _, ylabel = specs[i]
            for c, comp in enumerate(comps):
                ax = axes[row, c]
                data = rows[(rows["_spec"] == i) & (rows["component"] == comp)]
                if seeds and not data.empty:
                    S.band_lines(ax, across_seeds(data, ["method", x]), x, methods)
                for m in methods if not seeds else ():
                    d = data[data["method"] == m]
                    if d.empty:
                        continue
                    g = d.groupby(x)["value"]
                    xs = np.asarray(g.mean().index, dtype=float)
                    ax.plot(xs, g.mean().to_numpy(), color=pal[m], marker="o", markersize=3, linewidth=1.5)
                    ax.fill_between(xs, g.min().to_numpy(), g.max().to_numpy(), color=pal[m], alpha=0.2, linewidth=0)
                if chance and i in chance:
                    ch = matrix_rows(table, *chance[i])
                    ch = ch[ch["component"] == comp]
                    if not ch.empty:
                        ax.axhline(
                            float(pd.to_numeric(ch["value"]).mean()),
                            color="0.5",
                            linestyle="--",
                            linewidth=1.0,
                            zorder=0,
                        )
                S.mark_merges([ax], merges)
                ax.set_title(comp if row == 0 else "")
                ax.set_xlabel(S.X_LABELS[x] if row == len(present) - 1 else "")
                ax.set_ylabel(ylabel if c == 0 else "")
                S.style_x(ax, x)
        band = "95% t-interval across seeds" if seeds else "range over layers"
        S.suptitle(fig, f"{title} (line: layer mean, band: {band})")
        handles = S.method_handles(methods)
        if chance:
            handles.append(S.handle("chance (random subspaces)", color="0.5", linestyle="--"))
        if merges:
            handles.append(S.merge_handle())
        S.legend(fig, handles, title="method")
    return fig
