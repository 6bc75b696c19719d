"""The public API in `dynamics.__all__` resolves, and importing it stays light."""

import subprocess
import sys

import dynamics


def test_every_name_in_all_resolves():
    missing = [name for name in dynamics.__all__ if getattr(dynamics, name, None) is None]
    assert missing == []
    assert len(set(dynamics.__all__)) == len(dynamics.__all__)


#: the public names; a change here is an API change (issue 16 added merge_updates, the new name of restart_updates;
#: issue 18 added gini, hoyer_sparsity, induced_inf_norm, svcca, pwcca).
PUBLIC = {
    "AnalysisError",
    "DynamicsError",
    "DynamicsIOError",
    "DynamicsWarning",
    "EmptyMatrixError",
    "NonFiniteError",
    "PowerLawFit",
    "Run",
    "SchemaVersionError",
    "ShapeError",
    "SignalRank",
    "Spectrum",
    "UpdateOverlap",
    "activation_effective_rank",
    "activation_spectrum",
    "analyze_runs",
    "anisotropy",
    "attention_views",
    "chance_overlap",
    "condition_number",
    "cumulative_updates",
    "debiased_linear_cka",
    "effective_rank",
    "esd_power_law",
    "fit_power_law",
    "gini",
    "hoyer_sparsity",
    "induced_inf_norm",
    "intruder_dimensions",
    "kv_head_index",
    "layer_views",
    "linear_cka",
    "lora_update",
    "lora_update_spectrum",
    "merge_updates",
    "mlp_views",
    "mp_edge",
    "numerical_rank",
    "open_run",
    "ov_circuit",
    "ov_circuit_spectra",
    "paired_test",
    "participation_ratio",
    "plots",
    "principal_angles",
    "product_spectrum",
    "proportional_effective_rank",
    "pwcca",
    "qk_circuit",
    "qk_circuit_spectra",
    "read_results",
    "restart_updates",
    "seed_summary",
    "signal_rank",
    "singular_values",
    "spectral_entropy",
    "spectrum",
    "spectrum_metrics",
    "split_heads",
    "stable_rank",
    "subspace_overlap",
    "svcca",
    "tail_energy",
    "top_k_energy",
    "top_singular_vectors",
    "truncated_condition_number",
    "update_overlap",
    "update_spectrum",
    "weight_update",
    "weight_updates",
}


def test_the_public_names_stay_the_same():
    assert set(dynamics.__all__) == PUBLIC


def test_restart_updates_is_the_former_name_of_merge_updates():
    assert dynamics.restart_updates is dynamics.merge_updates


def test_spectra_keeps_its_gram_constants():
    from dynamics import spectra

    assert (spectra.GRAM_MIN_ASPECT, spectra.GRAM_MIN_SIGMA_RATIO, spectra.GRAM_SIGMA_RANGE) == (
        2.0,
        1e-4,
        (1e-75, 1e75),
    )


def test_run_reader_and_results_table_are_public():
    from dynamics.analyze import read_results
    from dynamics.io import open_run

    assert dynamics.open_run is open_run
    assert dynamics.read_results is read_results
    assert dynamics.plots.__name__ == "dynamics.plots"


def test_import_does_not_load_plotting_or_pandas():
    code = "import sys, dynamics; print('matplotlib' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_attribute_is_an_attribute_error():
    try:
        dynamics.no_such_metric  # noqa: B018
    except AttributeError as e:
        assert "no_such_metric" in str(e)
    else:
        raise AssertionError("expected AttributeError")
