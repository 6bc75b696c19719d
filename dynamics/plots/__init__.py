"""Figures of a full-rank vs ReLoRA comparison, drawn from the tidy results table.

Every function takes the long table written by :func:`dynamics.analyze.analyze_runs`
(``run, method, step, tokens, layer, component, kind, metric, value``; the raw
spectra side file for :func:`plot_spectra`) and returns a
:class:`matplotlib.figure.Figure`, created through pyplot (so a notebook's
inline backend shows it; close it with ``plt.close(fig)``). Nothing here calls
``show()`` or changes global settings: the theme is applied only while a figure
is built, and the backend is only switched (to ``Agg``) by :func:`save_all`, and
only on a machine without a display.

================================ ================================= ===================================================
module (family)                  function                          draws
================================ ================================= ===================================================
``training``                     :func:`plot_loss`                 training / validation loss (nats/token), minimal-pair
                                                                   accuracy
``spectral``                     :func:`plot_rank_over_training`   a metric (default PER) per layer over training; one
                                                                   column per method
\\                               :func:`plot_condition_numbers`    gradient condition numbers (log10 σ₁/σ_k) per
                                                                   component, methods overlaid
\\                               :func:`plot_spectra`              singular value spectra of one matrix at a few steps
``updates``                      :func:`plot_update_rank`          rank of update matrices (``update``,
                                                                   ``update_cumulative``, ``update_merge``, ``lora``)
\\                               :func:`plot_subspaces`            ReLoRA cycle-update overlap with the previous cycle;
                                                                   ReLoRA vs full-rank cumulative-update overlap
\\                               :func:`plot_intruders`            intruder dimensions of ``W_t`` against ``W_0``
``activations``                  :func:`plot_cka`                  linear CKA heatmaps (layer × checkpoint) per site
\\                               :func:`plot_cross_run_cka`        CKA ReLoRA vs full-rank, layer × step
``heavy_tails``                  :func:`plot_heavy_tails`          ESD power-law alpha of weights and gradients
\\                               :func:`plot_signal_rank`          singular values above the Marchenko–Pastur edge
``components``                   :func:`plot_component_summary`    final-step, layer-mean metric per component
\\                               :func:`plot_seed_summary`         the same with 95 % intervals across seeds, p-values
``registry``                     :data:`REGISTRY`, :func:`save_all` every figure the data supports → PNG/PDF, atomically
================================ ================================= ===================================================

Imports point one way: ``_style`` (look) ← ``_common`` (reading the table) ←
``_grid`` (the shared projection grid) ← the families ← ``registry`` ← this
package. Nothing imports back.

Conventions, the same in every figure: methods in the order full, relora, with
fixed colour-blind-safe colours (seaborn ``colorblind``: full-rank blue, ReLoRA
orange); layers in a sequential palette (``viridis``, layer 0 darkest); the
x-axis is tokens seen (``x="step"`` for optimizer steps); one legend per
figure, outside the axes. The matrices a figure shows are those the table
holds (a ReLoRA run that wrapped q and v has wrapped-only rows for q and v
only), sorted in :data:`dynamics.summary.COMPONENT_ORDER`. Per-head circuits
(``attn.ov.h3``) are averaged over heads when ``attn.ov`` / ``attn.qk`` is asked
for; ReLoRA's adapter factors (``attn.q.lora_a``) are never compared with
full-rank matrices. Several runs of the same method are averaged. Rows of the
former kind ``update_restart`` are read as ``update_merge``. A figure whose
data is missing raises :class:`NoDataError` (a
:class:`~dynamics.validation.DynamicsError`) naming the kind/metric asked for
and what the table has.
"""

from __future__ import annotations

from dynamics.plots._common import COLUMNS, MERGE_KIND, ORDER, NoDataError, merge_steps
from dynamics.plots._style import (
    ACT_ORDER,
    KIND_LABELS,
    LOG_METRICS,
    METHOD_LABELS,
    METHOD_ORDER,
    METRIC_LABELS,
    SHORT_LABELS,
    X_LABELS,
    method_palette,
)
from dynamics.plots.activations import plot_cka, plot_cross_run_cka
from dynamics.plots.components import plot_component_summary, plot_seed_summary
from dynamics.plots.heavy_tails import plot_heavy_tails, plot_signal_rank
from dynamics.plots.registry import REGISTRY, save_all
from dynamics.plots.spectral import plot_condition_numbers, plot_rank_over_training, plot_spectra
from dynamics.plots.training import plot_loss
from dynamics.plots.updates import UPDATE_KINDS, UPDATE_TITLES, plot_intruders, plot_subspaces, plot_update_rank
from trainer.run_format import SPECTRA_COLUMNS

#: Former name of :func:`merge_steps` (the ReLoRA merges were called restarts).
restart_steps = merge_steps

__all__ = [
    # conventions
    "METHOD_ORDER",
    "METHOD_LABELS",
    "METRIC_LABELS",
    "KIND_LABELS",
    "SHORT_LABELS",
    "X_LABELS",
    "LOG_METRICS",
    "ACT_ORDER",
    "ORDER",
    "COLUMNS",
    "SPECTRA_COLUMNS",
    "UPDATE_KINDS",
    "UPDATE_TITLES",
    "MERGE_KIND",
    "method_palette",
    # the table
    "NoDataError",
    "merge_steps",
    "restart_steps",
    # figures
    "plot_loss",
    "plot_rank_over_training",
    "plot_condition_numbers",
    "plot_spectra",
    "plot_update_rank",
    "plot_subspaces",
    "plot_intruders",
    "plot_cka",
    "plot_cross_run_cka",
    "plot_heavy_tails",
    "plot_signal_rank",
    "plot_component_summary",
    "plot_seed_summary",
    # every figure, to files
    "REGISTRY",
    "save_all",
]
