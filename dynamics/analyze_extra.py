"""The analyses beyond spectral metrics, as rows of the tidy table (called by :mod:`dynamics.analyze`).

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
update_restart   ``overlap_prev`` (+ ``_out``,         ReLoRA: subspace overlap of this cycle's update with the
                 ``_in``, ``_chance``)                 previous cycle's (top-``r`` singular subspaces)
run              ``seed``                              the run's seed (one row per run, ``step`` 0), so
                                                       seed replicates can be paired
================ ===================================== =========================================================

Heavy tails and Marchenko–Pastur apply to whole matrices (not per-head
circuits); intruders and cycle overlaps to the wrapped projections (q, k, v, o,
gate, up, down). Cross-run rows are in :mod:`dynamics.cross_run`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynamics.validation import DynamicsError

WRAPPED_LEAVES = ("q", "k", "v", "o", "gate", "up", "down")


def spectrum_extra(spec, opts) -> dict[str, float]:
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
    """``layers.{i}.attn.q`` … ``layers.{i}.mlp.down`` (not circuits, norms or LoRA factors)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "layers" and parts[3] in WRAPPED_LEAVES


def relora_rank(config: dict[str, Any], default: int = 8) -> int:
    """The ReLoRA rank ``r`` of a run's config (``default`` for full-rank runs)."""
    return int((config.get("relora") or {}).get("rank", default)) if config.get("method") == "relora" else default


def subspace_rows(out, run, step: int, name: str, w: np.ndarray, first: int, restart_prev: int | None,
                  restart_prev2: int | None, opts) -> None:
    """Intruder count of ``w`` vs ``W_first``, and the ReLoRA cycle-update overlap, for one projection."""
    from dynamics.subspaces import intruder_dimensions, update_overlap

    if not (opts.subspaces and is_projection(name)):
        return
    w0 = run.weights(first, name)[name]
    out.add(name, "weight", {"intruders": intruder_dimensions(w, w0, k=opts.intruder_k,
                                                               threshold=opts.intruder_threshold)})
    if restart_prev is None or restart_prev2 is None or "update_restart" not in opts.kinds:
        return
    w_prev = run.weights(restart_prev, name)[name].astype(np.float64)
    w_prev2 = run.weights(restart_prev2, name)[name].astype(np.float64)
    try:
        overlap = update_overlap(w.astype(np.float64) - w_prev, w_prev - w_prev2, relora_rank(run.config))
    except DynamicsError:
        return  # a zero cycle update has no subspace: no row
    out.add(name, "update_restart", overlap.metrics("overlap_prev"))


def run_rows(label: str, method: str, config: dict[str, Any]) -> list[dict]:
    """One ``kind = "run"``, ``metric = "seed"`` row per run (``step`` 0, ``layer`` −1, ``component`` ``model``)."""
    return [{"run": label, "method": method, "step": 0, "tokens": None, "layer": -1, "component": "model",
             "kind": "run", "metric": "seed", "value": float(config.get("seed", 0))}]
