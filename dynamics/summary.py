"""The one-screen answer: how does a metric differ between methods, per component, at the end and over training."""

from __future__ import annotations

import pandas as pd

from dynamics.validation import DynamicsError
from trainer.names import ATTN_PROJS, MLP_PROJS

#: The projections in the order a reader scans a transformer layer (``attn.q`` … ``mlp.down``).
COMPONENT_ORDER: tuple[str, ...] = tuple(f"attn.{p}" for p in ATTN_PROJS) + tuple(f"mlp.{p}" for p in MLP_PROJS)


def summarize(
    table: pd.DataFrame, *, kind: str = "weight", metric: str = "proportional_effective_rank"
) -> pd.DataFrame:
    """Per component: the layer-mean of ``metric`` at each method's first and last step, and its change.

    Columns are ``(method, start)``, ``(method, end)``, ``(method, change)`` for each
    method, and ``end relora − full`` when both are present. Per-head circuit rows
    are averaged into ``attn.ov`` / ``attn.qk``. Raises :class:`DynamicsError`
    when the table has no rows of that kind and metric.
    """
    rows = table[(table["kind"] == kind) & (table["metric"] == metric) & (table["layer"] >= 0)].copy()
    if rows.empty:
        have = sorted(set(zip(table["kind"], table["metric"])))[:12]
        raise DynamicsError(f"summary: no rows with kind={kind!r} and metric={metric!r}; some available: {have}")
    rows["component"] = rows["component"].str.replace(r"\.h\d+$", "", regex=True)
    shared = set.intersection(*(set(m["component"]) for _, m in rows.groupby("method")))
    rows = rows[rows["component"].isin(shared)]  # compare like with like (e.g. no LoRA factors)
    out = {}
    for method, m in rows.groupby("method"):
        first, last = m["step"].min(), m["step"].max()
        start = m[m["step"] == first].groupby("component")["value"].mean()
        end = m[m["step"] == last].groupby("component")["value"].mean()
        out[(method, f"start (step {first})")] = start
        out[(method, f"end (step {last})")] = end
        out[(method, "change")] = end - start
    result = pd.DataFrame(out)
    methods = rows["method"].unique()
    if {"full", "relora"} <= set(methods):
        end_cols = {
            m: [c for c in result.columns if c[0] == m and c[1].startswith("end")][0] for m in ("full", "relora")
        }
        result[("relora − full", "end")] = result[end_cols["relora"]] - result[end_cols["full"]]
    order = [c for c in COMPONENT_ORDER if c in result.index] + sorted(
        c for c in result.index if c not in COMPONENT_ORDER
    )
    result = result.loc[order]
    result.index.name = f"{kind} {metric} (layer mean)"
    return result.round(4)
