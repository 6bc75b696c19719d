"""Table rows beyond spectral metrics: heavy tails, Marchenko–Pastur spikes, subspaces, seeds (for :mod:`dynamics.analyze`).

Rows added to a unit (one run at one checkpoint):

================ ===================================== =========================================================
kind             metric                                meaning
================ ===================================== =========================================================
weight, grad     ``alpha``, ``alpha_ks``,              power-law exponent of the ESD (eigenvalues σ²), its KS
                 ``alpha_xmin``, ``alpha_n_tail``      distance, cutoff (σ² units) and tail size — only when
                                                       fitted (:func:`dynamics.esd_power_law`)
weight, grad     ``alpha_status``                      always: 0 ok, 1 poor fit, 2 too few eigenvalues,
                                                       3 degenerate (:data:`dynamics.heavy_tails.FIT_STATUS`)
weight, grad     ``mp_edge``, ``signal_rank``,         Marchenko–Pastur edge for noise of the same shape and
                 ``signal_energy``                     variance, #σ above it, their energy fraction
weight           ``intruders``                         intruder dimensions of ``W_t`` against ``W_0`` among
                                                       its top-``intruder_k`` left singular vectors
update_merge     ``overlap_prev`` (+ ``_out``,         ReLoRA: subspace overlap of this cycle's update (``W`` at
                 ``_in``, ``_chance``)                 merge ``k`` minus ``W`` at merge ``k−1``) with the previous
                                                       cycle's (top-``r`` singular subspaces)
run              ``seed``                              the run's seed (one row per run, ``step`` 0), so
                                                       seed replicates can be paired
act              ``svcca_prev``, ``pwcca_prev``,       SVCCA / PWCCA (:mod:`dynamics.similarity`) of the probe
                 ``svcca_final``, ``pwcca_final``      activations against the previous / final capture of the
                                                       run (PWCCA weighted by this step's view); only where
                                                       tokens >= ``cca_min_tokens_per_feature`` × features
                                                       (:func:`similarity_rows`)
================ ===================================== =========================================================

Heavy tails and Marchenko–Pastur apply to whole matrices (not per-head
circuits). Intruders and cycle overlaps apply to the matrices a run trains
through adapters: for a ReLoRA run, the projections its stored config wraps
(``relora.targets``, rank ``relora.rank``: :attr:`dynamics.io.Run.wrapped`);
for a full-rank run, every projection (q, k, v, o, gate, up, down), so either
method's rows compare with the other's. Cross-run rows are in :mod:`dynamics.cross_run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from dynamics.spectra import Spectrum
from dynamics.validation import DynamicsError
from trainer.names import ATTN_PROJS, MLP_PROJS
from trainer.run_format import Wrapped

__all__ = ["spectrum_extra", "is_projection", "analysed_for_subspaces", "subspace_rows", "run_rows", "similarity_rows"]


class RowOptions(Protocol):
    """The settings of :class:`dynamics.analyze.AnalysisOptions` (a frozen dataclass) these rows read."""

    @property
    def kinds(self) -> tuple[str, ...]: ...
    @property
    def heavy_tails(self) -> bool: ...
    @property
    def spikes(self) -> bool: ...
    @property
    def subspaces(self) -> bool: ...
    @property
    def intruder_k(self) -> int: ...
    @property
    def intruder_threshold(self) -> float: ...


class RowSink(Protocol):
    """Where rows go: ``add(name, kind, {metric: value})`` (one unit's row accumulator in :mod:`dynamics.analyze`)."""

    def add(self, name: str, kind: str, metrics: Mapping[str, Any]) -> None: ...


class RunWeights(Protocol):
    """What the subspace rows read of a run: its method, what it wraps, and weights by step."""

    @property
    def method(self) -> str: ...
    @property
    def wrapped(self) -> Wrapped: ...
    def weights(self, step: int, names: str) -> dict[str, Any]: ...


def spectrum_extra(spec: Spectrum, opts: RowOptions) -> dict[str, float]:
    """Heavy-tail and Marchenko–Pastur metrics of one matrix's :class:`~dynamics.Spectrum` (no new SVD)."""
    from dynamics.heavy_tails import esd_power_law
    from dynamics.noise import signal_rank

    out: dict[str, float] = {}
    if opts.heavy_tails:
        out.update(esd_power_law(spec).metrics())
    if opts.spikes:
        out.update(signal_rank(spec).metrics())
    return out


def is_projection(name: str) -> bool:
    """``layers.{i}.attn.{q,k,v,o}`` or ``layers.{i}.mlp.{gate,up,down}`` (not circuits, norms or LoRA factors)."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "layers":
        return False
    return (parts[2] == "attn" and parts[3] in ATTN_PROJS) or (parts[2] == "mlp" and parts[3] in MLP_PROJS)


def analysed_for_subspaces(run: RunWeights, name: str) -> bool:
    """Whether matrix ``name`` gets intruder and cycle-overlap rows: wrapped (ReLoRA) or any projection (full rank)."""
    if run.method == "relora":
        return run.wrapped.wraps(name)
    return is_projection(name)


def subspace_rows(
    out: RowSink,
    run: RunWeights,
    step: int,
    name: str,
    w: np.ndarray,
    first: int,
    merge_prev: int | None,
    merge_prev2: int | None,
    opts: RowOptions,
) -> None:
    """Intruder count of ``w`` (``(out, in)``, float) vs ``W_first``, and the ReLoRA cycle-update overlap.

    ``merge_prev`` / ``merge_prev2`` are the checkpoints of the previous two merges
    (``None`` when there are none); the overlap compares the cycles ending at
    ``step`` and at ``merge_prev``, at the run's adapter rank.
    """
    from dynamics.subspaces import intruder_dimensions, update_overlap

    if not (opts.subspaces and analysed_for_subspaces(run, name)):
        return
    w0 = run.weights(first, name)[name]
    out.add(
        name, "weight", {"intruders": intruder_dimensions(w, w0, k=opts.intruder_k, threshold=opts.intruder_threshold)}
    )
    if merge_prev is None or merge_prev2 is None or "update_merge" not in opts.kinds:
        return
    rank = run.wrapped.rank
    if rank is None:  # only ReLoRA runs merge, and their rank is stated (Run.wrapped raises otherwise)
        return
    w_prev = run.weights(merge_prev, name)[name].astype(np.float64)
    w_prev2 = run.weights(merge_prev2, name)[name].astype(np.float64)
    try:
        overlap = update_overlap(w.astype(np.float64) - w_prev, w_prev - w_prev2, rank)
    except DynamicsError:
        return  # a zero cycle update has no subspace: no row
    out.add(name, "update_merge", overlap.metrics("overlap_prev"))


def run_rows(label: str, method: str, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``kind = "run"``, ``metric = "seed"`` row per run (``step`` 0, ``layer`` −1, ``component`` ``model``)."""
    return [
        {
            "run": label,
            "method": method,
            "step": 0,
            "tokens": None,
            "layer": -1,
            "component": "model",
            "kind": "run",
            "metric": "seed",
            "value": float(config.get("seed", 0)),
        }
    ]


def similarity_rows(
    x: np.ndarray, y: np.ndarray, *, min_tokens_per_feature: float, suffix: str = ""
) -> dict[str, float]:
    """``{"svcca" + suffix: …, "pwcca" + suffix: …}`` of activations ``x`` (n, p) and ``y`` (n, q), or ``{}``.

    SVCCA and PWCCA (:mod:`dynamics.similarity`; PWCCA weighted by ``x``) find
    correlations in any data unless the tokens far outnumber the features, so
    they give rows only where ``n >= min_tokens_per_feature · max(p, q)`` (and
    ``n > max(p, q)``); no row either when a view is constant over tokens. The
    library's warning for a low ratio is not repeated per row: a threshold
    below :data:`dynamics.similarity.MIN_TOKENS_PER_FEATURE` is the caller's choice.
    """
    import warnings

    from dynamics.similarity import cca_metrics
    from dynamics.validation import DynamicsWarning

    n, features = x.shape[0], max(x.shape[1], y.shape[1])
    if x.shape[0] != y.shape[0] or n <= features or n < min_tokens_per_feature * features:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DynamicsWarning)
            values = cca_metrics(x, y)
    except DynamicsError:
        return {}  # a constant view: undefined, no row
    return {f"{metric}{suffix}": value for metric, value in values.items()}
