"""The analysis' shortcuts (issue 19, round 2) give the numbers of the plain computation.

Each shortcut is compared with what it replaces: the float64 Frobenius norm without a float64 copy
(``frobenius64``), activations decoded once per process (``cached_activations``), one difference for update
kinds that coincide, batched cross-run overlaps, the cheap finiteness check, and the large-matrix thread count.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import dynamics.analyze as an
from dynamics import spectrum
from dynamics.analyze import AnalysisOptions, analyze_unit, frobenius64, update_tolerance
from dynamics.io import ACTIVATION_CACHE_BYTES, cached_activations, open_run
from dynamics.sparsity import entry_metrics
from dynamics.subspaces import update_overlap
from dynamics.validation import DynamicsError


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 5), (300, 700), (50304 // 8, 96)])
def test_frobenius64_is_the_norm_of_the_float64_copy(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    a = (rng.standard_normal(shape) * 0.02).astype(dtype)
    expected = float(np.linalg.norm(a.astype(np.float64)))
    assert frobenius64(a) == pytest.approx(expected, rel=1e-14, abs=0.0)


def test_frobenius64_of_extreme_and_non_finite_entries():
    big = np.full((1000, 1000), np.finfo(np.float32).max, dtype=np.float32)  # squares overflow float32, not float64
    assert frobenius64(big) == pytest.approx(1000 * float(np.finfo(np.float32).max), rel=1e-14)
    bad = np.ones((100, 1000), dtype=np.float32)
    bad[50, 7] = np.nan
    assert math.isnan(frobenius64(bad))
    bad[50, 7] = np.inf
    assert math.isinf(frobenius64(bad))


def test_update_tolerance_uses_the_float64_norms():
    rng = np.random.default_rng(0)
    w_new = rng.standard_normal((96, 384)).astype(np.float32)
    w_old = (w_new * 2).astype(np.float32)
    norm = float(np.linalg.norm(w_old.astype(np.float64)))
    assert update_tolerance(w_new, w_old) == pytest.approx(384 * np.finfo(np.float32).eps * norm, rel=1e-14)


def test_cached_activations_equal_a_fresh_read_are_read_only_and_follow_the_file(trained_pair, tmp_path):
    run_dir = tmp_path / "full"
    shutil.copytree(trained_pair.full, run_dir)
    run = open_run(run_dir)
    fresh = run.get("act", 4, "layers.*.resid_post")
    first = cached_activations(run, "act", 4, "layers.*.resid_post")
    assert list(first) == list(fresh)
    for name, a in first.items():
        np.testing.assert_array_equal(a, fresh[name])
        assert not a.flags.writeable
    again = cached_activations(open_run(run_dir), "act", 4, "layers.*.resid_post")
    assert all(again[n] is first[n] for n in first)  # decoded once
    # the file replaced on disk (a new inode): read again
    path = run.capture_path(4)
    copy = path.with_name("copy.h5")
    shutil.copy2(path, copy)
    os.replace(copy, path)
    replaced = cached_activations(open_run(run_dir), "act", 4, "layers.*.resid_post")
    assert all(replaced[n] is not first[n] for n in first)
    for name, a in replaced.items():
        np.testing.assert_array_equal(a, fresh[name])
    assert ACTIVATION_CACHE_BYTES > 0


def test_cached_activations_skip_a_damaged_file_each_time_and_refuse_other_kinds(trained_pair, tmp_path):
    run_dir = tmp_path / "full"
    shutil.copytree(trained_pair.full, run_dir)
    path = open_run(run_dir).capture_path(0)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    for _ in range(2):  # a failure is not remembered: warned each time
        with pytest.warns(Warning, match="skipping step 0"):
            assert cached_activations(open_run(run_dir), "act", 0, "layers.*.resid_post", errors="skip") == {}
    with pytest.raises(DynamicsError, match="kind must be 'act' or 'act_in'"):
        cached_activations(open_run(run_dir), "grad", 4, "layers.*.attn.q")


def test_coinciding_update_kinds_share_one_difference_with_the_plain_numbers(trained_pair):
    """Step 4 of the full-rank run: the previous checkpoint is the first, so ``update`` and ``update_cumulative``
    are one matrix, computed once; both kinds carry the numbers of ``spectrum(W4 − W0)`` and its entries."""
    path = str(trained_pair.full)
    rows, spectra = analyze_unit(path, 4, AnalysisOptions())
    run = open_run(path)
    got = {(r["layer"], r["component"], r["kind"], r["metric"]): r["value"] for r in rows}
    checked = 0
    for name in ("layers.0.attn.q", "layers.2.mlp.down", "embed"):
        w, w0 = run.weights(4, name)[name], run.weights(0, name)[name]
        delta = w.astype(np.float64) - w0.astype(np.float64)
        expected = {**spectrum(delta).metrics(tol=update_tolerance(w, w0)), **entry_metrics(delta)}
        layer, component = an._split(name)
        for kind in ("update", "update_cumulative"):
            for metric, value in expected.items():
                assert got[(layer, component, kind, metric)] == pytest.approx(float(value), rel=1e-12, nan_ok=True)
                checked += 1
    assert checked > 100
    kinds = {(s["component"], s["kind"]) for s in spectra}
    assert ("attn.q", "update") in kinds and ("attn.q", "update_cumulative") in kinds


def test_batched_cross_run_overlaps_equal_the_pairwise_ones(analysed_pair, trained_pair):
    table, _ = analysed_pair
    relora, full = open_run(trained_pair.relora), open_run(trained_pair.full)
    rows = table[(table["kind"] == "cross_run") & (table["step"] == 8)]
    got = {(r.layer, r.component, r.metric): r.value for r in rows.itertuples(index=False)}
    names = relora.wrapped.names(relora.n_layers)
    assert names
    for name in names:
        dr = relora.weights(8, name)[name].astype(np.float64) - relora.weights(0, name)[name].astype(np.float64)
        df = full.weights(8, name)[name].astype(np.float64) - full.weights(0, name)[name].astype(np.float64)
        expected = update_overlap(dr, df, relora.wrapped.rank).metrics("update_overlap")
        layer, component = an._split(name)
        for metric, value in expected.items():
            assert got[(layer, component, metric)] == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_finiteness_check_finds_bad_entries_and_accepts_huge_finite_ones(tmp_path):
    from safetensors.torch import save_file

    huge = torch.full((64, 64), 3.0e38)  # finite, but their float32 sum overflows: the entry-wise check decides
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.zeros(3, 3), "b.weight": huge}, str(good))
    assert an._nonfinite_tensor(str(good), "good") is None
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(50, 50)
        t[3, 4] = bad_value
        bad = tmp_path / f"bad{bad_value}.safetensors"
        save_file({"a.weight": torch.zeros(3, 3), "b.weight": t}, str(bad))
        assert an._nonfinite_tensor(str(bad), str(bad_value)) == "b.weight"


def test_large_matrices_get_the_large_thread_count_and_the_count_is_restored(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(an.LARGE_THREADS_ENV, str(before + 1))
    assert an.large_matrix_threads() == before + 1
    with an._threads_for(an.LARGE_MATRIX_ENTRIES):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with an._threads_for(an.LARGE_MATRIX_ENTRIES - 1):
        assert torch.get_num_threads() == before
    monkeypatch.setenv(an.LARGE_THREADS_ENV, "not a number")
    assert an.large_matrix_threads() == torch.get_num_threads()


def test_analyze_runs_sets_the_large_thread_count_from_the_cores_unless_the_user_did(monkeypatch):
    monkeypatch.delenv(an.LARGE_THREADS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with an._large_threads_env(workers=1):
        assert os.environ[an.LARGE_THREADS_ENV] == str(cores)
    assert an.LARGE_THREADS_ENV not in os.environ
    with an._large_threads_env(workers=4 * cores):
        assert os.environ[an.LARGE_THREADS_ENV] == "1"
    monkeypatch.setenv(an.LARGE_THREADS_ENV, "3")
    with an._large_threads_env(workers=1):
        assert os.environ[an.LARGE_THREADS_ENV] == "3"
    assert os.environ[an.LARGE_THREADS_ENV] == "3"


@pytest.mark.parametrize("shape", [(3, 384, 1536), (2, 96, 384), (5, 7), (384, 96), (4, 64, 64)])
def test_wide_matrices_go_through_their_transpose_with_the_same_values_and_vectors(shape):
    """``direct_svdvals`` and the subspace SVD pass a wide matrix transposed (LAPACK's faster tall route): the
    values are numpy's, and ``U S Vᵀ`` rebuilds the matrix with orthonormal ``U`` and ``V``."""
    from dynamics._kernels import direct_svdvals
    from dynamics.subspaces import _svd

    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    expected = np.linalg.svd(x, compute_uv=False)
    got = direct_svdvals(torch.from_numpy(x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13 * expected.max())
    if x.ndim == 2:
        u, s, vt = _svd(x)
        k = min(shape)
        assert u.shape == (shape[0], k) and vt.shape == (k, shape[1])
        np.testing.assert_allclose(s, expected, rtol=0, atol=1e-13 * expected.max())
        np.testing.assert_allclose((u * s) @ vt, x, rtol=0, atol=1e-12 * expected.max())
        np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-12)


def test_cached_activations_take_a_list_of_globs_like_run_get(trained_pair):
    run = open_run(trained_pair.full)
    globs = ["layers.0.resid_post", "layers.1.*"]
    got = cached_activations(run, "act", 8, globs)
    assert list(got) == list(run.get("act", 8, globs))
    assert cached_activations(run, "act", 8, globs)["layers.0.resid_post"] is got["layers.0.resid_post"]


@pytest.mark.parametrize("shape,k", [((3, 200, 40), 8), ((2, 40, 200), 8), ((2, 90, 60), 30), ((4, 50, 50), 5)])
def test_top_k_thin_svd_gives_numpys_values_and_the_leading_subspaces(shape, k):
    """With ``k`` the subspace SVD of a rectangular matrix forms only ``k`` long-side vectors (QR, SVD of R, the
    reflectors applied to ``k`` columns): the same values as numpy, orthonormal vectors that satisfy
    ``X v_i = s_i u_i``, spanning numpy's leading subspaces (well separated by construction)."""
    from dynamics.subspaces import _svd_batch

    rng = np.random.default_rng(k + sum(shape))
    m, n = shape[1:]
    r = min(m, n)
    q1 = np.linalg.qr(rng.standard_normal((shape[0], m, r)))[0]
    q2 = np.linalg.qr(rng.standard_normal((shape[0], n, r)))[0]
    x = (q1 * np.geomspace(1.0, 1e-3, r)) @ q2.transpose(0, 2, 1)  # distinct singular values 1 ... 1e-3
    for i, (u, s, vt) in enumerate(_svd_batch(x, k)):
        ref_u, ref_s, ref_vt = np.linalg.svd(x[i], full_matrices=False)
        np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-13)
        assert u.shape[1] >= k and vt.shape[0] >= k
        uk, vk = u[:, :k], vt[:k].T
        np.testing.assert_allclose(uk.T @ uk, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(vk.T @ vk, np.eye(k), atol=1e-12)
        np.testing.assert_allclose(x[i] @ vk, uk * s[:k], atol=1e-12)
        for ours, ref in ((uk, ref_u[:, :k]), (vk, ref_vt[:k].T)):  # same subspace: all principal cosines 1
            np.testing.assert_allclose(np.linalg.svd(ours.T @ ref, compute_uv=False), 1.0, atol=1e-12)
    if shape[1] != shape[2] and 2 * k <= min(shape[1:]):  # the short route really ran: k long-side vectors only
        u, _, vt = _svd_batch(x, k)[0]
        assert (u.shape[1] if shape[1] > shape[2] else vt.shape[0]) == k


def test_auto_route_of_a_batch_where_every_or_some_gram_results_are_refused(monkeypatch):
    """Tall matrices try the Gram route, a batch its first matrix first: when the Gram route refuses that one (too
    ill-conditioned), the whole batch is decomposed directly ('direct') without a Gram product of the others; a
    batch whose first matrix passes goes on member by member ('gram+direct' when some are refused). Values are
    numpy's either way."""
    import dynamics._kernels as kern

    rng = np.random.default_rng(7)
    low_rank = rng.standard_normal((3, 60, 4)) @ rng.standard_normal((3, 4, 20))  # rank 4 < 20: refused
    good = rng.standard_normal((2, 60, 20))
    grams: list[int] = []
    gram = kern._gram
    monkeypatch.setattr(kern, "_gram", lambda x: grams.append(x.shape[0]) or gram(x))
    cases = (
        (low_rank, "direct", [1]),
        (np.concatenate([low_rank[:1], good]), "direct", [1]),  # the first refused: the batch goes direct
        (np.concatenate([good[:1], low_rank[:2], good[1:]]), "gram+direct", [1, 3]),
        (good, "gram", [1, 1]),
    )
    for batch, route, products in cases:
        grams.clear()
        spec = spectrum(batch)
        assert spec.method == route and grams == products
        expected = np.linalg.svd(batch, compute_uv=False)
        np.testing.assert_allclose(spec.values, expected, rtol=0, atol=1e-12 * expected.max())
        for i in range(len(batch)):  # each matrix alone: the same values to rounding
            np.testing.assert_allclose(spectrum(batch[i]).values, spec.values[i], rtol=0, atol=1e-11 * expected.max())


@pytest.mark.parametrize("which,step", [("relora", 8), ("full", 4)])
def test_a_unit_on_a_thread_pool_gives_the_rows_of_one_part_after_another(trained_pair, monkeypatch, which, step):
    """With two cores a unit runs its weight components and its captures as tasks on two threads, one torch thread
    each; with one core one part after another, also with one torch thread: the same rows and spectra, in the
    same order, bit for bit (ReLoRA merge step: cycle overlaps and intruders; full-rank step 4: both captures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(getattr(trained_pair, which))
    opts = AnalysisOptions(keep_spectra=True)
    got = {}
    try:
        for cores in (1, 2):
            monkeypatch.setenv(an.LARGE_THREADS_ENV, str(cores))
            assert an.unit_threads(None) == cores
            got[cores] = analyze_unit(path, step, opts)
    finally:
        torch.set_num_threads(before)
    (rows1, spectra1), (rows2, spectra2) = got[1], got[2]
    assert len(rows1) > 500 and {r["kind"] for r in rows1} >= {"weight", "update", "grad", "act"}
    assert rows2 == rows1  # dict equality: keys, order of rows, every value (no NaN among them)
    assert spectra2 == spectra1


def test_a_pool_gets_the_vocabulary_matrices_as_one_task_first_and_the_layers_longest_first():
    """The embedding and LM head never run at once (one task, the costlier first); the layered components follow
    longest first, so the pool ends on short tasks; every component is in exactly one task."""
    d, ff, kv, vocab = 64, 256, 16, 1000
    shapes = {"embed": (vocab, d), "final_norm": (d,), "lm_head": (vocab + 24, d)}
    for i in range(2):
        shapes |= {f"layers.{i}.attn.q": (d, d), f"layers.{i}.attn.k": (kv, d), f"layers.{i}.mlp.up": (ff, d)}
        shapes |= {f"layers.{i}.mlp.down": (d, ff), f"layers.{i}.attn.norm": (d,)}
    components: dict[str, list[str]] = {}
    for name in shapes:
        if not name.endswith("norm"):
            components.setdefault(an._split(name)[1], []).append(name)
    tasks = an._pool_order(list(components.values()), shapes)
    assert tasks[0] == [["lm_head"], ["embed"]]
    layered = [task[0][0].split(".", 2)[2] for task in tasks[1:]]
    assert all(len(task) == 1 for task in tasks[1:])
    assert layered == ["mlp.up", "mlp.down", "attn.q", "attn.k"]  # m·n·min(m, n): 2x up/down (tie: model order)
    assert sorted(n for task in tasks for c in task for n in c) == sorted(n for c in components.values() for n in c)
    assert an._pool_order([["layers.0.attn.q"], ["layers.1.attn.q"]], {}) == [
        [["layers.0.attn.q"]],
        [["layers.1.attn.q"]],
    ]
    # an imported model whose per-layer names are not ours: only its vocabulary-sized matrices share a task
    gpt2 = {"transformer.wte": (vocab, d), "transformer.h.0.mlp.c_fc": (d, ff), "transformer.h.1.mlp.c_fc": (d, ff)}
    gpt2["lm_head"] = (vocab, d)
    tasks = an._pool_order([[n] for n in gpt2], gpt2)
    assert tasks == [
        [["transformer.wte"], ["lm_head"]],
        [["transformer.h.0.mlp.c_fc"]],
        [["transformer.h.1.mlp.c_fc"]],
    ]


def test_unit_pool_runs_tasks_on_threads_with_one_torch_thread_and_restores_it_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with an._unit_pool(1) as pool:
            assert pool is None and torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            with an._unit_pool(2) as pool:
                assert pool is not None
                seen = pool.submit(lambda: (threading.current_thread().name, torch.get_num_threads())).result()
                assert seen[0].startswith("dynamics-unit") and seen[1] == 1
                pool.submit(lambda: 1 / 0).result()  # a failing task's error reaches the unit
        assert torch.get_num_threads() == 2
        ran: list[int] = []
        with pytest.raises(RuntimeError, match="a part failed"):
            with an._unit_pool(2) as pool:
                hold = threading.Event()
                for _ in range(2):  # both threads busy until the pool gives up waiting on them
                    pool.submit(hold.wait, 2.0)
                for i in range(10):
                    pool.submit(ran.append, i)
                raise RuntimeError("a part failed")
        assert ran == []  # the waiting tasks of a failed unit are dropped, not run
        assert an.unit_threads("cuda") == 1
    finally:
        torch.set_num_threads(before)


def _numpy_blas_threads() -> int:
    from threadpoolctl import threadpool_info

    numbers = {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}
    assert len(numbers) == 1, numbers  # numpy's own BLAS is loaded (numpy is imported)
    return numbers.pop()


def test_a_unit_runs_numpy_blas_at_one_thread_and_restores_it_after_an_error():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # numpy's default here: one thread per core
        assert _numpy_blas_threads() == 2
        for threads in (1, 2):
            with pytest.raises(ZeroDivisionError):
                with an._unit_pool(threads) as pool:
                    assert _numpy_blas_threads() == 1
                    if pool is not None:
                        assert pool.submit(_numpy_blas_threads).result() == 1
                    raise ZeroDivisionError("a part failed")
            assert _numpy_blas_threads() == 2


def test_a_unit_runs_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails: numpy's BLAS is left as it is
    with an._unit_pool(2) as pool:
        assert pool is not None and pool.submit(lambda: 3).result() == 3


def test_cross_run_rows_on_a_thread_pool_equal_those_of_one_task_after_another(trained_pair):
    from dynamics.cross_run import cross_run_rows

    kw = dict(act_sites=an.DEFAULT_ACT_SITES, label="relora", cca_min_tokens_per_feature=0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a unit's tasks (another torch thread count moves the SVDs' last bits)
    try:
        alone = cross_run_rows(str(trained_pair.relora), str(trained_pair.full), 8, **kw)
        with an._unit_pool(2) as pool:
            pooled = cross_run_rows(str(trained_pair.relora), str(trained_pair.full), 8, pool=pool, **kw)
    finally:
        torch.set_num_threads(before)
    metrics = {r["metric"] for r in alone}
    assert {"update_overlap", "cka_debiased", "svcca"} <= metrics  # both tasks gave rows
    assert pooled == alone  # same rows, same order (the update overlaps first), same values


def test_bounded_lru_drops_the_least_recently_used_over_its_budget_and_keeps_the_newest():
    from dynamics._lru import BoundedLRU

    budget = {"units": 5}
    lru: BoundedLRU[int] = BoundedLRU(lambda: budget["units"], lambda v: v)
    lru.put("a", 2)
    lru.put("b", 2)
    assert lru.get("a") == 2  # now the most recently used
    lru.put("c", 2)  # 6 > 5: "b" (least recently used) goes
    assert lru.get("b") is None and lru.get("a") == 2 and lru.get("c") == 2 and len(lru) == 2
    budget["units"] = 1  # read at each put
    lru.put("d", 3)  # over any budget alone: kept, every other entry dropped
    assert len(lru) == 1 and lru.get("d") == 3
    lru.clear()
    assert len(lru) == 0 and lru.get("d") is None


def test_a_checkpoint_matrix_norm_is_summed_once_per_process_by_its_file_digest(trained_pair, monkeypatch):
    """Units compare a checkpoint with several others; each difference's tolerance needs both norms, remembered by
    the digest of the file the matrix was read from (another checkpoint: another digest, computed afresh)."""
    run = an._RunView(open_run(trained_pair.full))
    w4 = run.weights(4, ["layers.0.mlp.up"])["layers.0.mlp.up"]
    w8 = run.weights(8, ["layers.0.mlp.up"])["layers.0.mlp.up"]
    monkeypatch.setattr(an, "_NORMS", {})
    expected = frobenius64(w4)
    assert run.norm64(4, "layers.0.mlp.up", w4) == expected

    def summed_again(a):
        raise AssertionError("summed again")

    monkeypatch.setattr(an, "frobenius64", summed_again)
    again = an._RunView(open_run(trained_pair.full))  # another unit of the same process
    assert again.norm64(4, "layers.0.mlp.up", w4) == expected
    with pytest.raises(AssertionError, match="summed again"):
        again.norm64(8, "layers.0.mlp.up", w8)


@pytest.mark.parametrize("piece_values", [2**31 - 1, 12])
def test_spectra_tables_are_written_as_pandas_writes_them(tmp_path, monkeypatch, piece_values):
    """The list columns of a spectra table are built from flat arrays: the file reads back as the one pandas
    writes (same schema, same values), also with numpy arrays for lists, when empty, and when a column is split
    into pieces (arrow's int32 offsets: at most 2**31 - 1 values a piece; 12 here, so several pieces)."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(an, "_LIST_PIECE_VALUES", piece_values)

    rng = np.random.default_rng(9)
    rows = [
        {"run": "r", "method": "relora", "step": 2, "layer": i - 1, "component": "attn.q", "kind": "weight",
         "shape": [8, 5 + i % 2], "values": sorted(rng.random(5 + i % 2).tolist(), reverse=True)}
        for i in range(7)
    ]  # fmt: skip
    rows[2]["values"] = np.asarray(rows[2]["values"])  # either a list or an array per row
    frame = pd.DataFrame(rows, columns=an.SPECTRA_COLUMNS)
    an._write_parquet(frame, tmp_path / "ours.parquet")
    frame.assign(values=[list(map(float, v)) for v in frame["values"]]).to_parquet(
        tmp_path / "pandas.parquet", index=False, **an.PARQUET_WRITE
    )
    assert pq.read_schema(tmp_path / "ours.parquet").types == pq.read_schema(tmp_path / "pandas.parquet").types
    ours, theirs = (pd.read_parquet(tmp_path / f, **an.PARQUET_READ) for f in ("ours.parquet", "pandas.parquet"))
    assert list(ours.columns) == an.SPECTRA_COLUMNS and ours.dtypes.equals(theirs.dtypes)
    pd.testing.assert_frame_equal(ours.drop(columns=["shape", "values"]), theirs.drop(columns=["shape", "values"]))
    for column in ("shape", "values"):
        assert all(np.array_equal(a, b) for a, b in zip(ours[column], theirs[column]))
    an._write_parquet(frame.iloc[:0], tmp_path / "empty.parquet")
    assert list(pd.read_parquet(tmp_path / "empty.parquet").columns) == an.SPECTRA_COLUMNS
