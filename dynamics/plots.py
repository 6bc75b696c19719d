"""Figures of a full-rank vs ReLoRA comparison, drawn from the tidy results table.

Every function takes the long table written by :func:`dynamics.analyze.analyze_runs`
(``run, method, step, tokens, layer, component, kind, metric, value``; the raw
spectra side file for :func:`plot_spectra`) and returns a
:class:`matplotlib.figure.Figure`, created through pyplot (so a notebook's
inline backend shows it; close it with ``plt.close(fig)``). Nothing here calls
``show()`` or changes global settings: the theme is applied only while a figure
is built, and the backend is only switched (to ``Agg``) by :func:`save_all`, and
only on a machine without a display.

==================================== =====================================================================
:func:`plot_rank_over_training`      a metric (default PER) per layer over training; one column per method
:func:`plot_condition_numbers`       gradient condition numbers (log10 σ₁/σ_k) per component, methods overlaid
:func:`plot_update_rank`             rank of update matrices (``update``, ``update_cumulative``,
                                     ``update_restart``, ``lora``) with ReLoRA merges marked
:func:`plot_spectra`                 singular value spectra of one matrix at a few steps (log y)
:func:`plot_cka`                     linear CKA heatmaps (layer × checkpoint) per activation site and method
:func:`plot_loss`                    training / validation loss (nats/token) and minimal-pair accuracy
:func:`plot_component_summary`       final-step, layer-mean metric per component: where the methods differ
:func:`save_all`                     every figure the data supports → PNG/PDF files, atomically
==================================== =====================================================================

Conventions, the same in every figure: methods in the order full, relora, with
fixed colour-blind-safe colours (seaborn ``colorblind``: full-rank blue, ReLoRA
orange); layers in a sequential palette (``viridis``, layer 0 darkest); the
x-axis is tokens seen (``x="step"`` for optimizer steps); one legend per
figure, outside the axes. Per-head circuits (``attn.ov.h3``) are averaged over
heads when ``attn.ov`` / ``attn.qk`` is asked for; ReLoRA's adapter-factor
gradients (``attn.q.lora_a``) are never compared with full-rank matrices.
Several runs of the same method are averaged. A figure whose data is missing
raises :class:`~dynamics.validation.DynamicsError` naming the kind/metric asked
for and what the table has.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd

from dynamics.summary import COMPONENT_ORDER
from dynamics.validation import DynamicsError

__all__ = [
    "METHOD_ORDER",
    "METHOD_LABELS",
    "method_palette",
    "restart_steps",
    "plot_rank_over_training",
    "plot_condition_numbers",
    "plot_update_rank",
    "plot_spectra",
    "plot_cka",
    "plot_loss",
    "plot_component_summary",
    "save_all",
]

log = logging.getLogger(__name__)

COLUMNS = ("run", "method", "step", "tokens", "layer", "component", "kind", "metric", "value")
SPECTRA_COLUMNS = ("run", "method", "step", "layer", "component", "kind", "values")

#: Methods in display order; every figure uses this order and these colours.
METHOD_ORDER = ("full", "relora")
METHOD_LABELS = {"full": "full-rank", "relora": "ReLoRA"}
UPDATE_KINDS = ("update", "update_cumulative", "update_restart", "lora")
#: Activation sites in the order the residual stream passes them.
ACT_ORDER = ("resid_pre", "resid_mid", "attn.o", "mlp.down.in", "resid_post")
#: Component order: projections as a reader scans a layer, then head circuits, then model-level matrices.
ORDER = COMPONENT_ORDER + ("attn.ov", "attn.qk", "embed", "lm_head")

METRIC_LABELS = {
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
KIND_LABELS = {
    "weight": "weights W",
    "grad": "gradients dL/dW",
    "act": "activations (tokens × features)",
    "update": "update W_t − W_prev",
    "update_cumulative": "cumulative update W_t − W_0",
    "update_restart": "ReLoRA cycle update W_merge(k) − W_merge(k−1)",
    "lora": "live adapter update s·B·A",
}
#: Axis labels (the long form, with its definition, goes in the figure title).
SHORT_LABELS = {
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
#: Short panel titles of the update kinds.
UPDATE_TITLES = {
    "update": "step update W_t − W_prev",
    "update_cumulative": "cumulative W_t − W_0",
    "update_restart": "ReLoRA cycle W_k − W_(k−1)",
    "lora": "live adapter s·B·A",
}
#: Metrics whose raw value spans decades: drawn on a log y-axis.
LOG_METRICS = {"condition_number", "truncated_condition_number", "sigma_max", "sigma_min"}
_HEAD = r"\.h\d+$"
_FACTOR = r"\.lora_[ab]$"
_RESTART_STYLE = dict(color="0.3", linestyle=":", linewidth=1.0, zorder=0)


# ----------------------------------------------------------------------------------------------
# theme, colours, legends


def _libs():
    """seaborn and pyplot, imported on first use (``import dynamics`` stays fast)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    return sns, plt


@contextmanager
def _theme() -> Iterator[None]:
    """The figures' look, applied only while a figure is built; afterwards those settings are as they were.

    Only the keys set here are restored (unlike :func:`matplotlib.rc_context`, which restores every key and so
    would undo the ``interactive`` flag that IPython's inline backend sets when pyplot is first used inside
    it: later figures would then not be shown in a notebook).
    """
    sns, _ = _libs()
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.1))
    rc.update({"axes.titlesize": 10, "legend.frameon": False, "savefig.dpi": 150, "figure.dpi": 100,
               "axes.titlelocation": "left"})
    old = {k: mpl.rcParams[k] for k in rc}
    mpl.rcParams.update(rc)
    try:
        yield
    finally:
        mpl.rcParams.update(old)


def method_palette(methods: Sequence[str]) -> dict[str, tuple]:
    """Colour of each method: full-rank and ReLoRA always get the first two ``colorblind`` colours."""
    sns, _ = _libs()
    base = sns.color_palette("colorblind", 10)
    pal = {m: base[i] for i, m in enumerate(METHOD_ORDER)}
    extra = [m for m in methods if m not in pal]
    for i, m in enumerate(extra):
        pal[m] = base[(len(METHOD_ORDER) + i) % len(base)]
    return {m: pal[m] for m in methods}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _short(metric: str) -> str:
    return SHORT_LABELS.get(metric, METRIC_LABELS.get(metric, metric))


def _methods(rows: pd.DataFrame) -> list[str]:
    present = set(rows["method"])
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _layer_palette(layers: Sequence[int]) -> dict[int, tuple]:
    sns, _ = _libs()
    return dict(zip(layers, sns.color_palette("viridis", max(len(layers), 1))))


def _handle(label: str, **kw):
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **kw)


def _method_handles(methods: Sequence[str]) -> list:
    pal = method_palette(methods)
    return [_handle(_label(m), color=pal[m], linewidth=2) for m in methods]


def _legend(fig, handles: list, title: str | None = None) -> None:
    """The figure's one legend, outside the axes on the right."""
    fig.legend(handles=handles, title=title, loc="outside right upper", frameon=False)


def _compact(v: float, _pos: Any = None) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _style_x(ax, x: str) -> None:
    from matplotlib.ticker import FuncFormatter

    if x == "tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(_compact))


X_LABELS = {"tokens": "training tokens seen", "step": "optimizer step"}


def _figure(nrows: int, ncols: int, *, panel: tuple[float, float] = (3.6, 2.5), legend_width: float = 1.6, **kw):
    _, plt = _libs()
    size = (ncols * panel[0] + legend_width, nrows * panel[1] + 0.4)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained", **kw)
    return fig, axes


def _outer_labels(axes: np.ndarray, xlabel: str, ylabel: str) -> None:
    """Axis labels on the left column and the bottom row only (shared axes)."""
    nrows, ncols = axes.shape
    for (i, j), ax in np.ndenumerate(axes):
        ax.set_xlabel(xlabel if i == nrows - 1 else "")
        ax.set_ylabel(ylabel if j == 0 else "")


# ----------------------------------------------------------------------------------------------
# checking and selecting


def _check_table(table: Any, caller: str) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise DynamicsError(f"{caller}: expected the results table as a pandas DataFrame (from "
                            f"dynamics.analyze.read_results), got {type(table).__name__}")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DynamicsError(f"{caller}: the table lacks columns {missing}; expected the output of `dynamics analyze` "
                            f"with columns {list(COLUMNS)}")
    return table


def _available(table: pd.DataFrame, kind: str) -> str:
    kinds = sorted(set(table["kind"]))
    metrics = sorted(set(table.loc[table["kind"] == kind, "metric"]))
    return (f"kinds in the table: {kinds or 'none'}; metrics of kind {kind!r}: "
            f"{metrics if metrics else 'none'}")


def _select(table: pd.DataFrame, caller: str, kind: str, metrics: str | Sequence[str], *, hint: str = "") -> pd.DataFrame:
    """Rows of ``kind`` with one of ``metrics``; a DynamicsError naming what is missing and what is there."""
    wanted = [metrics] if isinstance(metrics, str) else list(metrics)
    rows = table[(table["kind"] == kind) & table["metric"].isin(wanted)]
    if rows.empty:
        what = repr(wanted[0]) if len(wanted) == 1 else f"any of {wanted}"
        raise DynamicsError(f"{caller}: the table has no rows with kind={kind!r} and metric={what}; "
                            f"{_available(table, kind)}.{(' ' + hint) if hint else ''}")
    return rows


def _merge_heads(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-head circuit rows (``attn.ov.h3``) → one row per layer (``attn.ov``), the mean over heads."""
    is_head = rows["component"].str.contains(_HEAD, regex=True)
    if not is_head.any():
        return rows
    heads = rows[is_head].assign(component=rows.loc[is_head, "component"].str.replace(_HEAD, "", regex=True))
    keys = [c for c in COLUMNS if c != "value"]
    merged = heads.groupby(keys, dropna=False, as_index=False, sort=False)["value"].mean()
    return pd.concat([rows[~is_head], merged[list(COLUMNS)]], ignore_index=True)


def _ordered(components: set[str], kind: str = "weight") -> list[str]:
    order = ACT_ORDER if kind == "act" else ORDER
    return [c for c in order if c in components] + sorted(components - set(order))


def _components(rows: pd.DataFrame, caller: str, components: Sequence[str] | str | None, kind: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the chosen components (default: the wrapped projections, else every shared component)."""
    rows = rows[~rows["component"].str.contains(_FACTOR, regex=True)]  # ReLoRA's A/B factors: not comparable
    if components is not None and isinstance(components, str):
        components = [components]
    if components is None or any(str(c) in {"attn.ov", "attn.qk"} for c in components):
        rows = _merge_heads(rows)
    per_method = {m: set(g["component"]) for m, g in rows.groupby("method")}
    shared = set.intersection(*per_method.values()) if per_method else set()
    if components is None:
        layered = {c for c in shared if (rows.loc[rows["component"] == c, "layer"] >= 0).any()}
        chosen = [] if kind == "act" else [c for c in COMPONENT_ORDER if c in shared]
        chosen = chosen or _ordered(layered, kind) or _ordered(shared, kind)
        if not chosen:
            raise DynamicsError(f"{caller}: no component of kind {kind!r} is present for every method ("
                                + "; ".join(f"{m}: {_ordered(c, kind)}" for m, c in per_method.items()) + ")")
    else:
        chosen = list(components)
        present = set(rows["component"])
        missing = [c for c in chosen if c not in present]
        if missing:
            raise DynamicsError(f"{caller}: no rows of kind {kind!r} for components {missing}; available: "
                                f"{_ordered(present, kind)} (per-head circuits as 'attn.ov' / 'attn.qk')")
    return rows[rows["component"].isin(chosen)], chosen


def _x(rows: pd.DataFrame, x: str, caller: str) -> str:
    if x not in X_LABELS:
        raise DynamicsError(f"{caller}: x must be 'tokens' or 'step', got {x!r}")
    if x == "tokens" and rows["tokens"].isna().any():
        log.info("%s: some rows have no token count; plotting against optimizer step instead", caller)
        return "step"
    return x


def _finite(rows: pd.DataFrame, caller: str) -> tuple[pd.DataFrame, int]:
    ok = np.isfinite(rows["value"].to_numpy(dtype=float))
    dropped = int((~ok).sum())
    if dropped:
        log.info("%s: %d non-finite values (e.g. σ_k = 0 → infinite condition number) left out", caller, dropped)
    return rows[ok], dropped


def _numeric(rows: pd.DataFrame) -> pd.DataFrame:
    """Plain numpy dtypes for plotting (tables from parquet may carry pyarrow / nullable dtypes)."""
    out = rows.copy()
    for col in ("step", "layer"):
        out[col] = pd.to_numeric(out[col]).astype("int64")
    for col in ("tokens", "value"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    out["method"] = out["method"].astype(object)
    out["component"] = out["component"].astype(object)
    return out


# ----------------------------------------------------------------------------------------------
# ReLoRA restarts


def restart_steps(table: pd.DataFrame) -> list[int]:
    """Steps at which the ReLoRA run(s) merged their adapters, inferred from the table alone.

    The checkpoint steps that have ``update_restart`` rows (a merge boundary
    whose predecessor is also a checkpoint). When there are none (checkpoints
    that do not fall on merges), the restarts of the jagged learning-rate
    schedule: updates ``t > 0`` whose logged ``lr`` is exactly 0 (the ``train``
    row of step ``t + 1``). The merge happens right after update ``t``, so a
    boundary at the very end of a run (no update ``t`` logged) is left out.
    Empty when the table has no ReLoRA run.
    """
    table = _check_table(table, "restart_steps")
    relora = table[table["method"] == "relora"]
    lr = relora[(relora["kind"] == "train") & (relora["metric"] == "lr")]
    steps = sorted({int(s) for s in relora.loc[relora["kind"] == "update_restart", "step"]})
    if not steps:
        steps = sorted({int(s) - 1 for s in lr.loc[lr["value"] == 0.0, "step"] if int(s) - 1 > 0})
    if not lr.empty:  # the merge after update t is logged at step t + 1: a run's last boundary may not have merged
        last = int(lr["step"].max())
        steps = [s for s in steps if s + 1 <= last]
    return steps


def _restart_positions(table: pd.DataFrame, x: str) -> list[float]:
    steps = restart_steps(table)
    if not steps or x == "step":
        return [float(s) for s in steps]
    known = table[(table["method"] == "relora") & table["tokens"].notna()][["step", "tokens"]].drop_duplicates("step")
    known = known.astype(float).sort_values("step")
    if known.empty:
        return []
    s, t = known["step"].to_numpy(), known["tokens"].to_numpy()
    per_step = np.median(t[s > 0] / s[s > 0]) if (s > 0).any() else 0.0
    return [float(np.interp(st, s, t)) if s[0] <= st <= s[-1] else st * per_step for st in steps]


def _mark_restarts(axes: Sequence, positions: Sequence[float]) -> None:
    for ax in axes:
        for p in positions:
            ax.axvline(p, **_RESTART_STYLE)


def _restart_handle():
    return _handle("ReLoRA merge", **_RESTART_STYLE)


# ----------------------------------------------------------------------------------------------
# 1. a metric per layer over training, methods side by side


def plot_rank_over_training(table: pd.DataFrame, kind: str = "weight", metric: str = "proportional_effective_rank", *,
                            components: Sequence[str] | str | None = None, x: str = "tokens"):
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
        Components to show, one row each (default: the seven wrapped
        projections q, k, v, o, gate, up, down, or for ``act`` every site).
        ``"attn.ov"`` / ``"attn.qk"`` are the per-head circuits averaged over heads.
    x
        ``"tokens"`` (default) or ``"step"``.

    Returns
    -------
    matplotlib.figure.Figure
        ReLoRA merges are marked with dotted vertical lines in ReLoRA's column.
    """
    caller = "plot_rank_over_training"
    table = _check_table(table, caller)
    rows = _select(table, caller, kind, metric)
    rows, comps = _components(rows, caller, components, kind)
    rows, _ = _finite(_numeric(rows), caller)
    if rows.empty:
        raise DynamicsError(f"{caller}: every {kind} {metric} value is non-finite")
    x = _x(rows, x, caller)
    methods = _methods(rows)
    layers = sorted(int(v) for v in rows["layer"].unique())
    pal = _layer_palette(layers)
    restarts = _restart_positions(table, x)
    marker = "o" if rows["step"].nunique() <= 30 else None
    sns, _ = _libs()
    with _theme():
        fig, axes = _figure(len(comps), len(methods), panel=(3.6, 2.1), sharex=True, sharey=True)
        for i, comp in enumerate(comps):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                data = rows[(rows["component"] == comp) & (rows["method"] == method)]
                if not data.empty:
                    sns.lineplot(data=data, x=x, y="value", hue="layer", hue_order=layers,
                                 palette=pal, errorbar=None, marker=marker,
                                 markersize=4, linewidth=1.4, legend=False, ax=ax)
                else:
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                if method == "relora":
                    _mark_restarts([ax], restarts)
                ax.set_title(f"{_label(method)} · {comp}")
                _style_x(ax, x)
        _outer_labels(axes, X_LABELS[x], _short(metric))
        fig.suptitle(f"{KIND_LABELS.get(kind, kind)}: {METRIC_LABELS.get(metric, metric)} per layer", x=0.01,
                     ha="left", fontsize=11)
        handles = [_handle(str(lay) if lay >= 0 else "model", color=pal[lay], linewidth=2, marker=marker,
                           markersize=4) for lay in layers]
        if restarts and "relora" in methods:
            handles.append(_restart_handle())
        _legend(fig, handles, title="layer")
    return fig


# ----------------------------------------------------------------------------------------------
# 2. gradient condition numbers, methods overlaid


def _method_lines(ax, data: pd.DataFrame, x: str, methods: Sequence[str]) -> None:
    """Mean over layers (and runs) per method, band = min–max over layers."""
    sns, _ = _libs()
    marker = "o" if data["step"].nunique() <= 30 else None
    sns.lineplot(data=data, x=x, y="value", hue="method", hue_order=list(methods), palette=method_palette(methods),
                 estimator="mean", errorbar=("pi", 100), marker=marker, markersize=4, linewidth=1.6,
                 legend=False, ax=ax)


def plot_condition_numbers(table: pd.DataFrame, kind: str = "grad", *, metric: str = "log10_condition_number",
                           components: Sequence[str] | str | None = None, x: str = "tokens", col_wrap: int = 4):
    """Condition numbers of ``kind`` (default gradients) over training, one panel per component.

    Lines are the layer mean per method, bands the range over layers.
    ``metric`` is ``log10_condition_number`` (default, log10 σ₁/σ_k),
    ``log10_truncated_condition_number`` (σ_k = the smallest singular value
    above the rank tolerance), or a raw ``condition_number`` /
    ``truncated_condition_number``, drawn on a log y-axis. Infinite values
    (σ_k = 0) are left out and counted in the panel.
    """
    caller = "plot_condition_numbers"
    table = _check_table(table, caller)
    rows = _select(table, caller, kind, metric)
    rows, comps = _components(rows, caller, components, kind)
    rows = _numeric(rows)
    x = _x(rows, x, caller)
    methods = _methods(rows)
    restarts = _restart_positions(table, x)
    ncols = min(col_wrap, len(comps))
    nrows = -(-len(comps) // ncols)
    ylabel = _short(metric)
    with _theme():
        fig, axes = _figure(nrows, ncols, panel=(3.2, 2.4), sharex=True, sharey=True)
        for ax, comp in zip(axes.flat, comps):
            data, dropped = _finite(rows[rows["component"] == comp], caller)
            if not data.empty:
                _method_lines(ax, data, x, methods)
            if dropped:
                ax.text(0.98, 0.02, f"{dropped} infinite left out", ha="right", va="bottom", fontsize=7,
                        color="0.4", transform=ax.transAxes)
            _mark_restarts([ax], restarts)
            ax.set_title(comp)
            if metric in LOG_METRICS:
                ax.set_yscale("log")
            _style_x(ax, x)
        for ax in list(axes.flat)[len(comps):]:
            ax.set_visible(False)
        _outer_labels(axes, X_LABELS[x], ylabel)
        for ax in list(axes.flat)[len(comps) - ncols: len(comps)]:  # bottom panel of each column
            ax.set_xlabel(X_LABELS[x])
            ax.xaxis.label.set_visible(True)
            ax.xaxis.set_tick_params(labelbottom=True)
        fig.suptitle(f"{KIND_LABELS.get(kind, kind)}: {METRIC_LABELS.get(metric, metric)} "
                     "(line: layer mean, band: range over layers)", x=0.01,
                     ha="left", fontsize=11)
        handles = _method_handles(methods) + ([_restart_handle()] if restarts else [])
        _legend(fig, handles, title="method")
    return fig


# ----------------------------------------------------------------------------------------------
# 3. update-matrix rank with ReLoRA merges marked


def plot_update_rank(table: pd.DataFrame, *, metric: str = "proportional_effective_rank",
                     kinds: Sequence[str] | None = None, components: Sequence[str] | str | None = None,
                     x: str = "tokens"):
    """Rank of the update matrices over training: one panel per update kind, methods overlaid.

    Kinds (those present, in this order): ``update`` (W_t − W_prev),
    ``update_cumulative`` (W_t − W_0), ``update_restart`` (one ReLoRA cycle,
    rank ≤ r) and ``lora`` (the live adapter s·B·A). Lines are the mean over
    layers and ``components`` (default the wrapped projections), bands the
    range. ReLoRA merges (:func:`restart_steps`) are dotted vertical lines;
    without a ReLoRA run there are none (logged).
    """
    caller = "plot_update_rank"
    table = _check_table(table, caller)
    wanted = list(kinds) if kinds is not None else list(UPDATE_KINDS)
    bad = [k for k in wanted if k not in UPDATE_KINDS]
    if bad:
        raise DynamicsError(f"{caller}: kinds must be among {list(UPDATE_KINDS)}, got {bad}")
    present = [k for k in wanted if ((table["kind"] == k) & (table["metric"] == metric)).any()]
    if not present:
        raise DynamicsError(f"{caller}: the table has no update-matrix rows (kinds {wanted}) with metric={metric!r}; "
                            f"kinds in the table: {sorted(set(table['kind']))}. Analyse with the update kinds "
                            "(`dynamics analyze --kinds weight,update,update_cumulative,update_restart,lora`).")
    parts = []
    for k in present:
        r, _ = _components(table[(table["kind"] == k) & (table["metric"] == metric)], caller, components, k)
        parts.append(r)
    rows, _ = _finite(_numeric(pd.concat(parts, ignore_index=True)), caller)
    x = _x(rows, x, caller)
    methods = _methods(rows)
    restarts = _restart_positions(table, x)
    if not restarts:
        log.info("%s: no ReLoRA merges found in the table (no relora run, or no update_restart rows / lr restarts); "
                 "no restart marks", caller)
    ylabel = _short(metric)
    with _theme():
        fig, axes = _figure(1, len(present), panel=(3.4, 2.8), sharex=True, sharey=True)
        for ax, k in zip(axes[0], present):
            data = rows[rows["kind"] == k]
            if not data.empty:
                _method_lines(ax, data, x, methods)
            _mark_restarts([ax], restarts)
            ax.set_title(UPDATE_TITLES[k])
            _style_x(ax, x)
        _outer_labels(axes, X_LABELS[x], ylabel)
        fig.suptitle(f"Update-matrix rank: {METRIC_LABELS.get(metric, metric)} (line: mean over layers and "
                     "projections, band: range)", x=0.01,
                     ha="left", fontsize=11)
        handles = _method_handles(methods) + ([_restart_handle()] if restarts else [])
        _legend(fig, handles, title="method")
    return fig


# ----------------------------------------------------------------------------------------------
# 4. singular value spectra


def plot_spectra(spectra: pd.DataFrame, steps: Sequence[int] | None = None, component: str = "mlp.down",
                 layer: int | None = None, *, kind: str = "weight", normalize: bool = False, max_steps: int = 5):
    """Singular values σ_i (log scale) of one matrix at a few checkpoints; one panel per method.

    Parameters
    ----------
    spectra
        The side file ``<results stem>.spectra.parquet`` (columns ``run, method,
        step, layer, component, kind, shape, values``; values descending).
    steps
        Checkpoints to draw (default: up to ``max_steps`` evenly spaced ones, first and last included).
    component, layer, kind
        Which matrix (default the SwiGLU down projection of the middle layer, weights).
    normalize
        Divide by σ₁ so the spectra's shapes compare across steps.
    """
    caller = "plot_spectra"
    if not isinstance(spectra, pd.DataFrame):
        raise DynamicsError(f"{caller}: expected the spectra table (<results stem>.spectra.parquet) as a DataFrame, "
                            f"got {type(spectra).__name__}")
    missing = [c for c in SPECTRA_COLUMNS if c not in spectra.columns]
    if missing:
        raise DynamicsError(f"{caller}: the spectra table lacks columns {missing}; expected the .spectra.parquet "
                            "file written next to the results by `dynamics analyze`")
    rows = spectra[(spectra["kind"] == kind) & (spectra["component"] == component)]
    if rows.empty:
        kinds = sorted(set(spectra["kind"]))
        comps = _ordered(set(spectra.loc[spectra["kind"] == kind, "component"]))
        raise DynamicsError(f"{caller}: no spectra with kind={kind!r} and component={component!r}; kinds: {kinds}; "
                            f"components of kind {kind!r}: {comps or 'none'}")
    layers = sorted(int(v) for v in rows["layer"].unique())
    if layer is None:
        layer = layers[len(layers) // 2]
    elif layer not in layers:
        raise DynamicsError(f"{caller}: no {kind} spectra of {component} at layer {layer}; layers: {layers}")
    rows = rows[rows["layer"] == layer]
    available = sorted(int(s) for s in rows["step"].unique())
    if steps is None:
        idx = np.unique(np.linspace(0, len(available) - 1, min(max_steps, len(available))).round().astype(int))
        steps = [available[i] for i in idx]
    else:
        steps = [int(s) for s in steps]
        absent = [s for s in steps if s not in available]
        if absent:
            raise DynamicsError(f"{caller}: no spectra at steps {absent} for layers.{layer}.{component} ({kind}); "
                                f"steps: {available}")
    methods = _methods(rows)
    sns, _ = _libs()
    pal = dict(zip(steps, sns.color_palette("viridis", len(steps))))
    name = f"layers.{layer}.{component}" if layer >= 0 else component
    with _theme():
        fig, axes = _figure(1, len(methods), panel=(3.8, 3.0), sharex=True, sharey=True)
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
            ax.set_title(f"{_label(method)} · {name}")
        _outer_labels(axes, "index i (descending)", "σ_i / σ₁" if normalize else "singular value σ_i")
        fig.suptitle(f"Singular value spectra of {KIND_LABELS.get(kind, kind)}", x=0.01, ha="left", fontsize=11)
        _legend(fig, [_handle(f"step {s}", color=pal[s], linewidth=2) for s in steps], title="checkpoint")
    return fig


# ----------------------------------------------------------------------------------------------
# 5. CKA heatmaps


def _heatmap(ax, grid: pd.DataFrame, vmin: float, vmax: float, annotate: bool):
    """``grid`` (rows top to bottom) as an image; NaN cells blank. (``sns.heatmap`` redraws the whole figure per call.)"""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cmap = mpl.colormaps["viridis"].with_extremes(bad="white")
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    rows, cols = list(grid.index), list(grid.columns)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: str(cols[int(v)]) if 0 <= int(v) < len(cols) and v == int(v) else ""))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: str(rows[int(v)]) if 0 <= int(v) < len(rows) and v == int(v) else ""))
    ax.grid(False)
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                dark = (v - vmin) / max(vmax - vmin, 1e-12) < 0.6  # the dark end of viridis gets white text
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image


def plot_cka(table: pd.DataFrame, *, metric: str = "cka_prev", sites: Sequence[str] | str | None = None,
             annotate: bool | None = None):
    """Linear CKA of activations as layer × checkpoint heatmaps; rows = sites, columns = methods.

    ``cka_prev`` compares each checkpoint with the previous one (how much the
    representation moved), ``cka_final`` with the final checkpoint (how
    settled it is). One shared colour scale (up to 1) and colour bar.
    ``annotate`` writes the values in the cells (default: when the grid is small).
    """
    caller = "plot_cka"
    table = _check_table(table, caller)
    if metric not in ("cka_prev", "cka_final"):
        raise DynamicsError(f"{caller}: metric must be 'cka_prev' or 'cka_final', got {metric!r}")
    rows = _select(table, caller, "act", metric,
                   hint="CKA needs captured activations at two or more checkpoints (`dynamics analyze` with kind act).")
    rows, sites = _components(rows, caller, sites, "act")
    rows, _ = _finite(_numeric(rows), caller)
    methods = _methods(rows)
    steps = sorted(int(s) for s in rows["step"].unique())
    layers = sorted(int(v) for v in rows["layer"].unique())
    if annotate is None:
        annotate = len(steps) <= 12 and len(layers) <= 12
    vmin = min(float(np.floor(rows["value"].min() * 20) / 20), 0.9)
    with _theme():
        panel = (min(0.45 * len(steps) + 2.0, 8.0), min(0.32 * len(layers) + 1.3, 5.0))
        fig, axes = _figure(len(sites), len(methods), panel=panel, legend_width=1.0)
        mappable = None
        for i, site in enumerate(sites):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                data = rows[(rows["component"] == site) & (rows["method"] == method)]
                grid = data.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
                grid = grid.reindex(index=layers, columns=steps)
                mappable = _heatmap(ax, grid, vmin, 1.0, annotate)
                ax.set_title(f"{_label(method)} · {site}")
                ax.tick_params(axis="x", labelrotation=0)
                ax.tick_params(axis="y", labelrotation=0)
        _outer_labels(axes, "checkpoint step", "layer")
        if mappable is not None:
            fig.colorbar(mappable, ax=axes, label=METRIC_LABELS[metric], shrink=min(0.8, 3.0 / fig.get_figheight() + 0.2))
        fig.suptitle(f"Activations: {METRIC_LABELS[metric]}", x=0.01, ha="left", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------
# 6. loss curves


def plot_loss(table: pd.DataFrame, *, x: str = "tokens", smooth: int | None = None):
    """Training loss (smoothed, raw faint) and validation loss per run in nats/token; minimal-pair accuracy when present.

    ``smooth`` is the rolling-mean window over logged steps (default: about
    1/50 of the run). Runs of one method share its colour; ReLoRA merges are
    dotted vertical lines.
    """
    caller = "plot_loss"
    table = _check_table(table, caller)
    rows = _numeric(_select(table, caller, "train", ["loss", "val_loss", "pair_acc"],
                            hint="Training logs (metrics.jsonl) are read by `dynamics analyze`."))
    if not rows["metric"].isin(["loss", "val_loss"]).any():
        raise DynamicsError(f"{caller}: the table has no kind='train' rows with metric 'loss' or 'val_loss'; "
                            f"{_available(table, 'train')}")
    rows, _ = _finite(rows, caller)
    x = _x(rows, x, caller)
    methods = _methods(rows)
    pal = method_palette(methods)
    restarts = _restart_positions(table, x)
    has_acc = (rows["metric"] == "pair_acc").any()
    with _theme():
        fig, axes = _figure(1, 2 if has_acc else 1, panel=(4.6, 3.0), sharex=True)
        ax = axes[0, 0]
        for run, r in rows.groupby("run", sort=True):
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
            for run, r in rows[rows["metric"] == "pair_acc"].groupby("run", sort=True):
                r = r.sort_values("step")
                acc_ax.plot(r[x], r["value"], color=pal[r["method"].iloc[0]], marker="o", markersize=4, linewidth=1.4)
            acc_ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle="-", zorder=0)
            acc_ax.set_ylim(0, 1.02)
            acc_ax.set_title("minimal pairs (chance 0.5)")
            acc_ax.set_ylabel("minimal-pair accuracy")
        for a in axes[0]:
            a.set_xlabel(X_LABELS[x])
            _style_x(a, x)
            _mark_restarts([a], restarts)
        fig.suptitle("Training and validation loss", x=0.01, ha="left", fontsize=11)
        handles = _method_handles(methods) + [
            _handle("training (smoothed)", color="0.2", linewidth=1.6),
            _handle("validation", color="0.2", linestyle="--", marker="o", markersize=4)]
        if restarts:
            handles.append(_restart_handle())
        _legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------
# 7. where: final-step metric per component


def plot_component_summary(table: pd.DataFrame, *, kind: str = "weight", metric: str = "proportional_effective_rank",
                           step: int | None = None):
    """Layer-mean ``metric`` per component at each run's final step (or ``step``), methods side by side.

    Bars are the mean over layers (and runs), whiskers the range over layers.
    Components: the wrapped projections, the per-head OV/QK circuits averaged
    over heads, and any other component every method has (``embed``, ``lm_head``).
    """
    caller = "plot_component_summary"
    table = _check_table(table, caller)
    rows = _select(table, caller, kind, metric)
    rows = _merge_heads(rows[~rows["component"].str.contains(_FACTOR, regex=True)])
    per_method = [set(g["component"]) for _, g in rows.groupby("method")]
    comps = _ordered(set.intersection(*per_method), kind)
    rows, _ = _finite(_numeric(rows[rows["component"].isin(comps)]), caller)
    if step is None:
        rows = rows[rows["step"] == rows.groupby("run")["step"].transform("max")]
    else:
        at = rows[rows["step"] == step]
        if at.empty:
            raise DynamicsError(f"{caller}: no {kind} {metric} rows at step {step}; steps: "
                                f"{sorted(int(s) for s in rows['step'].unique())}")
        rows = at
    methods = _methods(rows)
    final = {m: sorted({int(s) for s in rows.loc[rows["method"] == m, "step"]}) for m in methods}
    sns, _ = _libs()
    with _theme():
        fig, axes = _figure(1, 1, panel=(max(4.0, 0.55 * len(comps) * max(len(methods), 1) + 1.0), 3.2))
        ax = axes[0, 0]
        sns.barplot(data=rows, x="component", y="value", hue="method", order=comps, hue_order=methods,
                    palette=method_palette(methods), estimator="mean", errorbar=("pi", 100), capsize=0.15,
                    err_kws={"linewidth": 1.0}, legend=False, ax=ax)
        ax.set_xlabel("component")
        ax.set_ylabel(_short(metric))
        ax.tick_params(axis="x", labelrotation=30)
        where = "final step" if step is None else f"step {step}"
        ax.set_title(f"{KIND_LABELS.get(kind, kind)}: {METRIC_LABELS.get(metric, metric)} at the {where}\n"
                     "bars: layer mean, whiskers: range over layers")
        pal = method_palette(methods)
        handles = [_handle(f"{_label(m)} (step {', '.join(map(str, final[m]))})", color=pal[m], linewidth=6)
                   for m in methods]
        _legend(fig, handles, title="method")
    return fig


# ----------------------------------------------------------------------------------------------
# 8. every figure, to files


def _use_agg_without_display() -> None:
    """Switch to the Agg backend when no display is reachable and a GUI backend would be used."""
    if sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    backend = str(mpl.get_backend()).lower()
    non_gui = ("agg", "pdf", "svg", "ps", "cairo", "template", "inline", "module://")
    if not backend.startswith(non_gui):
        mpl.use("Agg")


def _circuits(table: pd.DataFrame) -> list[str]:
    """The per-head circuits present (``attn.ov``, ``attn.qk``); both named when neither is, for the error message."""
    comps = table.loc[table["kind"] == "weight", "component"]
    found = [c for c in ("attn.ov", "attn.qk") if comps.str.startswith(c + ".h").any()]
    return found or ["attn.ov", "attn.qk"]


def _figures(spectra: pd.DataFrame | None) -> list[tuple[str, Callable[[pd.DataFrame], Any]]]:
    figures: list[tuple[str, Callable[[pd.DataFrame], Any]]] = [
        ("loss", plot_loss),
        ("weight_rank", lambda t: plot_rank_over_training(t, "weight")),
        ("grad_rank", lambda t: plot_rank_over_training(t, "grad")),
        ("grad_condition", lambda t: plot_condition_numbers(t, "grad")),
        ("update_rank", plot_update_rank),
        ("circuit_rank", lambda t: plot_rank_over_training(t, "weight", components=_circuits(t))),
        ("act_rank", lambda t: plot_rank_over_training(t, "act")),
        ("act_anisotropy", lambda t: plot_rank_over_training(t, "act", "anisotropy")),
        ("cka", plot_cka),
        ("component_summary", plot_component_summary),
        ("grad_component_summary", lambda t: plot_component_summary(t, kind="grad")),
    ]
    from dynamics import plots_analyses as A  # heavy tails, spikes, subspaces, intruders, cross-run CKA, seeds

    figures += [("heavy_tails", A.plot_heavy_tails), ("signal_rank", A.plot_signal_rank),
                ("update_subspaces", A.plot_subspaces), ("intruders", A.plot_intruders),
                ("cross_run_cka", A.plot_cross_run_cka), ("seed_summary", A.plot_seed_summary)]
    if spectra is not None:
        figures.append(("weight_spectra", lambda t: plot_spectra(spectra, component="mlp.down")))
    return figures


def save_all(table: pd.DataFrame | str | os.PathLike, spectra: pd.DataFrame | str | os.PathLike | None = None,
             out_dir: str | os.PathLike = "figures", *, formats: Sequence[str] = ("png", "pdf"),
             dpi: int = 150) -> list[Path]:
    """Write every figure the data supports to ``out_dir/<name>.<format>``; return the paths written.

    ``table`` (and ``spectra``) may be DataFrames or paths; with a table path
    and no ``spectra``, ``<stem>.spectra.parquet`` next to it is used when it
    exists. Figures whose data is missing (no activations → no CKA, no
    ``spectra`` → no spectrum figure, ...) are skipped with a logged note.
    Each file is written to a temporary name and renamed, so a reader never
    sees a partial figure. Figures are closed after saving.
    """
    from dynamics.analyze import read_results
    from trainer.atomic import atomic_write

    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        table = read_results(path)
        side = path.with_name(path.stem + ".spectra.parquet")
        if spectra is None and side.exists():
            spectra = side
    table = _check_table(table, "save_all")
    if isinstance(spectra, (str, os.PathLike)):
        if not Path(spectra).is_file():
            raise DynamicsError(f"save_all: spectra file {str(spectra)!r} not found; `dynamics analyze` writes it "
                                "next to the results table as <stem>.spectra.parquet")
        spectra = pd.read_parquet(spectra)
    formats = [f.lower().lstrip(".") for f in formats]
    from matplotlib.backend_bases import FigureCanvasBase

    supported = set(FigureCanvasBase.get_supported_filetypes())
    bad = [f for f in formats if f not in supported]
    if bad:
        raise DynamicsError(f"save_all: unsupported formats {bad}; choose from {sorted(supported)}")
    _use_agg_without_display()
    _, plt = _libs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spectra is None:
        log.info("save_all: skipping weight_spectra: no spectra table (<results stem>.spectra.parquet)")
    written: list[Path] = []
    for name, make in _figures(spectra):
        try:
            fig = make(table)
        except DynamicsError as e:
            log.info("save_all: skipping %s: %s", name, e)
            continue
        try:
            with _theme():
                for fmt in formats:
                    target = out / f"{name}.{fmt}"
                    atomic_write(target, lambda p, fmt=fmt: fig.savefig(p, format=fmt, dpi=dpi))
                    written.append(target)
                    fig.set_layout_engine("none")  # keep the layout just computed: the next format reuses it
        finally:
            plt.close(fig)
    return written
