"""dynamics: spectral metrics of weights, updates and activations.

Public API only; code lives in the submodules.  Every metric takes a numpy
array or torch tensor, a single matrix ``(m, n)`` or a batch ``(..., m, n)``
(or an already computed :class:`Spectrum`), and returns a Python float for one
matrix or a numpy array of the batch shape.  Natural logarithms throughout.
"""

from __future__ import annotations

from typing import Any

from .activations import (
    activation_effective_rank,
    activation_spectrum,
    anisotropy,
    debiased_linear_cka,
    linear_cka,
)
from .components import (
    attention_views,
    kv_head_index,
    layer_views,
    mlp_views,
    ov_circuit,
    ov_circuit_spectra,
    qk_circuit,
    qk_circuit_spectra,
    split_heads,
)
from .heavy_tails import PowerLawFit, esd_power_law, fit_power_law
from .io import DynamicsIOError, Run, SchemaVersionError, open_run
from .metrics import (
    condition_number,
    effective_rank,
    numerical_rank,
    participation_ratio,
    proportional_effective_rank,
    spectral_entropy,
    spectrum_metrics,
    stable_rank,
    tail_energy,
    top_k_energy,
    truncated_condition_number,
)
from .noise import SignalRank, mp_edge, signal_rank
from .similarity import pwcca, svcca
from .sparsity import gini, hoyer_sparsity, induced_inf_norm
from .spectra import Spectrum, product_spectrum, singular_values, spectrum
from .subspaces import (
    UpdateOverlap,
    chance_overlap,
    intruder_dimensions,
    principal_angles,
    subspace_overlap,
    top_singular_vectors,
    update_overlap,
)
from .updates import (
    cumulative_updates,
    lora_update,
    lora_update_spectrum,
    merge_updates,
    restart_updates,
    update_spectrum,
    weight_update,
    weight_updates,
)
from .validation import (
    DynamicsError,
    DynamicsWarning,
    EmptyMatrixError,
    NonFiniteError,
    ShapeError,
)

# pandas/matplotlib-backed parts load on first use, so `import dynamics` stays light.
_LAZY = {
    "analyze_runs": ("dynamics.analyze", "analyze_runs"),
    "read_results": ("dynamics.analyze", "read_results"),
    "AnalysisError": ("dynamics.analyze", "AnalysisError"),
    "seed_summary": ("dynamics.seeds", "seed_summary"),
    "paired_test": ("dynamics.seeds", "paired_test"),
    "plots": ("dynamics.plots", None),
}


def __getattr__(name: str) -> Any:
    """The lazily loaded public names of :data:`_LAZY`, imported on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    # errors and warnings (every error subclasses DynamicsError(ValueError))
    "DynamicsError",
    "ShapeError",
    "EmptyMatrixError",
    "NonFiniteError",
    "DynamicsWarning",
    # spectra: one singular-value computation, stored and reused
    "Spectrum",
    "spectrum",
    "singular_values",
    "product_spectrum",
    # metrics: matrix or Spectrum -> float / batch array
    "effective_rank",
    "proportional_effective_rank",
    "stable_rank",
    "numerical_rank",
    "condition_number",
    "truncated_condition_number",
    "spectral_entropy",
    "participation_ratio",
    "top_k_energy",
    "tail_energy",
    "spectrum_metrics",
    # entries of a matrix: sparsity and the induced ∞-norm (Frobenius/nuclear/spectral norms are Spectrum metrics)
    "gini",
    "hoyer_sparsity",
    "induced_inf_norm",
    # update matrices: W_t - W_{t-lag}, per merge (restart_updates: its former name), cumulative, LoRA s*B*A
    "weight_update",
    "weight_updates",
    "merge_updates",
    "restart_updates",
    "cumulative_updates",
    "update_spectrum",
    "lora_update",
    "lora_update_spectrum",
    # components: per-head OV/QK circuits (GQA), SwiGLU, whole-layer views
    "kv_head_index",
    "split_heads",
    "ov_circuit",
    "qk_circuit",
    "ov_circuit_spectra",
    "qk_circuit_spectra",
    "attention_views",
    "mlp_views",
    "layer_views",
    # activations: (tokens, features) matrices
    "activation_spectrum",
    "activation_effective_rank",
    "anisotropy",
    "linear_cka",
    "debiased_linear_cka",
    "svcca",
    "pwcca",
    # heavy tails, spikes above noise, update subspaces (issue 9)
    "PowerLawFit",
    "fit_power_law",
    "esd_power_law",
    "SignalRank",
    "mp_edge",
    "signal_rank",
    "principal_angles",
    "subspace_overlap",
    "chance_overlap",
    "top_singular_vectors",
    "UpdateOverlap",
    "update_overlap",
    "intruder_dimensions",
    # run directories (lazy, read-only): checkpoints, captured dynamics, logs
    "open_run",
    "Run",
    "DynamicsIOError",
    "SchemaVersionError",
    # tidy results table and figures (load pandas / matplotlib on first use)
    "analyze_runs",
    "read_results",
    "AnalysisError",
    "seed_summary",
    "paired_test",
    "plots",
]
