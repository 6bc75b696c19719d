"""The figures' look, said once: theme, colours, labels, legends, figure grids and heatmaps.

Nothing here reads the results table (that is :mod:`dynamics.plots._common`).
Every figure family draws through these helpers, so methods keep one colour
and one order everywhere, layers one sequential palette, and each figure one
legend outside its axes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D

#: An RGB colour, each channel in [0, 1].
Colour = tuple[float, float, float]
#: A 2-D numpy object array of :class:`matplotlib.axes.Axes` (``axes[row, column]``), as ``plt.subplots`` returns.
AxesGrid = Any

#: Methods in display order; every figure uses this order and these colours.
METHOD_ORDER: tuple[str, ...] = ("full", "relora")
METHOD_LABELS: dict[str, str] = {"full": "full-rank", "relora": "ReLoRA"}
#: Activation sites in the order the residual stream passes them.
ACT_ORDER: tuple[str, ...] = ("resid_pre", "resid_mid", "attn.o", "mlp.down.in", "resid_post")
#: Per-head circuits: stored per head (``attn.ov.h3``), drawn as the mean over heads (``attn.ov``).
CIRCUITS: tuple[str, ...] = ("attn.ov", "attn.qk")

METRIC_LABELS: dict[str, str] = {
    "proportional_effective_rank": "PER (effective rank / min(m,n))",
    "effective_rank": "effective rank exp(H(σ/Σσ))",
    "stable_rank": "stable rank Σσ²/σ₁²",
    "numerical_rank": "numerical rank #{σ > tol}",
    "condition_number": "condition number σ₁/σ_k",
    "log10_condition_number": "log10 σ₁/σ_k",
    "truncated_condition_number": "σ₁/σ_k over σ above tol",
    "log10_truncated_condition_number": "log10 σ₁/σ_k (σ_k > tol)",
    "spectral_entropy": "spectral entropy H(σ/Σσ) / ln k",
    "participation_ratio": "participation ratio (Σσ²)²/Σσ⁴",
    "sigma_max": "σ₁",
    "sigma_min": "σ_k",
    "top_1_energy": "top-1 energy σ₁²/Σσ²",
    "top_10_energy": "top-10 energy fraction",
    "anisotropy": "anisotropy (mean pairwise cosine)",
    "cka_prev": "linear CKA vs previous checkpoint",
    "cka_final": "linear CKA vs final checkpoint",
    "loss": "training loss (nats/token)",
    "val_loss": "validation loss (nats/token)",
    "pair_acc": "minimal-pair accuracy",
}
KIND_LABELS: dict[str, str] = {
    "weight": "weights W",
    "grad": "gradients dL/dW",
    "act": "activations (tokens × features)",
    "update": "update W_t − W_prev",
    "update_cumulative": "cumulative update W_t − W_0",
    "update_merge": "ReLoRA cycle update W_merge(k) − W_merge(k−1)",
    "lora": "live adapter update s·B·A",
}
#: Axis labels (the long form, with its definition, goes in the figure title).
SHORT_LABELS: dict[str, str] = {
    "proportional_effective_rank": "PER",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "numerical_rank": "numerical rank",
    "condition_number": "σ₁/σ_k",
    "log10_condition_number": "log10 σ₁/σ_k",
    "truncated_condition_number": "σ₁/σ_k (σ_k > tol)",
    "log10_truncated_condition_number": "log10 σ₁/σ_k (σ_k > tol)",
    "spectral_entropy": "H(σ/Σσ) / ln k",
    "anisotropy": "mean pairwise cosine",
}
#: Metrics whose raw value spans decades: drawn on a log y-axis.
LOG_METRICS: frozenset[str] = frozenset({"condition_number", "truncated_condition_number", "sigma_max", "sigma_min"})
X_LABELS: dict[str, str] = {"tokens": "training tokens seen", "step": "optimizer step"}
#: How a ReLoRA merge is marked: a dotted vertical line.
MERGE_STYLE: dict[str, Any] = {"color": "0.3", "linestyle": ":", "linewidth": 1.0, "zorder": 0}


def libs() -> tuple[ModuleType, ModuleType]:
    """seaborn and pyplot, imported on first use (``import dynamics`` stays fast)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    return sns, plt


@contextmanager
def theme() -> Iterator[None]:
    """The figures' look, applied only while a figure is built; afterwards those settings are as they were.

    Only the keys set here are restored (unlike :func:`matplotlib.rc_context`, which restores every key and so
    would undo the ``interactive`` flag that IPython's inline backend sets when pyplot is first used inside
    it: later figures would then not be shown in a notebook).
    """
    sns, _ = libs()
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.1))
    rc.update(
        {
            "axes.titlesize": 10,
            "legend.frameon": False,
            "savefig.dpi": 150,
            "figure.dpi": 100,
            "axes.titlelocation": "left",
        }
    )
    params: Any = mpl.rcParams  # typed with literal keys only
    old = {k: params[k] for k in rc}
    params.update(rc)
    try:
        yield
    finally:
        params.update(old)


def method_palette(methods: Sequence[str]) -> dict[str, Colour]:
    """Colour of each method: full-rank and ReLoRA always get the first two ``colorblind`` colours."""
    sns, _ = libs()
    base = sns.color_palette("colorblind", 10)
    pal: dict[str, Colour] = {m: base[i] for i, m in enumerate(METHOD_ORDER)}
    extra = [m for m in methods if m not in pal]
    for i, m in enumerate(extra):
        pal[m] = base[(len(METHOD_ORDER) + i) % len(base)]
    return {m: pal[m] for m in methods}


def label(method: str) -> str:
    """Display name of a method (``relora`` → ``ReLoRA``)."""
    return METHOD_LABELS.get(method, method)


def short(metric: str) -> str:
    """Axis label of a metric."""
    return SHORT_LABELS.get(metric, METRIC_LABELS.get(metric, metric))


def methods_of(rows: pd.DataFrame) -> list[str]:
    """The methods present in ``rows``, in display order (known ones first, then the rest sorted)."""
    present = set(rows["method"])
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def layer_palette(layers: Sequence[int]) -> dict[int, Colour]:
    """``viridis`` colours for ``layers`` (first layer darkest)."""
    sns, _ = libs()
    return dict(zip(layers, sns.color_palette("viridis", max(len(layers), 1))))


def handle(text: str, **kw: Any) -> Line2D:
    """A legend entry: an empty line with ``kw``'s style."""
    from matplotlib.lines import Line2D

    return Line2D([], [], label=text, **kw)


def method_handles(methods: Sequence[str]) -> list[Line2D]:
    """One legend entry per method, in its colour."""
    pal = method_palette(methods)
    return [handle(label(m), color=pal[m], linewidth=2) for m in methods]


def merge_handle() -> Line2D:
    """The legend entry of the ReLoRA merge marks."""
    return handle("ReLoRA merge", **MERGE_STYLE)


def mark_merges(axes: Sequence[Axes], positions: Sequence[float]) -> None:
    """Dotted vertical lines at ``positions`` (x-axis units) on each of ``axes``."""
    for ax in axes:
        for p in positions:
            ax.axvline(p, **MERGE_STYLE)


def legend(fig: Figure, handles: list[Line2D], title: str | None = None) -> None:
    """The figure's one legend, outside the axes on the right."""
    fig.legend(handles=handles, title=title, loc="outside right upper", frameon=False)


def compact(v: float, _pos: Any = None) -> str:
    """``1234567`` → ``1.23M``: tick labels of token counts."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def style_x(ax: Axes, x: str) -> None:
    """Compact tick labels when the x-axis counts tokens."""
    from matplotlib.ticker import FuncFormatter

    if x == "tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(compact))


def figure(
    nrows: int, ncols: int, *, panel: tuple[float, float] = (3.6, 2.5), legend_width: float = 1.6, **kw: Any
) -> tuple[Figure, AxesGrid]:
    """A pyplot figure with an ``nrows × ncols`` object array of Axes; ``panel`` is one panel's size in inches."""
    _, plt = libs()
    size = (ncols * panel[0] + legend_width, nrows * panel[1] + 0.4)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained", **kw)
    return fig, axes


def outer_labels(axes: AxesGrid, xlabel: str, ylabel: str) -> None:
    """Axis labels on the left column and the bottom row only (shared axes)."""
    nrows, _ = axes.shape
    for (i, j), ax in np.ndenumerate(axes):
        ax.set_xlabel(xlabel if i == nrows - 1 else "")
        ax.set_ylabel(ylabel if j == 0 else "")


def heatmap(ax: Axes, grid: pd.DataFrame, vmin: float, vmax: float, annotate: bool) -> AxesImage:
    """``grid`` (rows top to bottom, float values) as an image; NaN cells blank.

    (``sns.heatmap`` redraws the whole figure per call.) ``annotate`` writes each
    finite value into its cell with two decimals.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cmap = mpl.colormaps["viridis"].with_extremes(bad="white")
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    rows, cols = list(grid.index), list(grid.columns)

    def tick(names: list[Any]) -> FuncFormatter:
        return FuncFormatter(lambda v, _: str(names[int(v)]) if 0 <= int(v) < len(names) and v == int(v) else "")

    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.xaxis.set_major_formatter(tick(cols))
    ax.yaxis.set_major_formatter(tick(rows))
    ax.grid(False)
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                dark = (v - vmin) / max(vmax - vmin, 1e-12) < 0.6  # the dark end of viridis gets white text
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image


def colorbar(fig: Figure, mappable: AxesImage, axes: AxesGrid, text: str) -> None:
    """One colour bar for all ``axes``, scaled to the figure's height."""
    fig.colorbar(mappable, ax=axes, label=text, shrink=min(0.8, 3.0 / fig.get_figheight() + 0.2))


def suptitle(fig: Figure, text: str) -> None:
    """The figure's title, left-aligned."""
    fig.suptitle(text, x=0.01, ha="left", fontsize=11)


def method_lines(ax: Axes, data: pd.DataFrame, x: str, methods: Sequence[str]) -> None:
    """Mean over layers (and runs) per method, band = min–max over layers."""
    sns, _ = libs()
    marker = "o" if data["step"].nunique() <= 30 else None
    sns.lineplot(
        data=data,
        x=x,
        y="value",
        hue="method",
        hue_order=list(methods),
        palette=method_palette(methods),
        estimator="mean",
        errorbar=("pi", 100),
        marker=marker,
        markersize=4,
        linewidth=1.6,
        legend=False,
        ax=ax,
    )


def band_lines(
    ax: Axes, stats: pd.DataFrame, x: str, methods: Sequence[str], *, marker: str | None = "o", key: str = "method"
) -> None:
    """One line per method at ``stats["mean"]`` with a shaded band from ``low`` to ``high`` (NaN: no band there).

    ``stats``: rows per ``key`` and ``x`` (as :func:`dynamics.plots._common.across_seeds` returns).
    """
    pal = method_palette(methods)
    for m in methods:
        s = stats[stats[key] == m].sort_values(x)
        if s.empty:
            continue
        xs = s[x].to_numpy(dtype=float)
        ax.plot(xs, s["mean"].to_numpy(dtype=float), color=pal[m], marker=marker, markersize=4, linewidth=1.6)
        lo, hi = s["low"].to_numpy(dtype=float), s["high"].to_numpy(dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(xs, lo, hi, where=ok, color=pal[m], alpha=0.2, linewidth=0)
