"""A Markdown report of a full-rank vs ReLoRA comparison, with findings computed from the results table.

Every sentence of the "Findings" section is derived from numbers in the table;
nothing is assumed about which method wins.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dynamics.summary import COMPONENT_ORDER, summarize

#: The projection types (``attn.q`` … ``mlp.down``) the per-component findings compare.
PROJECTIONS = COMPONENT_ORDER


def wrapped_components(table: pd.DataFrame, run: str) -> list[str]:
    """Components ``run`` wraps with adapters, as the table records them (its ``lora`` rows), in layer order.

    The analysis writes ``lora`` rows only for the matrices a run's stored config
    wraps, so a run trained with ``relora.targets=[q,v]`` gives ``["attn.q", "attn.v"]``.
    Empty when the table has no ``lora`` rows for ``run``.
    """
    present = set(table.loc[(table.run == run) & (table.kind == "lora"), "component"])
    return [c for c in PROJECTIONS if c in present]


def _final(table: pd.DataFrame, run: str, kind: str, metric: str) -> float | None:
    rows = table[(table.run == run) & (table.kind == kind) & (table.metric == metric)]
    if rows.empty:
        return None
    return float(rows[rows.step == rows.step.max()]["value"].mean())


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _md_table(frame: pd.DataFrame, digits: int = 3) -> str:
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    lines = ["| " + " | ".join([str(frame.index.name or "")] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v, digits) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def findings(table: pd.DataFrame, evals: pd.DataFrame, runs: dict[str, str]) -> list[str]:
    """Plain-language statements computed from the table. ``runs`` maps method → run label."""
    out: list[str] = []
    full, relora = runs.get("full"), runs.get("relora")
    if full is None or relora is None:
        return ["Only one method was run; no comparison is possible."]
    vf, vr = _final(table, full, "train", "val_loss"), _final(table, relora, "train", "val_loss")
    if vf is not None and vr is not None:
        gap = vr - vf
        verdict = "higher (worse)" if gap > 0 else "lower (better)" if gap < 0 else "equal"
        out.append(
            f"Final validation loss: ReLoRA {vr:.3f} vs full-rank {vf:.3f} nats/token — ReLoRA is {abs(gap):.3f} {verdict}."
        )
    if not evals.empty:
        acc = evals[(evals.metric == "pair_acc") & (evals.phenomenon == "overall")]
        if {"full", "relora"} <= set(acc["method"]):
            af = acc[acc.method == "full"]["value"].iloc[-1]
            ar = acc[acc.method == "relora"]["value"].iloc[-1]
            out.append(
                f"Minimal-pair accuracy (built-in grammar, all phenomena): ReLoRA {ar:.3f} vs full-rank {af:.3f}."
            )
    try:
        s = summarize(table, kind="weight", metric="proportional_effective_rank")
    except ValueError:
        s = None
    if s is not None and ("relora − full", "end") in s.columns:
        diff = s[("relora − full", "end")]
        diff = diff[[c for c in PROJECTIONS if c in diff.index]]
        lower = int((diff < 0).sum())
        worst = diff.idxmin()
        out.append(
            f"Weight PER at the last checkpoint is lower for ReLoRA in {lower} of {len(diff)} projection types "
            f"(layer means; largest gap {diff.min():+.3f} in {worst}, smallest {diff.max():+.3f} in {diff.idxmax()})."
        )
        change_cols = [c for c in s.columns if c[1] == "change"]
        if len(change_cols) == 2:
            cf = s[("full", "change")][diff.index].mean()
            cr = s[("relora", "change")][diff.index].mean()
            out.append(
                f"Over training, mean weight PER changed by {cr:+.3f} under ReLoRA and {cf:+.3f} under full-rank training."
            )
    try:
        g = summarize(table, kind="grad", metric="log10_condition_number")
    except ValueError:
        g = None
    if g is not None and ("relora − full", "end") in g.columns:
        d = g[("relora − full", "end")][[c for c in PROJECTIONS if c in g.index]]
        out.append(
            f"Gradient condition numbers (log10 σ₁/σ_k, layer means) at the last checkpoint are higher for ReLoRA in "
            f"{int((d > 0).sum())} of {len(d)} projection types (mean difference {d.mean():+.2f} decades)."
        )
        early = _early_gradient_conditioning(table, full, relora)
        if early:
            out.append(early)
    wrapped = wrapped_components(table, relora)
    cycle = table[
        (table.run == relora)
        & (table.kind == "update_merge")
        & (table.metric == "numerical_rank")
        & table.component.isin(wrapped)
    ]
    lora = table[(table.run == relora) & (table.kind == "lora") & (table.metric == "numerical_rank")]
    if not cycle.empty:
        out.append(
            f"Each ReLoRA cycle's update of a wrapped matrix ({', '.join(wrapped)}) has numerical rank "
            f"≤ {int(cycle['value'].max())} (adapter rank r = {int(lora['value'].max()) if not lora.empty else '?'}), "
            "while the cumulative update grows with every merge — see the update-rank figure."
        )
    cum = table[
        (table.kind == "update_cumulative")
        & (table.metric == "proportional_effective_rank")
        & table.component.isin(wrapped or PROJECTIONS)
    ]
    if not cum.empty and {full, relora} <= set(cum.run):
        last = cum[cum.step == cum.step.max()]
        out.append(
            f"PER of the cumulative update W_t − W_0 at the end: ReLoRA {last[last.run == relora]['value'].mean():.3f} "
            f"vs full-rank {last[last.run == full]['value'].mean():.3f}."
        )
    return out


def _early_gradient_conditioning(table: pd.DataFrame, full: str, relora: str) -> str | None:
    g = table[(table.kind == "grad") & (table.metric == "log10_condition_number") & table.component.isin(PROJECTIONS)]
    steps = sorted(set(g[g.run == relora].step) & set(g[g.run == full].step) - {0})
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]

    def gap(step: int) -> float:
        at = g[g.step == step]
        return float(at[at.run == relora]["value"].mean() - at[at.run == full]["value"].mean())

    return (
        f"The ReLoRA − full-rank gap in gradient conditioning is {gap(first):+.2f} decades at step {first} "
        f"and {gap(last):+.2f} at step {last}."
    )


def write_report(
    path: str | Path,
    *,
    title: str,
    table: pd.DataFrame,
    evals: pd.DataFrame,
    runs: dict[str, str],
    settings: dict[str, Any],
    figures: list[Path],
    timings: dict[str, float],
) -> Path:
    """Write the Markdown report (figures linked relative to the report's directory)."""
    from trainer.atomic import atomic_write_bytes

    path = Path(path)
    lines = [f"# {title}", ""]
    lines += ["## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in settings.items()]
    lines += ["- **time**: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    lines += ["## Findings", ""] + [f"- {f}" for f in findings(table, evals, runs)] + [""]
    if not evals.empty:
        lines += ["## Loss and minimal pairs (last checkpoint)", ""]
        last = evals[evals.step == evals.groupby("method")["step"].transform("max")]
        last = last.assign(
            col=np.where(last.metric == "pair_acc", "pair_acc: " + last.phenomenon.astype(str), last.metric)
        )
        wide = last.pivot_table(index="col", columns="method", values="value", aggfunc="first")
        wide.index.name = "metric"
        lines += [_md_table(wide), ""]
    for kind, metric, label in (
        ("weight", "proportional_effective_rank", "Weight PER per component"),
        ("grad", "proportional_effective_rank", "Gradient PER per component"),
        ("grad", "log10_condition_number", "Gradient condition number (log10) per component"),
    ):
        try:
            s = summarize(table, kind=kind, metric=metric)
        except ValueError:
            continue
        lines += [f"## {label} (layer means)", "", _md_table(s), ""]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            if f.suffix == ".png":
                rel = f.relative_to(path.parent) if f.is_relative_to(path.parent) else f
                lines += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({rel.as_posix()})", ""]
    lines += [
        "## How to read this",
        "",
        "PER is the effective rank (exp of the entropy of the normalised singular values) divided by min(m, n): "
        "1 means the spectrum is flat, small values mean a few directions dominate. Condition numbers are σ₁/σ_k. "
        "All numbers come from the tables next to this report (`results.parquet`, `evaluation.csv`); "
        "re-create them with `dynamics analyze` and `dynamics evaluate`.",
        "",
    ]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
