"""``dynamics analyze --device``: the torch device path gives the reference rows (on the session's trained pair).

Tolerances (see :func:`dynamics.analyze.resolve_device`): ``device="cpu"`` runs the same float64 routes on the
same numbers as the default numpy path, so every value agrees to ``rtol=1e-9`` (in practice bit for bit). On CUDA
the direct SVD replaces the CPU's Gram route for rectangular matrices, whose error on ``s_i`` is about
``eps64 · (s_1/s_i)²`` (≤ ~1e-8 where it is used), so values agree to ``rtol=1e-6``; the smallest singular value
and condition number of a numerically rank-deficient matrix (condition number > 1e6: a ReLoRA update, centred
activations) are rounding noise on any device, so there both devices must only agree that it is ill-conditioned.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import dynamics
import dynamics.analyze as analyze_mod
from dynamics.analyze import AnalysisError, AnalysisOptions, analyze_runs, analyze_unit, resolve_device
from dynamics.cli import main

KEY = ["run", "method", "step", "tokens", "layer", "component", "kind", "metric"]
MATRIX = ["run", "step", "layer", "component", "kind"]
NOISE_METRICS = {"sigma_min", "condition_number", "log10_condition_number"}
CUDA = torch.cuda.is_available()


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(KEY, kind="stable").reset_index(drop=True)


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both tables sorted, asserting the same row keys in the same order (identical structure)."""
    a, b = _sorted(a), _sorted(b)
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a[KEY], b[KEY])
    return a, b


def test_cpu_device_path_gives_the_reference_rows(trained_pair, analysed_pair, tmp_path, monkeypatch):
    reference, ref_out = analysed_pair
    seen: list[tuple[str, str, torch.dtype | None]] = []
    real = dynamics.spectrum

    def spy(M, **kw):  # the device path hands float64 tensors on the device to the maths core
        seen.append(
            (type(M).__name__, str(M.device), M.dtype) if isinstance(M, torch.Tensor) else (type(M).__name__, "", None)
        )
        return real(M, **kw)

    monkeypatch.setattr(dynamics, "spectrum", spy)
    out = tmp_path / "device_cpu.parquet"
    table, errors = analyze_runs(list(trained_pair), out, options=AnalysisOptions(device="cpu"), progress=False)
    assert errors == []
    assert seen and all(s == ("Tensor", "cpu", torch.float64) for s in seen), set(seen)
    ref, got = _same_rows(reference, table)
    np.testing.assert_allclose(got["value"].to_numpy(), ref["value"].to_numpy(), rtol=1e-9, atol=0)
    # the raw spectra too (same matrices, same shapes, same values)
    spec_key = ["run", "step", "layer", "component", "kind"]
    rs = pd.read_parquet(ref_out.with_name("results.spectra.parquet")).sort_values(spec_key).reset_index(drop=True)
    gs = pd.read_parquet(out.with_name("device_cpu.spectra.parquet")).sort_values(spec_key).reset_index(drop=True)
    pd.testing.assert_frame_equal(rs[spec_key], gs[spec_key])
    for a, b in zip(rs["values"], gs["values"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=0)


def test_cache_is_shared_between_devices(trained_pair, tmp_path, monkeypatch):
    assert AnalysisOptions(device="cpu").key() == AnalysisOptions().key() == AnalysisOptions(device="auto").key()
    out = tmp_path / "r.parquet"
    opts = AnalysisOptions.basic(kinds=("weight",), circuits=False)
    first, _ = analyze_runs([trained_pair.full], out, options=opts, progress=False)

    def recomputed(*a, **k):
        raise AssertionError("a cached unit was recomputed on another device")

    monkeypatch.setattr(analyze_mod, "analyze_unit", recomputed)
    again, _ = analyze_runs(
        [trained_pair.full],
        out,
        options=AnalysisOptions.basic(kinds=("weight",), circuits=False, device="cpu"),
        progress=False,
    )
    pd.testing.assert_frame_equal(_sorted(first), _sorted(again))


def test_unknown_device_is_refused():
    with pytest.raises(AnalysisError, match="cpu, cuda, auto"):
        AnalysisOptions(device="tpu")
    with pytest.raises(SystemExit):  # argparse: exit 2 with the choices
        main(["analyze", "x", "--device", "tpu"])


def test_auto_resolves_to_what_torch_sees():
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    assert resolve_device(None) is None and resolve_device("cpu") == "cpu"


@pytest.mark.skipif(CUDA, reason="checks the error raised without a CUDA device")
def test_cuda_without_a_device_is_one_clear_error(trained_pair, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    with pytest.raises(AnalysisError, match="sees no CUDA device"):
        analyze_runs([trained_pair.full], out, options=AnalysisOptions(device="cuda"), progress=False)
    assert not out.exists()
    with pytest.raises(AnalysisError, match="sees no CUDA device"):  # the Python API's unit, too
        analyze_unit(str(trained_pair.full), 0, AnalysisOptions(device="cuda"))
    assert main(["analyze", str(trained_pair.full), "--out", str(out), "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: analyze: --device cuda") and "Traceback" not in err[0]
    assert not out.exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_gives_the_cpu_rows(trained_pair, analysed_pair, tmp_path):
    reference, _ = analysed_pair
    table, errors = analyze_runs(
        list(trained_pair), tmp_path / "cuda.parquet", options=AnalysisOptions(device="cuda"), progress=False
    )
    assert errors == []
    ref, got = _same_rows(reference, table)
    cond = ref[ref["metric"] == "log10_condition_number"].set_index(MATRIX)["value"]
    ill = set(cond[cond > 6].index)  # numerically rank-deficient: sigma_min is rounding noise
    noise = np.array([m in NOISE_METRICS and k in ill for m, k in zip(ref["metric"], ref[MATRIX].itertuples(False))])
    np.testing.assert_allclose(got["value"][~noise].to_numpy(), ref["value"][~noise].to_numpy(), rtol=1e-6, atol=1e-12)
    got_cond = got[got["metric"] == "log10_condition_number"].set_index(MATRIX)["value"]
    assert all(got_cond[k] > 6 for k in ill)
