"""The optimised analysis unit (issue 19) gives the rows of a straightforward one-matrix-at-a-time computation.

``analyze_unit`` reads each checkpoint once, batches same-shaped matrices through one ``torch.linalg`` call,
takes intruder vectors from a Gram eigendecomposition, sorts entries in place, caches CCA bases and file
checks. Each test here compares against the plain public functions called one matrix at a time (or against
the unbatched path), so a change in any optimisation that moves a number fails.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dynamics._kernels as kern
import dynamics.analyze as an
from dynamics import activation_spectrum, anisotropy, linear_cka, spectrum
from dynamics.analyze import AnalysisOptions, analyze_unit, update_tolerance
from dynamics.io import DynamicsIOError, open_run
from dynamics.similarity import cca_metrics, pwcca, svcca
from dynamics.sparsity import ENTRY_METRICS, entry_metrics
from dynamics.subspaces import intruder_counts, intruder_dimensions, update_overlap, update_overlaps

RTOL = 1e-12  # batched LAPACK/BLAS calls and batched numpy reductions differ from one-at-a-time in the last bits
#: Metrics of the smallest singular value: on the Gram route (rectangular, condition number κ <= 1e4) ``s_k`` carries a
#: relative error of about ``eps · κ²`` (dynamics.spectra), so a batched Gram product (another BLAS blocking with
#: several threads) may move them by that much; with one thread the two agree bit for bit.
SIGMA_MIN_METRICS = {
    "sigma_min",
    "condition_number",
    "log10_condition_number",
    "truncated_condition_number",
    "log10_truncated_condition_number",
}
#: A condition number above this is rounding noise (a rank-deficient matrix: centred activations with fewer tokens
#: than features): its smallest singular value moves by orders of magnitude with the torch thread count (README),
#: so for such a matrix these metrics are compared only as being noise too.
NOISE_KAPPA = 1e12
NOISE_METRICS = {"sigma_min", "condition_number", "log10_condition_number"}


def _table(run: str, step: int, opts: AnalysisOptions | None = None) -> pd.DataFrame:
    rows, _ = analyze_unit(run, step, opts or AnalysisOptions())
    return pd.DataFrame(rows)


def _lookup(table: pd.DataFrame) -> dict[tuple[int, str, str, str], float]:
    return {(r.layer, r.component, r.kind, r.metric): r.value for r in table.itertuples(index=False)}


def _split(name: str) -> tuple[int, str]:
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return int(layer), rest
    return -1, name


def _same(got: float, value: float, rel: float) -> bool:
    if math.isnan(value) or math.isinf(value):
        return got == value or (math.isnan(value) and math.isnan(got))
    return got == pytest.approx(value, rel=rel, abs=1e-300)


def _check(got: dict, name: str, kind: str, expected: dict, direct: dict | None = None) -> int:
    """Each metric of ``expected`` (one matrix alone, method 'auto') is in ``got``, equal to rounding; or, where
    ``direct`` (the same matrix on the direct route) is given, equal to that: a batch whose first matrix the Gram
    route refuses goes direct as a whole (dynamics.spectra), so a matrix may take the other route than alone."""
    layer, component = _split(name)
    kappa = float(expected.get("condition_number", 1.0))
    for metric, value in expected.items():
        rel = min(1e-6, max(RTOL, 16 * np.finfo(np.float64).eps * kappa**2)) if metric in SIGMA_MIN_METRICS else RTOL
        key = (layer, component, kind, metric)
        assert key in got, f"missing row {key}"
        if metric in NOISE_METRICS and kappa > NOISE_KAPPA:
            assert got[(layer, component, kind, "condition_number")] > NOISE_KAPPA / 1e3, key
            continue
        others = [float(value)] + ([float(direct[metric])] if direct is not None else [])
        assert any(_same(got[key], v, rel) for v in others), (key, got[key], others)
    return len(expected)


def test_weight_update_sparsity_and_subspace_rows_match_one_matrix_at_a_time(trained_pair):
    """ReLoRA run at step 8 (a merge: cycle updates 8−4 and 4−0): every dense matrix's spectrum, entry sparsity,
    the three updates with their rank tolerance, intruders against step 0 and the cycle overlap."""
    path = str(trained_pair.relora)
    got = _lookup(_table(path, 8))
    run = open_run(path)
    names = [n for n in run.names("weight", 8) if not n.endswith(("norm", ".lora_a", ".lora_b"))]
    rank = run.wrapped.rank
    checked = 0
    for name in names:
        w = run.weights(8, name)[name]
        if w.ndim != 2:
            continue
        checked += _check(got, name, "weight", spectrum(w).metrics(), spectrum(w, method="direct").metrics())
        checked += _check(got, name, "weight", entry_metrics(w))
        for kind, other in (("update", 4), ("update_cumulative", 0), ("update_merge", 4)):
            old = run.weights(other, name)[name]
            delta = w.astype(np.float64) - old.astype(np.float64)
            tol = update_tolerance(w, old)
            expected = spectrum(delta).metrics(tol=tol)
            checked += _check(got, name, kind, expected, spectrum(delta, method="direct").metrics(tol=tol))
            checked += _check(got, name, kind, entry_metrics(delta))
        if run.wrapped.wraps(name):
            w0, w4 = run.weights(0, name)[name], run.weights(4, name)[name]
            layer, component = _split(name)
            assert got[(layer, component, "weight", "intruders")] == intruder_dimensions(w, w0, k=10, threshold=0.5)
            overlap = update_overlap(w.astype(np.float64) - w4, w4.astype(np.float64) - w0, rank)
            checked += _check(got, name, "update_merge", overlap.metrics("overlap_prev")) + 1
    assert checked > 1000


def test_capture_rows_match_one_matrix_at_a_time(trained_pair):
    """Full-rank run at step 4 (previous capture 0, final 8): gradient spectra and sparsity, activation spectra,
    anisotropy and CKA against the previous and the final capture."""
    path = str(trained_pair.full)
    got = _lookup(_table(path, 4))
    run = open_run(path)
    checked = 0
    for name, g in run.get("grad", 4).items():
        entries = entry_metrics(g)
        direct = {**spectrum(g, method="direct").metrics(), **entries}
        checked += _check(got, name, "grad", {**spectrum(g).metrics(), **entries}, direct)
    for site in an.DEFAULT_ACT_SITES:
        kind, _, pattern = site.partition(":")
        for name, x in run.get(kind, 4, pattern).items():
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            label = name if kind == "act" else f"{name}.in"
            expected = {**activation_spectrum(x, center=True).metrics(), "anisotropy": anisotropy(x)}
            for metric, other in (("cka_prev", 0), ("cka_final", 8)):
                y = run.get(kind, other, name)[name]
                expected[metric] = linear_cka(x, y.reshape(-1, y.shape[-1]).astype(np.float64))
            direct = {**expected, **activation_spectrum(x, center=True, method="direct").metrics()}
            checked += _check(got, label, "act", expected, direct)
    assert checked > 500


def test_batched_unit_equals_the_unbatched_unit_row_for_row(trained_pair, monkeypatch):
    """Every row of a unit (heavy tails, circuits, LoRA spectra included), in the same order, with every matrix in a
    batch of its own (BATCH_MAX_ENTRIES = 0) and with same-shaped matrices batched."""
    path = str(trained_pair.relora)
    batched, spectra_b = analyze_unit(path, 8, AnalysisOptions())
    monkeypatch.setattr(an, "BATCH_MAX_ENTRIES", 0)
    single, spectra_s = analyze_unit(path, 8, AnalysisOptions())
    # a batch whose first matrix the Gram route refuses goes direct as a whole, so a batched matrix may have taken
    # the direct route where alone it took the Gram one: its values are then those of the direct route alone
    monkeypatch.setattr(kern, "GRAM_MIN_ASPECT", math.inf)
    direct, spectra_d = analyze_unit(path, 8, AnalysisOptions())
    assert len(batched) == len(single) == len(direct) > 1000
    kappa = {(r["layer"], r["component"], r["kind"]): r["value"] for r in single if r["metric"] == "condition_number"}
    for b, s, d in zip(batched, single, direct):
        assert {k: v for k, v in b.items() if k != "value"} == {k: v for k, v in s.items() if k != "value"}
        k = kappa.get((s["layer"], s["component"], s["kind"]), 1.0)
        rel = min(1e-6, max(RTOL, 16 * np.finfo(np.float64).eps * k**2)) if s["metric"] in SIGMA_MIN_METRICS else RTOL
        assert any(b["value"] == pytest.approx(x["value"], rel=rel, nan_ok=True) for x in (s, d)), (b, s, d)
    assert [(x["component"], x["kind"]) for x in spectra_b] == [(x["component"], x["kind"]) for x in spectra_s]
    for b, s, d in zip(spectra_b, spectra_s, spectra_d):
        close = [np.allclose(b["values"], x["values"], rtol=RTOL, atol=1e-14 * max(s["values"])) for x in (s, d)]
        assert any(close), (b["component"], b["kind"])


def test_entry_metrics_sort_in_place_keeps_the_inf_norm():
    """The Gini sort reorders |M| in place: the induced ∞-norm (row sums) must be taken before it."""
    m = torch.randn(3, 40, 30, dtype=torch.float64) * torch.linspace(0.1, 5, 30, dtype=torch.float64)
    out = entry_metrics(m)
    np.testing.assert_allclose(out["induced_inf_norm"], torch.linalg.matrix_norm(m, ord=math.inf).numpy(), rtol=1e-13)
    for i in range(3):
        single = entry_metrics(m[i].numpy().astype(np.float32))
        assert set(single) == set(ENTRY_METRICS)
        assert single["gini"] == pytest.approx(out["gini"][i], rel=1e-6)  # float32 copy vs float64


def test_intruder_counts_and_update_overlaps_match_the_single_functions():
    rng = np.random.default_rng(3)
    for shape in ((40, 12), (12, 40), (20, 20)):
        w0 = rng.standard_normal((4, *shape))
        w = w0 + rng.standard_normal((4, *shape)) * np.array([0.0, 0.3, 1.0, 3.0])[:, None, None]
        counts = intruder_counts(w, w0, k=5, threshold=0.5)
        assert counts == [intruder_dimensions(w[i], w0[i], k=5, threshold=0.5) for i in range(4)]
        assert counts[0] == 0 and max(counts) > 0
        d2 = rng.standard_normal((4, *shape))
        d2[2] = 0.0  # a zero update: no overlap (the single function raises)
        got = update_overlaps(w - w0 + 1e-3, d2, 3)
        assert got[2] is None
        for i in (0, 1, 3):
            ref = update_overlap(w[i] - w0[i] + 1e-3, d2[i], 3)
            assert got[i] is not None
            assert got[i].metrics() == pytest.approx(ref.metrics(), rel=1e-12)


def test_update_overlaps_take_the_gram_route_and_agree_with_the_thin_svd(monkeypatch):
    import dynamics.subspaces as sub

    rng = np.random.default_rng(5)
    for shape in ((60, 16), (16, 60), (24, 24)):
        d1, d2 = rng.standard_normal((2, 3, *shape))
        d2[1] = d1[1] + 1e-3 * rng.standard_normal(shape)  # nearly the same update: overlap near 1
        d2[2] = d1[2]  # the same update: overlap 1
        svd_route = [
            sub._overlap_from_svds(sub._svd(d1[i]), sub._svd(d2[i]), 4, shape).metrics()  # type: ignore[union-attr]
            for i in range(3)
        ]
        with monkeypatch.context() as m:
            m.setattr(sub, "_svd_batch", lambda *a: pytest.fail("well-conditioned updates took the thin SVD"))
            got = update_overlaps(d1, d2, 4)
        for g, ref in zip(got, svd_route):
            assert g is not None and g.k == 4
            assert g.metrics() == pytest.approx(ref, rel=0, abs=1e-10)
        assert got[2].mean == pytest.approx(1.0, abs=1e-12) and got[2].mean <= 1 + 1e-12  # type: ignore[union-attr]


def test_update_overlaps_fall_back_to_the_svd_for_ill_conditioned_updates():
    rng = np.random.default_rng(6)
    d1 = rng.standard_normal((3, 50, 2)) @ rng.standard_normal((3, 2, 20))  # rank 2 < k = 4: no Gram route
    d1[1] = rng.standard_normal((50, 20))  # a well-conditioned one in the same batch keeps the Gram route
    d2 = rng.standard_normal((3, 50, 20))
    got = update_overlaps(d1, d2, 4)
    assert [g.k for g in got] == [2, 4, 2]  # type: ignore[union-attr]
    for i in range(3):
        ref = update_overlap(d1[i], d2[i], 4)
        assert got[i].metrics() == pytest.approx(ref.metrics(), rel=1e-12)  # type: ignore[union-attr]


def test_spectrum_from_a_shared_gram_eigendecomposition_is_the_auto_spectrum():
    from dynamics._kernels import gram_eigh
    from dynamics.spectra import spectrum_from_gram

    rng = np.random.default_rng(8)
    for shape in ((60, 20), (20, 60)):
        x = rng.standard_normal((3, *shape))
        x[1] = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))  # rank 3: refused, direct
        t = torch.from_numpy(x)
        got = spectrum_from_gram(x, gram_eigh(t))
        assert got.method == "gram+direct"
        for i in range(3):
            alone = spectrum(x[i])
            np.testing.assert_allclose(got.values[i], alone.values, rtol=1e-12, atol=1e-12 * alone.values[0])
            assert got[i].metrics()["numerical_rank"] == alone.metrics()["numerical_rank"] == (3 if i == 1 else 20)


def test_a_unit_takes_weight_spectra_and_intruder_vectors_from_one_gram_eigendecomposition(trained_pair, monkeypatch):
    path = str(trained_pair.relora)
    shared = an._shared_gram
    used: list[tuple[int, ...]] = []

    def recording(stack):
        eig = shared(stack)
        if eig is not None:
            used.append(stack.shape)
        return eig

    monkeypatch.setattr(an, "_shared_gram", recording)
    rows, _ = analyze_unit(path, 8, AnalysisOptions())
    assert used  # the wrapped rectangular projections (the tiny pair's k, v, gate, up, down)
    monkeypatch.setattr(an, "_shared_gram", lambda stack: None)
    alone, _ = analyze_unit(path, 8, AnalysisOptions())
    assert len(rows) == len(alone)
    for a, b in zip(rows, alone):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        rel = 1e-9 if a["metric"] in SIGMA_MIN_METRICS or a["metric"].startswith("alpha") else 1e-12
        assert a["value"] == pytest.approx(b["value"], rel=rel, nan_ok=True), a


def test_intruder_references_named_by_the_caller_are_not_hashed(monkeypatch):
    import hashlib

    import dynamics.subspaces as sub

    rng = np.random.default_rng(10)
    w0 = rng.standard_normal((3, 40, 12))
    w = w0 + rng.standard_normal((3, 40, 12))
    expected = intruder_counts(w, w0, k=4)  # content-hashed keys
    sub._REFERENCE.clear()
    monkeypatch.setattr(hashlib, "sha1", lambda *a: pytest.fail("a named reference was hashed"))
    names = [("digest-of-step-0", f"layers.{i}.attn.q") for i in range(3)]
    assert intruder_counts(w, w0, k=4, reference_names=names) == expected
    assert intruder_counts(w, w0, k=4, reference_names=names) == expected  # from the cache
    sub._REFERENCE.clear()


def test_intruder_counts_fall_back_to_the_svd_for_ill_conditioned_matrices():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 30, 3)) @ rng.standard_normal((2, 3, 10))  # rank 3 < k = 5: the Gram route is refused
    w0 = rng.standard_normal((2, 30, 10))
    assert intruder_counts(w, w0, k=5) == [intruder_dimensions(w[i], w0[i], k=5) for i in range(2)]


def test_cca_bases_are_cached_by_content_and_bounded(monkeypatch):
    import dynamics.similarity as sim

    sim._BASES.clear()
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 6))
    first = cca_metrics(x, y)
    assert first == {"svcca": svcca(x, y), "pwcca": pwcca(x, y)}  # uncached functions, same numbers
    assert len(sim._BASES) == 2
    assert cca_metrics(x.copy(), y.copy()) == first  # equal content: served from the cache
    assert len(sim._BASES) == 2
    monkeypatch.setattr(sim, "BASIS_CACHE_BYTES", 1)
    cca_metrics(x, rng.standard_normal((400, 5)))
    assert len(sim._BASES) == 1  # over the budget: least recently used dropped
    sim._BASES.clear()


def test_a_file_damaged_after_a_passed_check_is_still_caught(trained_pair, tmp_path):
    """The per-process record of verified files is keyed by the files' identity: rewriting one makes it checked again."""
    run = tmp_path / "run"
    shutil.copytree(trained_pair.full, run)
    analyze_unit(str(run), 4, AnalysisOptions.basic())
    model = run / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(DynamicsIOError, match="sha256"):
        analyze_unit(str(run), 4, AnalysisOptions.basic())


def test_a_checkpoint_verified_with_its_capture_is_not_hashed_again_as_a_comparison(
    trained_pair, tmp_path, monkeypatch
):
    """A unit checks its own files with the capture file; the next unit compares against that checkpoint's weights
    only: the passed check covers them (no second sha256 of the model), and a file rewritten since is hashed."""
    import trainer.run_format as rf

    run = tmp_path / "run"
    shutil.copytree(trained_pair.full, run)
    hashed: list[str] = []
    problem = rf.file_problem
    monkeypatch.setattr(
        rf, "file_problem", lambda path, digest: hashed.append(Path(path).name) or problem(path, digest)
    )
    view = an._RunView(open_run(str(run)))
    view.verify(4, capture=True)
    assert "model.safetensors" in hashed
    hashed.clear()
    assert view.intact(4) and hashed == []
    model = run / "checkpoints" / "step_000004" / "model.safetensors"
    model.write_bytes(model.read_bytes())  # the same bytes, another file: checked again
    assert view.intact(4) and hashed == ["model.safetensors"]


def test_compression_table_measures_every_setting_on_real_captures(trained_pair):
    """``benchmarks/analyze_bench.py --compression``: write, size and read of the pair's capture files per setting."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "analyze_bench.py"
    spec = importlib.util.spec_from_file_location("analyze_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["analyze_bench"] = bench
    spec.loader.exec_module(bench)
    files = sorted((trained_pair.full / "dynamics").glob("step_*.h5"))[:1]
    table = {row["compression"]: row for row in bench.compression_table(files, 1)}
    assert list(table) == ["none", "lzf", "gzip 1", "gzip 4", "gzip 9"]
    for row in table.values():
        assert row["write_s"] > 0 and row["read_s"] > 0 and row["mib"] > 0
    assert table["gzip 9"]["mib"] <= table["gzip 1"]["mib"] < table["none"]["mib"]  # gzip shrinks the file
