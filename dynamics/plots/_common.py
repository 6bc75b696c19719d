"""Reading the results table for a figure: checks, selection, components, ReLoRA merges.

Every figure family starts here: :func:`check_table` (a DataFrame with the
results columns; legacy ``update_restart`` rows renamed ``update_merge``),
:func:`select` (rows of one kind and metric, or a :class:`NoDataError` naming
what is missing and what the table has), :func:`pick_components` (which matrices a
figure shows: those the table holds), and :func:`merge_steps` (where the
ReLoRA run merged, from the table alone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dynamics.plots._style import ACT_ORDER, CIRCUITS, X_LABELS
from dynamics.stats import mean_interval
from dynamics.summary import COMPONENT_ORDER
from dynamics.validation import DynamicsError
from trainer.run_format import RESULTS_COLUMNS

log = logging.getLogger(__name__)

#: Columns of the results table (:data:`trainer.run_format.RESULTS_COLUMNS`).
COLUMNS: tuple[str, ...] = RESULTS_COLUMNS
#: The analysis kind of the update between ReLoRA merges k−1 and k, and its former name (still read).
MERGE_KIND = "update_merge"
LEGACY_MERGE_KIND = "update_restart"
#: Component order: projections as a reader scans a layer, then head circuits, then model-level matrices.
#: Used for sorting only; which components a figure shows is what the table holds.
ORDER: tuple[str, ...] = COMPONENT_ORDER + CIRCUITS + ("embed", "lm_head")
_HEAD = r"\.h\d+$"
_FACTOR = r"\.lora_[ab]$"


class NoDataError(DynamicsError):
    """The table has no rows for what a figure draws (a kind, metric, component, step ...): the figure is skipped."""


def canonical_kind(kind: str) -> str:
    """``kind`` under its current name (``update_restart`` → ``update_merge``)."""
    return MERGE_KIND if kind == LEGACY_MERGE_KIND else kind


def check_table(table: object, caller: str) -> pd.DataFrame:
    """``table`` as the results table, or a :class:`DynamicsError`; ``update_restart`` rows read as ``update_merge``."""
    if not isinstance(table, pd.DataFrame):
        raise DynamicsError(
            f"{caller}: expected the results table as a pandas DataFrame (from "
            f"dynamics.analyze.read_results), got {type(table).__name__}"
        )
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DynamicsError(
            f"{caller}: the table lacks columns {missing}; expected the output of `dynamics analyze` "
            f"with columns {list(COLUMNS)}"
        )
    legacy = table["kind"] == LEGACY_MERGE_KIND
    if legacy.any():
        table = table.assign(kind=table["kind"].astype(object).mask(legacy, MERGE_KIND))
    return table


def available(table: pd.DataFrame, kind: str) -> str:
    """What the table has: its kinds, and the metrics of ``kind`` (for error messages)."""
    kinds = sorted(set(table["kind"]))
    metrics = sorted(set(table.loc[table["kind"] == kind, "metric"]))
    return f"kinds in the table: {kinds or 'none'}; metrics of kind {kind!r}: {metrics if metrics else 'none'}"


def select(
    table: pd.DataFrame, caller: str, kind: str, metrics: str | Sequence[str], *, hint: str = ""
) -> pd.DataFrame:
    """Rows of ``kind`` with one of ``metrics``; a :class:`NoDataError` naming what is missing and what is there."""
    wanted = [metrics] if isinstance(metrics, str) else list(metrics)
    rows = table[(table["kind"] == kind) & table["metric"].isin(wanted)]
    if rows.empty:
        what = repr(wanted[0]) if len(wanted) == 1 else f"any of {wanted}"
        raise NoDataError(
            f"{caller}: the table has no rows with kind={kind!r} and metric={what}; "
            f"{available(table, kind)}.{(' ' + hint) if hint else ''}"
        )
    return rows


def without_factors(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` without ReLoRA's adapter factors (``attn.q.lora_a``): never compared with full-rank matrices."""
    return rows[~rows["component"].astype(str).str.contains(_FACTOR, regex=True)]


def is_head(rows: pd.DataFrame) -> pd.Series:
    """Boolean mask of per-head circuit rows (``attn.ov.h3``)."""
    return rows["component"].astype(str).str.contains(_HEAD, regex=True)


def merge_heads(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-head circuit rows (``attn.ov.h3``) → one row per layer (``attn.ov``), the mean over heads."""
    head = is_head(rows)
    if not head.any():
        return rows
    heads = rows[head].assign(component=rows.loc[head, "component"].astype(str).str.replace(_HEAD, "", regex=True))
    keys = [c for c in COLUMNS if c != "value"]
    merged = heads.groupby(keys, dropna=False, as_index=False, sort=False).agg(value=("value", "mean"))
    frames: list[pd.DataFrame] = [rows[~head], merged[list(COLUMNS)]]
    return pd.concat(frames, ignore_index=True)


def ordered(components: set[str], kind: str = "weight") -> list[str]:
    """``components`` sorted: known ones in reading order (activation sites for ``act``), then the rest by name."""
    order = ACT_ORDER if kind == "act" else ORDER
    return [c for c in order if c in components] + sorted(components - set(order))


def per_layer(rows: pd.DataFrame) -> set[str]:
    """Components with rows inside a layer (``layer >= 0``; not ``embed`` / ``lm_head``)."""
    return set(rows.loc[pd.to_numeric(rows["layer"]) >= 0, "component"].astype(str))


def pick_components(
    rows: pd.DataFrame, caller: str, wanted: Sequence[str] | str | None, kind: str
) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the chosen components, and those components in order.

    ``wanted`` ``None``: every per-layer matrix that every method has (head
    circuits apart), else the circuits, else every shared component: what the
    table holds, not a list of assumed projections. ``"attn.ov"`` / ``"attn.qk"``
    are the per-head circuits averaged over heads. ReLoRA's adapter factors
    are left out.
    """
    rows = without_factors(rows)
    if wanted is not None and isinstance(wanted, str):
        wanted = [wanted]
    if wanted is None or any(str(c) in CIRCUITS for c in wanted):
        rows = merge_heads(rows)
    per_method = {str(m): set(g["component"].astype(str)) for m, g in rows.groupby("method")}
    shared = set.intersection(*per_method.values()) if per_method else set()
    if wanted is None:
        layered = shared & per_layer(rows)
        chosen = ordered(layered - set(CIRCUITS), kind) or ordered(layered, kind) or ordered(shared, kind)
        if not chosen:
            raise NoDataError(
                f"{caller}: no component of kind {kind!r} is present for every method ("
                + "; ".join(f"{m}: {ordered(c, kind)}" for m, c in per_method.items())
                + ")"
            )
    else:
        chosen = [str(c) for c in wanted]
        present = set(rows["component"].astype(str))
        missing = [c for c in chosen if c not in present]
        if missing:
            raise NoDataError(
                f"{caller}: no rows of kind {kind!r} for components {missing}; available: "
                f"{ordered(present, kind)} (per-head circuits as 'attn.ov' / 'attn.qk')"
            )
    return rows[rows["component"].isin(chosen)], chosen


def x_column(rows: pd.DataFrame, x: str, caller: str) -> str:
    """The x column to draw: ``x`` (``tokens`` or ``step``), or ``step`` when some rows lack a token count."""
    if x not in X_LABELS:
        raise DynamicsError(f"{caller}: x must be 'tokens' or 'step', got {x!r}")
    if x == "tokens" and rows["tokens"].isna().any():
        log.info("%s: some rows have no token count; plotting against optimizer step instead", caller)
        return "step"
    return x


def finite(rows: pd.DataFrame, caller: str) -> tuple[pd.DataFrame, int]:
    """Rows with a finite value, and how many were left out (logged)."""
    ok = np.isfinite(rows["value"].to_numpy(dtype=float))
    dropped = int((~ok).sum())
    if dropped:
        log.info("%s: %d non-finite values (e.g. σ_k = 0 → infinite condition number) left out", caller, dropped)
    return rows[ok], dropped


def numeric(rows: pd.DataFrame) -> pd.DataFrame:
    """Plain numpy dtypes for plotting (tables from parquet may carry pyarrow / nullable dtypes).

    ``step``, ``layer``: int64; ``tokens``, ``value``: float64 (unparseable → NaN); ``method``, ``component``: object.
    """
    out = rows.copy()
    for col in ("step", "layer"):
        out[col] = pd.to_numeric(out[col]).astype("int64")
    for col in ("tokens", "value"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    out["method"] = out["method"].astype(object)
    out["component"] = out["component"].astype(object)
    return out


def drawable(rows: pd.DataFrame, caller: str, what: str) -> pd.DataFrame:
    """:func:`numeric` rows with finite values; a :class:`NoDataError` when none is left."""
    out, _ = finite(numeric(rows), caller)
    if out.empty:
        raise NoDataError(f"{caller}: every {what} value is non-finite")
    return out


# ----------------------------------------------------------------------------------------------
# seeds


def has_seeds(rows: pd.DataFrame) -> bool:
    """Whether every method in ``rows`` has two or more runs (seed replicates): bands are then across seeds."""
    runs = rows.groupby("method")["run"].nunique()
    return bool(len(runs)) and bool((runs >= 2).all())


def across_seeds(rows: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean over runs and its 95 % Student-t interval across runs, per ``by`` (e.g. ``["method", "tokens"]``).

    Each run contributes one value per ``by`` group: the mean of its rows there
    (over layers, components ...). Returns columns ``by`` + ``mean``, ``low``,
    ``high``, ``n`` (runs); ``low``/``high`` are NaN where ``n < 2``. The interval
    is :func:`dynamics.stats.mean_interval`'s, ``x̄ ± t_{0.975, n−1} s/√n``.
    """
    keys = list(by)
    per_run = rows.groupby([*keys, "run"], as_index=False, sort=True)["value"].mean()
    out = []
    for key, g in per_run.groupby(keys, sort=True):
        mean, lo, hi = mean_interval(g["value"].to_numpy(dtype=float))
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec.update(mean=mean, low=np.nan if lo is None else lo, high=np.nan if hi is None else hi, n=len(g))
        out.append(rec)
    return pd.DataFrame(out, columns=[*keys, "mean", "low", "high", "n"])


# ----------------------------------------------------------------------------------------------
# ReLoRA merges


def merge_steps(table: pd.DataFrame) -> list[int]:
    """Steps at which the ReLoRA run(s) merged their adapters, inferred from the table alone.

    The checkpoint steps that have ``update_merge`` rows (a merge boundary
    whose predecessor is also a checkpoint). When there are none (checkpoints
    that do not fall on merges), the restarts of the jagged learning-rate
    schedule: updates ``t > 0`` whose logged ``lr`` is exactly 0 (the ``train``
    row of step ``t + 1``). The merge happens right after update ``t``, so a
    boundary at the very end of a run (no update ``t`` logged) is left out.
    Empty when the table has no ReLoRA run.
    """
    table = check_table(table, "merge_steps")
    relora = table[table["method"] == "relora"]
    lr = relora[(relora["kind"] == "train") & (relora["metric"] == "lr")]
    steps = sorted({int(s) for s in relora.loc[relora["kind"] == MERGE_KIND, "step"]})
    if not steps:
        steps = sorted({int(s) - 1 for s in lr.loc[lr["value"] == 0.0, "step"] if int(s) - 1 > 0})
    if not lr.empty:  # the merge after update t is logged at step t + 1: a run's last boundary may not have merged
        last = int(lr["step"].max())
        steps = [s for s in steps if s + 1 <= last]
    return steps


def merge_positions(table: pd.DataFrame, x: str) -> list[float]:
    """:func:`merge_steps` in units of the x-axis ``x`` (tokens interpolated from the ReLoRA rows)."""
    steps = merge_steps(table)
    if not steps or x == "step":
        return [float(s) for s in steps]
    known = table[(table["method"] == "relora") & table["tokens"].notna()][["step", "tokens"]].drop_duplicates("step")
    known = known.astype(float).sort_values("step")
    if known.empty:
        return []
    s, t = known["step"].to_numpy(), known["tokens"].to_numpy()
    per_step = np.median(t[s > 0] / s[s > 0]) if (s > 0).any() else 0.0
    return [float(np.interp(st, s, t)) if s[0] <= st <= s[-1] else float(st * per_step) for st in steps]
