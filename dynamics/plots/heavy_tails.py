"""Heavy tails and spikes of the singular value distribution: ESD power-law alpha, Marchenko–Pastur signal rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from dynamics.plots._grid import grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_heavy_tails", "plot_signal_rank"]


def _status_ok(table: pd.DataFrame, rows: pd.DataFrame, kind: str, metric: str) -> pd.DataFrame:
    """Alpha rows whose fit has status ok (``alpha_status == 0`` for the same run, step, matrix and kind)."""
    keys = ["run", "step", "layer", "component", "kind"]
    st = table[(table["kind"] == kind) & (table["metric"] == "alpha_status")][keys + ["value"]]
    ok = st[pd.to_numeric(st["value"]) == 0][keys]
    return rows.merge(ok, on=keys, how="inner")


def plot_heavy_tails(table: pd.DataFrame, *, x: str = "tokens") -> Figure:
    """Power-law exponent alpha of the ESD of weights and gradients over training; only fits with status ``ok``."""
    return grid(
        table,
        [("weight", "alpha", "weight α"), ("grad", "alpha", "gradient α")],
        "plot_heavy_tails",
        "Heavy tails: ESD power-law exponent α (KS-ok fits; smaller α = heavier tail)",
        keep=_status_ok,
        x=x,
    )


def plot_signal_rank(table: pd.DataFrame, *, x: str = "tokens") -> Figure:
    """Singular values above the Marchenko–Pastur edge (signal rank) of weights and gradients, and their energy."""
    return grid(
        table,
        [
            ("weight", "signal_rank", "weight signal rank"),
            ("weight", "signal_energy", "weight signal energy"),
            ("grad", "signal_rank", "grad signal rank"),
        ],
        "plot_signal_rank",
        "Spikes above the Marchenko–Pastur edge",
        x=x,
    )
