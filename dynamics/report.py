"""A Markdown report of a full-rank vs ReLoRA comparison that states only what the runs support.

Every comparison is made across seed replicates (:mod:`dynamics.stats`): per
method the mean with its 95 % Student-t interval, the difference ReLoRA −
full-rank paired by seed (paired t-test, Wilcoxon signed-rank from 6 pairs on;
Welch's t-test when the runs cannot be paired) with its 95 % interval, the
p-value and an effect size. The headline comparisons (:func:`headline_values`)
are one family: their p-values are adjusted together with
Benjamini–Hochberg (:data:`ADJUST`), and only differences whose adjusted
p-value is below 0.05 are worded as a difference. The claims of the study
(SPEC §1, C1–C6) are each one pre-specified test (:func:`claims`), adjusted
together with Holm (:data:`CLAIMS_ADJUST`). With one seed per method nothing
is tested and the report says so: no p-values, no verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from dynamics.seeds import replicate_values
from dynamics.stats import ADJUSTMENTS, compare_methods, describe, format_p, verdict
from dynamics.summary import COMPONENT_ORDER
from dynamics.validation import DynamicsError

__all__ = [
    "PROJECTIONS",
    "ADJUST",
    "CLAIMS_ADJUST",
    "ALPHA",
    "COMPONENT_METRICS",
    "Claim",
    "CLAIMS",
    "wrapped_components",
    "run_seeds",
    "headline_values",
    "headline_comparisons",
    "claims",
    "write_report",
]

#: The projection types (``attn.q`` … ``mlp.down``) the per-component comparisons cover.
PROJECTIONS = COMPONENT_ORDER
#: Multiple-comparison procedure over the headline comparisons (many components × metrics): false discovery rate.
ADJUST = "bh"
#: Procedure over the study's claims (a handful of pre-specified tests): family-wise error.
CLAIMS_ADJUST = "holm"
#: Level below which an adjusted p-value counts as a detected difference.
ALPHA = 0.05
#: Per-component headline comparisons: (group title, short label, kind, metric), at each run's final checkpoint.
COMPONENT_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("Weight PER per component (layer mean, final checkpoint)", "weight PER", "weight", "proportional_effective_rank"),
    (
        "Gradient PER per component (layer mean, final checkpoint)",
        "gradient PER",
        "grad",
        "proportional_effective_rank",
    ),
    (
        "Gradient condition number per component, log10 σ₁/σ_k (layer mean, final checkpoint)",
        "gradient log10 κ",
        "grad",
        "log10_condition_number",
    ),
    (
        "Update-matrix rank: PER of the cumulative update W_t − W_0 (layer mean, final checkpoint)",
        "update PER",
        "update_cumulative",
        "proportional_effective_rank",
    ),
)
_LOSS_GROUP = "Loss and minimal pairs (last checkpoint)"


@dataclass(frozen=True)
class Claim:
    """One qualitative claim of arXiv 2509.12960 (SPEC §1) as a direction of ReLoRA − full-rank."""

    key: str
    text: str
    #: +1: ReLoRA higher, −1: ReLoRA lower.
    sign: int
    #: What the test compares (one value per run).
    measure: str
    #: One line on what this run's scale and data change about the reading.
    caveat: str


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "C1",
        "ReLoRA ends with higher loss / perplexity than full-rank",
        +1,
        "final validation loss (nats/token; perplexity = exp(loss) moves with it)",
        "validation loss on the run's own held-out split, not Paloma",
    ),
    Claim(
        "C2",
        "ReLoRA has lower minimal-pair (BLiMP) accuracy",
        -1,
        "minimal-pair accuracy over all phenomena, last checkpoint",
        "the corpus's own minimal pairs unless BLiMP files were given; a small model near ceiling or chance shows little",
    ),
    Claim(
        "C3",
        "ReLoRA has lower PER of weights (in most components)",
        -1,
        "weight PER, mean over projections and layers, final checkpoint",
        "PER of small matrices moves little in a few hundred steps: weights stay close to their random init",
    ),
    Claim(
        "C4",
        "ReLoRA has lower PER of gradients",
        -1,
        "gradient PER, mean over projections and layers, final checkpoint",
        "gradients on one fixed batch per checkpoint",
    ),
    Claim(
        "C5",
        "ReLoRA's gradients are ill-conditioned early in training",
        +1,
        "gradient log10 σ₁/σ_k, mean over projections and layers, first checkpoint after step 0",
        "'early' is the first checkpoint after step 0 of a short run, not the study's first thousands of steps",
    ),
    Claim(
        "C6",
        "The gaps widen with model size (11M → 66M)",
        +1,
        "the C1–C5 differences at two model sizes",
        "needs the same comparison at two model sizes",
    ),
)


def wrapped_components(table: pd.DataFrame, run: str) -> list[str]:
    """Components ``run`` wraps with adapters, as the table records them (its ``lora`` rows), in layer order.

    The analysis writes ``lora`` rows only for the matrices a run's stored config
    wraps, so a run trained with ``relora.targets=[q,v]`` gives ``["attn.q", "attn.v"]``.
    Empty when the table has no ``lora`` rows for ``run``.
    """
    present = set(table.loc[(table.run == run) & (table.kind == "lora"), "component"])
    return [c for c in PROJECTIONS if c in present]


def run_seeds(table: pd.DataFrame, evals: pd.DataFrame | None = None) -> dict[str, int]:
    """Run label → seed: the table's ``kind = "run"``, ``metric = "seed"`` rows, then ``evals``' ``seed`` column.

    Runs without a recorded seed are absent (their comparisons are unpaired).
    """
    rows = table[(table["kind"] == "run") & (table["metric"] == "seed")]
    seeds = {str(r): int(v) for r, v in zip(rows["run"], rows["value"]) if np.isfinite(v)}
    if evals is not None and not evals.empty and {"run", "seed"} <= set(evals.columns):
        for r, v in evals.groupby("run")["seed"].first().items():
            if pd.notna(v):
                seeds.setdefault(str(r), int(v))
    return seeds


def _last_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last evaluated checkpoint."""
    return evals[evals["step"] == evals.groupby("run")["step"].transform("max")]


def _pair_label(source: Any, phenomenon: Any) -> str:
    src = "" if source in (None, "builtin") or (isinstance(source, float) and math.isnan(source)) else f" ({source})"
    return f"minimal-pair accuracy{src}: {phenomenon}"


def headline_values(table: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """One value per run for each headline quantity: columns ``group, quantity, method, run, seed, value``.

    Loss group (from ``evals``, each run's last checkpoint; the table's
    ``val_loss`` training-log rows when ``evals`` is empty): validation loss,
    perplexity, minimal-pair accuracy per phenomenon (``overall`` first). Then,
    per projection, the layer mean at each run's final checkpoint of each
    :data:`COMPONENT_METRICS` entry the table has. ``seed`` is −1 where unknown.
    """
    seeds = run_seeds(table, evals)
    parts: list[pd.DataFrame] = []
    if evals is not None and not evals.empty:
        last = _last_evals(evals)
        rows = []
        for metric, label in (("val_loss", "validation loss (nats/token)"), ("val_ppl", "validation perplexity")):
            for _, r in last[last["metric"] == metric].iterrows():
                rows.append((label, r["method"], r["run"], float(r["value"])))
        acc = last[last["metric"] == "pair_acc"]
        if not acc.empty:
            src = acc["source"] if "source" in acc.columns else pd.Series([None] * len(acc), index=acc.index)
            acc = acc.assign(_label=[_pair_label(s, p) for s, p in zip(src, acc["phenomenon"])])
            first_seen = list(dict.fromkeys(acc["_label"]))
            labels = sorted(first_seen, key=lambda lb: (not lb.endswith(": overall"), first_seen.index(lb)))
            for lb in labels:
                for _, r in acc[acc["_label"] == lb].iterrows():
                    rows.append((lb, r["method"], r["run"], float(r["value"])))
        parts.append(pd.DataFrame(rows, columns=["quantity", "method", "run", "value"]).assign(group=_LOSS_GROUP))
    else:
        v = table[(table["kind"] == "train") & (table["metric"] == "val_loss")]
        v = v[v["step"] == v.groupby("run")["step"].transform("max")]
        if not v.empty:
            parts.append(
                v[["method", "run", "value"]].assign(quantity="validation loss (nats/token)", group=_LOSS_GROUP)
            )
    for group, short, kind, metric in COMPONENT_METRICS:
        try:
            vals = replicate_values(table, kind=kind, metric=metric)
        except DynamicsError:
            continue
        vals = vals[vals["component"].isin(PROJECTIONS)]
        order = {c: i for i, c in enumerate(PROJECTIONS)}
        vals = vals.sort_values("component", key=lambda s: s.map(order), kind="stable")
        parts.append(
            vals.assign(quantity=short + " · " + vals["component"].astype(str), group=group)[
                ["group", "quantity", "method", "run", "value"]
            ]
        )
    if not parts:
        return pd.DataFrame(columns=["group", "quantity", "method", "run", "seed", "value"])
    out = pd.concat(parts, ignore_index=True)
    out = out[np.isfinite(out["value"].astype(float))]
    out["seed"] = [seeds.get(str(r), -1) for r in out["run"]]
    return out[["group", "quantity", "method", "run", "seed", "value"]].reset_index(drop=True)


def headline_comparisons(table: pd.DataFrame, evals: pd.DataFrame, *, adjust: str = ADJUST) -> pd.DataFrame:
    """:func:`dynamics.stats.compare_methods` over :func:`headline_values` (one family), with a ``group`` column.

    Raises :class:`DynamicsError` when no quantity has values of both methods.
    """
    values = headline_values(table, evals)
    out = compare_methods(values, adjust=adjust, alpha=ALPHA)
    out.insert(0, "group", values.groupby("quantity", sort=False)["group"].first().reindex(out.index))
    return out


def _claim_values(table: pd.DataFrame, evals: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """One value per run for C1–C5 (``quantity`` = the claim key), and a note per claim (e.g. the step used)."""
    heads = headline_values(table, evals)
    notes: dict[str, str] = {}
    parts = []
    loss = heads[heads["quantity"] == "validation loss (nats/token)"]
    parts.append(loss.assign(quantity="C1"))
    acc = heads[heads["quantity"].str.startswith("minimal-pair accuracy") & heads["quantity"].str.endswith(": overall")]
    if not acc.empty:
        first = acc["quantity"].iloc[0]
        parts.append(acc[acc["quantity"] == first].assign(quantity="C2"))
    seeds = run_seeds(table, evals)
    for key, kind, metric, early in (
        ("C3", "weight", "proportional_effective_rank", False),
        ("C4", "grad", "proportional_effective_rank", False),
        ("C5", "grad", "log10_condition_number", True),
    ):
        step = None
        if early:
            rows = table[(table["kind"] == kind) & (table["metric"] == metric)]
            per_run = [set(g["step"]) for _, g in rows.groupby("run")]
            common = sorted(set.intersection(*per_run) - {0}) if per_run else []
            if not common:
                continue
            step = int(common[0])
            notes[key] = f"step {step}"
        try:
            vals = replicate_values(table, kind=kind, metric=metric, step=step)
        except DynamicsError:
            continue
        vals = vals[vals["component"].isin(PROJECTIONS)]
        if vals.empty:
            continue
        agg = vals.groupby(["run", "method"], as_index=False)["value"].mean()
        parts.append(agg.assign(quantity=key))
    values = pd.concat([p[["quantity", "method", "run", "value"]] for p in parts], ignore_index=True)
    values["seed"] = [seeds.get(str(r), -1) for r in values["run"]]
    return values, notes


def claims(
    table: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    scale: str = "",
    sizes: str = "",
    comparisons: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The study's claims C1–C6 checked against these runs: one row each, indexed by key.

    Columns ``claim``, ``verdict`` (``supported`` / ``contradicted`` /
    ``inconclusive`` at this scale, ``not testable``, or ``not evaluable``),
    ``statistic`` (the numbers behind it: Δ = ReLoRA − full-rank with its 95 %
    interval, the test, p and the Holm-adjusted p over C1–C5, the effect size)
    and ``caveat`` (scale: ``scale`` describes the runs; ``sizes`` names the one
    model size, e.g. ``"micro"``, for C6, which these runs cannot evaluate). ``comparisons``
    (:func:`headline_comparisons`) adds per-component counts to C3 and C4.
    """
    values, notes = _claim_values(table, evals)
    result = None
    if not values.empty and values.groupby("quantity")["method"].nunique().max() >= 2:
        result = compare_methods(values, adjust=CLAIMS_ADJUST, alpha=ALPHA)
    n_runs = {str(m): int(n) for m, n in values.groupby("method")["run"].nunique().items()}
    rows = []
    for c in CLAIMS:
        caveat = f"{scale}; {c.caveat}" if scale else c.caveat
        if c.key == "C6":
            rows.append(
                {
                    "claim": f"{c.key}: {c.text}",
                    "verdict": "not evaluable",
                    "statistic": (
                        f"these runs have one model size{' (' + sizes + ')' if sizes else ''}; C6 needs the "
                        "comparison at two sizes "
                        "(e.g. `dynamics reproduce --preset tiny` and `--preset small`)"
                    ),
                    "caveat": c.caveat,
                }
            )
            continue
        if result is None or c.key not in result.index:
            rows.append(
                {
                    "claim": f"{c.key}: {c.text}",
                    "verdict": "not evaluable",
                    "statistic": f"the runs have no {c.measure} for both methods",
                    "caveat": caveat,
                }
            )
            continue
        r = cast(pd.Series, result.loc[c.key])
        v = verdict(r, c.sign)
        if r["p_value"] is None:
            stat = (
                f"{c.measure}: full-rank {r['full mean']:.4g}, ReLoRA {r['relora mean']:.4g} "
                f"({_runs_text(n_runs)}; {str(r['test']).removeprefix('not testable: ')})"
            )
            v = "not testable"
        else:
            stat = (
                f"{c.measure}{' (' + notes[c.key] + ')' if c.key in notes else ''}: "
                f"full-rank {_ci(r, 'full')}, ReLoRA {_ci(r, 'relora')}; "
                + describe(r, adjust=CLAIMS_ADJUST)
                + f"; {r['effect name']} {_signed(r['effect size'])}"
            )
            if comparisons is not None and c.key in ("C3", "C4"):
                stat += "; " + _component_count(comparisons, "weight PER" if c.key == "C3" else "gradient PER")
        rows.append({"claim": f"{c.key}: {c.text}", "verdict": v, "statistic": stat, "caveat": caveat})
    out = pd.DataFrame(rows, index=[c.key for c in CLAIMS])
    out.index.name = "claim"
    return out


def _runs_text(n_runs: dict[str, int]) -> str:
    return ", ".join(f"{n} {m} run{'s' if n != 1 else ''}" for m, n in sorted(n_runs.items()))


def _component_count(comparisons: pd.DataFrame, short: str) -> str:
    rows = comparisons[comparisons.index.str.startswith(short + " · ")]
    if rows.empty:
        return "no per-component rows"
    lower = int((rows["difference"].astype(float) < 0).sum())
    sig = int(((rows["difference"].astype(float) < 0) & (rows["significant"] == True)).sum())  # noqa: E712
    return (
        f"ReLoRA's mean is lower in {lower} of {len(rows)} projections "
        f"({sig} with a {ADJUSTMENTS[ADJUST]}-adjusted p < {ALPHA})"
    )


def _g(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{float(x):.{digits}g}".replace("-", "−")


def _signed(x: Any) -> str:
    """An effect size with its sign and two decimals (typographic minus)."""
    return f"{float(x):+.2f}".replace("-", "−")


def _ci(row: pd.Series, m: str, digits: int = 4) -> str:
    mean, lo, hi = row[f"{m} mean"], row[f"{m} low"], row[f"{m} high"]
    if lo is None:
        return _g(mean, digits)
    return f"{_g(mean, digits)} [{_g(lo, digits)}, {_g(hi, digits)}]"


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _comparison_tables(comps: pd.DataFrame, testable: bool) -> list[str]:
    lines: list[str] = []
    for group, g in comps.groupby("group", sort=False):
        lines += [f"### {group}", ""]
        if testable:
            head = [
                "quantity",
                "full-rank mean [95% CI]",
                "ReLoRA mean [95% CI]",
                "Δ ReLoRA − full [95% CI]",
                "test",
                "p",
                "effect size",
                f"{'BH' if ADJUST == 'bh' else 'Holm'}-adjusted p",
                "survives",
                "reading",
            ]
        else:
            head = ["quantity", "full-rank", "ReLoRA", "test"]
        lines += [_md_row(head), "|" + "---|" * len(head)]
        for q, r in g.iterrows():
            if testable:
                diff = (
                    _g(r["difference"])
                    if r["difference low"] is None
                    else f"{_g(r['difference'])} [{_g(r['difference low'])}, {_g(r['difference high'])}]"
                )
                eff = "–" if r["effect size"] is None else f"{r['effect name']} {_signed(r['effect size'])}"
                mark = {True: "✓", False: "–", None: "not tested"}[r["significant"]]
                lines.append(
                    _md_row(
                        [
                            q,
                            _ci(r, "full"),
                            _ci(r, "relora"),
                            diff,
                            r["test"],
                            format_p(r["p_value"]),
                            eff,
                            format_p(r["p_adjusted"]),
                            mark,
                            describe(r, adjust=ADJUST).split(" (")[0],
                        ]
                    )
                )
            else:
                lines.append(_md_row([q, _g(r["full mean"]), _g(r["relora mean"]), r["test"]]))
        lines.append("")
    return lines


def _observations(table: pd.DataFrame) -> list[str]:
    """Facts of the ReLoRA runs that follow from the method itself (not comparisons): cycle-update rank ≤ r."""
    out = []
    relora_runs = sorted(set(table.loc[table["method"] == "relora", "run"].astype(str)))
    wrapped = wrapped_components(table, relora_runs[0]) if relora_runs else []
    cycle = table[
        (table["method"] == "relora")
        & (table["kind"] == "update_merge")
        & (table["metric"] == "numerical_rank")
        & table["component"].isin(wrapped)
    ]
    lora = table[(table["method"] == "relora") & (table["kind"] == "lora") & (table["metric"] == "numerical_rank")]
    if not cycle.empty:
        out.append(
            f"Each ReLoRA cycle's update of a wrapped matrix ({', '.join(wrapped)}) has numerical rank "
            f"≤ {int(cycle['value'].max())} in every run (adapter rank r = "
            f"{int(lora['value'].max()) if not lora.empty else '?'}), as the method implies; the cumulative "
            "update's rank is compared above and drawn in the update-rank figure."
        )
    return out


def write_report(
    path: str | Path,
    *,
    title: str,
    table: pd.DataFrame,
    evals: pd.DataFrame,
    settings: dict[str, Any],
    figures: list[Path],
    timings: dict[str, float],
    scale: str = "",
    sizes: str = "",
    runs: dict[str, str] | None = None,
) -> Path:
    """Write the Markdown report (figures linked relative to the report's directory); returns its path.

    Sections: setup (with the seeds and the stage times), the claims of the
    study (:func:`claims`), every headline comparison
    (:func:`headline_comparisons`), observations, figures, how to read it.
    ``scale`` describes the runs' size for the claims' caveats, ``sizes`` names
    their model size (see :func:`claims`); ``runs``
    (label → method) is accepted for callers of the first version and unused:
    methods and seeds are read from ``table``.
    """
    from trainer.atomic import atomic_write_bytes

    del runs
    path = Path(path)
    seeds = run_seeds(table, evals)
    per_method = {str(m): int(n) for m, n in table.groupby("method")["run"].nunique().items()}
    try:
        comps: pd.DataFrame | None = headline_comparisons(table, evals)
    except DynamicsError:
        comps = None
    testable = comps is not None and comps["p_value"].notna().any()
    lines = [f"# {title}", ""]
    lines += ["## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in settings.items()]
    by_method = {
        m: sorted({seeds.get(str(r), -1) for r in table.loc[table["method"] == m, "run"]}) for m in sorted(per_method)
    }
    lines.append(
        "- **seeds**: "
        + "; ".join(
            f"{m}: {per_method[m]} run{'s' if per_method[m] != 1 else ''} "
            f"(seed{'s' if len(s) != 1 else ''} {', '.join('unknown' if v == -1 else str(v) for v in s)})"
            for m, s in by_method.items()
        )
    )
    lines += ["- **time** (wall clock, per stage): " + "; ".join(f"{k}: {v:.0f} s" for k, v in timings.items()), ""]

    lines += ["## Claims of the study", ""]
    if not testable:
        lines += [
            "**One run per method: no comparison can be tested.** A difference between two single runs "
            "cannot be told apart from seed-to-seed variation, so no claim gets a verdict. Train 3 or "
            "more seeds per method (`dynamics demo --seeds 3`, `dynamics reproduce --seeds 3`).",
            "",
        ]
    lines += (
        []
        if not testable
        else [
            "Each claim of arXiv 2509.12960 (ReLoRA vs full-rank at the same step and tokens) is one test of one "
            f"number per run; the p-values of C1–C5 are adjusted together with {ADJUSTMENTS[CLAIMS_ADJUST]} "
            f"(family-wise error); a verdict other than *inconclusive* needs an adjusted p < {ALPHA}. "
            "*Supported* / *contradicted* describe these runs at this scale only.",
            "",
        ]
    )
    cl = claims(table, evals, scale=scale, sizes=sizes, comparisons=comps)
    lines += [_md_row(["claim", "verdict at this scale", "statistic", "caveat"]), "|---|---|---|---|"]
    lines += [_md_row([r["claim"], f"**{r['verdict']}**", r["statistic"], r["caveat"]]) for _, r in cl.iterrows()]
    lines.append("")

    lines += ["## Comparisons", ""]
    if comps is None:
        lines += ["The table has no quantity measured for both methods.", ""]
    else:
        if testable:
            n_tests = int(comps["p_value"].notna().sum())
            n_sig = int((comps["significant"] == True).sum())  # noqa: E712
            lines += [
                "Each row: one value per run (layer means for components); per method the mean over seeds with "
                "its 95% Student-t interval; Δ = ReLoRA − full-rank, paired by seed (paired t-test below 6 "
                "pairs, Wilcoxon signed-rank from 6; Welch's t-test where the runs cannot be paired) with its "
                "95% interval; effect size Cohen's d_z (paired) or Hedges' g (Welch). "
                f"The {n_tests} p-values below are one family, adjusted with {ADJUSTMENTS[ADJUST]} "
                f"(false discovery rate {ALPHA}); ✓ marks the {n_sig} difference{'s' if n_sig != 1 else ''} "
                "that survive. Only those are worded as a difference.",
                "",
            ]
        else:
            lines += [
                "One run per method: the values below are single runs, **not tested**; no difference between "
                "them is a finding.",
                "",
            ]
        lines += _comparison_tables(comps, bool(testable))
    obs = _observations(table)
    if obs:
        lines += ["## Observations (properties of the method, not comparisons)", ""] + [f"- {o}" for o in obs] + [""]
    if figures:
        lines += ["## Figures", ""]
        if testable:
            lines += [
                "Lines over training are means over seeds; bands are 95% t-intervals across seeds where "
                "each method has two or more runs (figure titles say what a band is).",
                "",
            ]
        for f in figures:
            if f.suffix == ".png":
                rel = f.relative_to(path.parent) if f.is_relative_to(path.parent) else f
                lines += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({rel.as_posix()})", ""]
    lines += [
        "## How to read this",
        "",
        "PER is the effective rank (exp of the entropy of the normalised singular values) divided by min(m, n): "
        "1 means the spectrum is flat, small values mean a few directions dominate. Condition numbers are σ₁/σ_k "
        "(log10; a matrix with σ_k = 0 is left out of its layer mean). A 95% interval that excludes 0 and an "
        "adjusted p < 0.05 say the same thing only for the paired t-test; with few seeds the intervals are wide "
        "and most differences are not detectable: that is the honest answer, not a failure. A t-interval of a bounded "
        "quantity (an accuracy) can reach past its bounds with few seeds: it is wide, not wrong. "
        "All numbers come from the tables next to this report (`results.parquet`, `evaluation.csv`); "
        "`dynamics summary results.parquet` prints the per-component intervals and tests again.",
        "",
    ]
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
