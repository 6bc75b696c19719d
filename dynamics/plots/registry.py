"""The figure registry (every figure :func:`save_all` writes, by file name) and :func:`save_all` itself.

Only the project's "this input is bad / has no data" errors
(:class:`~dynamics.validation.DynamicsError` and its subclasses, e.g.
:class:`~dynamics.plots.NoDataError`) skip a figure, with a logged note; any
other exception (a programming error: ``TypeError``, ``KeyError`` ...) propagates.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import matplotlib as mpl
import pandas as pd

import dynamics.plots._style as S
from dynamics.analyze import read_results
from dynamics.plots._common import NoDataError, check_table
from dynamics.plots.activations import plot_cka, plot_cross_run_cka
from dynamics.plots.components import plot_component_summary, plot_seed_summary
from dynamics.plots.heavy_tails import plot_heavy_tails, plot_signal_rank
from dynamics.plots.spectral import plot_condition_numbers, plot_rank_over_training, plot_spectra
from dynamics.plots.training import plot_loss
from dynamics.plots.updates import plot_intruders, plot_subspaces, plot_update_rank
from dynamics.validation import DynamicsError
from trainer.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Draw", "REGISTRY", "save_all"]

log = logging.getLogger(__name__)

#: How the registry draws a figure: ``draw(results_table, spectra_table_or_None) -> Figure``.
Draw = Callable[[pd.DataFrame, "pd.DataFrame | None"], "Figure"]


def _circuits(table: pd.DataFrame) -> list[str]:
    """The per-head circuits present (``attn.ov``, ``attn.qk``); both named when neither is, for the error message."""
    comps = table.loc[table["kind"] == "weight", "component"].astype(str)
    found = [c for c in S.CIRCUITS if comps.str.startswith(c + ".h").any()]
    return found or list(S.CIRCUITS)


def _weight_spectra(table: pd.DataFrame, spectra: pd.DataFrame | None) -> Figure:
    """The middle layer's down-projection spectra; :class:`NoDataError` without a spectra table."""
    if spectra is None:
        raise NoDataError("no spectra table (<results stem>.spectra.parquet, written by `dynamics analyze`)")
    return plot_spectra(spectra, component="mlp.down")


#: Every figure, in the order :func:`save_all` draws them: file stem → ``draw(table, spectra)``.
REGISTRY: Mapping[str, Draw] = MappingProxyType(
    {
        "loss": lambda t, s: plot_loss(t),
        "weight_rank": lambda t, s: plot_rank_over_training(t, "weight"),
        "grad_rank": lambda t, s: plot_rank_over_training(t, "grad"),
        "grad_condition": lambda t, s: plot_condition_numbers(t, "grad"),
        "update_rank": lambda t, s: plot_update_rank(t),
        "circuit_rank": lambda t, s: plot_rank_over_training(t, "weight", components=_circuits(t)),
        "act_rank": lambda t, s: plot_rank_over_training(t, "act"),
        "act_anisotropy": lambda t, s: plot_rank_over_training(t, "act", "anisotropy"),
        "cka": lambda t, s: plot_cka(t),
        "component_summary": lambda t, s: plot_component_summary(t),
        "grad_component_summary": lambda t, s: plot_component_summary(t, kind="grad"),
        "heavy_tails": lambda t, s: plot_heavy_tails(t),
        "signal_rank": lambda t, s: plot_signal_rank(t),
        "update_subspaces": lambda t, s: plot_subspaces(t),
        "intruders": lambda t, s: plot_intruders(t),
        "cross_run_cka": lambda t, s: plot_cross_run_cka(t),
        "seed_summary": lambda t, s: plot_seed_summary(t),
        "weight_spectra": _weight_spectra,
    }
)


def _use_agg_without_display() -> None:
    """Switch to the Agg backend when no display is reachable and a GUI backend would be used."""
    if sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    backend = str(mpl.get_backend()).lower()
    non_gui = ("agg", "pdf", "svg", "ps", "cairo", "template", "inline", "module://")
    if not backend.startswith(non_gui):
        mpl.use("Agg")


def save_all(
    table: pd.DataFrame | str | os.PathLike[str],
    spectra: pd.DataFrame | str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "figures",
    *,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Write every figure of :data:`REGISTRY` the data supports to ``out_dir/<name>.<format>``; the paths written.

    ``table`` (and ``spectra``) may be DataFrames or paths; with a table path
    and no ``spectra``, ``<stem>.spectra.parquet`` next to it is used when it
    exists. A figure whose data is missing (no activations → no CKA, no
    ``spectra`` → no spectrum figure, ...) raises a
    :class:`~dynamics.validation.DynamicsError` and is skipped with a logged
    note; any other error propagates. Each file is written to a temporary name
    and renamed, so a reader never sees a partial figure. Figures are closed
    after saving (and when drawing one fails).
    """
    if isinstance(table, (str, os.PathLike)):
        path = Path(table)
        table = read_results(path)
        side = path.with_name(path.stem + ".spectra.parquet")
        if spectra is None and side.exists():
            spectra = side
    table = check_table(table, "save_all")
    if isinstance(spectra, (str, os.PathLike)):
        if not Path(spectra).is_file():
            raise DynamicsError(
                f"save_all: spectra file {str(spectra)!r} not found; `dynamics analyze` writes it "
                "next to the results table as <stem>.spectra.parquet"
            )
        spectra = pd.read_parquet(spectra)
    formats = [f.lower().lstrip(".") for f in formats]
    from matplotlib.backend_bases import FigureCanvasBase

    supported = set(FigureCanvasBase.get_supported_filetypes())
    bad = [f for f in formats if f not in supported]
    if bad:
        raise DynamicsError(f"save_all: unsupported formats {bad}; choose from {sorted(supported)}")
    _use_agg_without_display()
    _, plt = S.libs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in REGISTRY.items():
        opened = set(plt.get_fignums())
        fig = None
        try:
            fig = draw(table, spectra)
        except DynamicsError as e:
            log.info("save_all: skipping %s: %s", name, e)
            continue
        finally:
            if fig is None:  # drawing failed: close what it opened
                for num in set(plt.get_fignums()) - opened:
                    plt.close(num)
        try:
            written += _save(fig, out / name, formats, dpi)
        finally:
            plt.close(fig)
    return written


def _save(fig: Figure, stem: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """``fig`` as ``stem.<format>`` for each format, each written atomically; the paths."""
    paths = []
    with S.theme():
        for fmt in formats:
            target = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write(target, partial(fig.savefig, format=fmt, dpi=dpi))
            paths.append(target)
            fig.set_layout_engine("none")  # keep the layout just computed: the next format reuses it
    return paths
