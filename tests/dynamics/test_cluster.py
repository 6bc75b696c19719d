"""``dynamics analyze --executor dask``: units on a real local Dask cluster (2 worker processes, 1 thread each).

The cluster's tables must equal a one-process analysis row for row, share its cache (a shard or a local run
before a cluster run, a re-run after it), survive a worker killed mid-unit, and report bad inputs like the
local path; a missing dask or an unreachable scheduler is a one-line error (exit status 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import dynamics.cluster as cluster_mod
from dynamics.analyze import AnalysisError, AnalysisOptions, analyze_runs
from dynamics.cli import main
from trainer.lock import DirectoryLock, DirectoryLockedError

distributed = pytest.importorskip("distributed")

KEY = ["run", "method", "step", "layer", "component", "kind", "metric"]
#: Fast options for the tests that need their own reference: weight spectra only, 3 units per run.
BASIC = AnalysisOptions.basic(kinds=("weight",), circuits=False)


def _sorted(table: pd.DataFrame, key: list[str] = KEY) -> pd.DataFrame:
    return table.sort_values(key).reset_index(drop=True)


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Row for row: the same keys, values equal to 1e-12 (NaN where NaN)."""
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want), check_exact=False, rtol=1e-12, atol=1e-12)


def _spectra(out: Path) -> pd.DataFrame:
    return _sorted(pd.read_parquet(out.with_name(out.stem + ".spectra.parquet")), KEY[:-1])


def _cache_files(out: Path) -> dict[Path, tuple[int, int]]:
    """Every cached unit file → (inode, mtime): an atomic rewrite changes the inode."""
    cache = out.with_name(out.name + ".cache")
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("step_*")}


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster (2 worker processes, 1 thread each) shared by this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNAMICS_WORKER_THREADS", "1")
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster:
            yield cluster.scheduler_address


@pytest.mark.slow
def test_cluster_analyze_equals_one_process_analyze(trained_pair, analysed_pair, scheduler, tmp_path):
    ref, ref_out = analysed_pair
    out = tmp_path / "cluster.parquet"
    table, errors = analyze_runs(list(trained_pair), out, progress=False, executor="dask", scheduler=scheduler)
    assert errors == [] and table.attrs["units"] == {"units": 9, "computed": 9, "cached": 0, "failed": 0}
    _assert_same_rows(table, ref)
    _assert_same_rows(pd.read_parquet(out), ref)
    pd.testing.assert_frame_equal(_spectra(out), _spectra(ref_out))
    # a re-run, on the cluster or locally, serves every unit from the cache the workers wrote
    before = _cache_files(out)
    again, _ = analyze_runs(list(trained_pair), out, progress=False, executor="dask", scheduler=scheduler)
    assert again.attrs["units"]["computed"] == 0 and again.attrs["units"]["cached"] == 9
    local, _ = analyze_runs(list(trained_pair), out, progress=False)
    assert local.attrs["units"]["computed"] == 0 and _cache_files(out) == before
    _assert_same_rows(again, ref)
    _assert_same_rows(local, ref)


@pytest.mark.slow
def test_cluster_run_reuses_a_local_shard(trained_pair, analysed_pair, scheduler, tmp_path):
    """Half the units analysed locally (shard 1/2), the rest on the cluster: nothing recomputed, the same table."""
    ref, _ = analysed_pair
    out = tmp_path / "mixed.parquet"
    part, errors = analyze_runs(list(trained_pair), out, progress=False, shard=(1, 2))
    assert errors == []
    n_local = part.attrs["shard"]["computed"]
    assert 0 < n_local < 9
    local_files = _cache_files(out)
    table, errors = analyze_runs(list(trained_pair), out, progress=False, executor="dask", scheduler=scheduler)
    assert errors == []
    assert table.attrs["units"] == {"units": 9, "computed": 9 - n_local, "cached": n_local, "failed": 0}
    after = _cache_files(out)
    assert all(after[p] == v for p, v in local_files.items())  # the shard's files were not rewritten
    assert len(after) > len(local_files)
    _assert_same_rows(table, ref)


def test_a_cluster_shard_then_a_local_assembly(trained_pair, scheduler, tmp_path):
    """``--shard`` with ``--executor dask``: the shard's units on the cluster; a plain analyze assembles all."""
    out = tmp_path / "r.parquet"
    ref, _ = analyze_runs(list(trained_pair), tmp_path / "ref.parquet", options=BASIC, progress=False)
    part, _ = analyze_runs(
        list(trained_pair), out, options=BASIC, progress=False, shard=(2, 2), executor="dask", scheduler=scheduler
    )
    assert part.attrs["shard"]["computed"] == part.attrs["shard"]["assigned"] == 3 and not out.exists()
    table, _ = analyze_runs(list(trained_pair), out, options=BASIC, progress=False)
    assert table.attrs["units"] == {"units": 6, "computed": 3, "cached": 3, "failed": 0}
    _assert_same_rows(table, ref)


def test_bad_input_is_reported_like_the_local_path(trained_pair, scheduler, tmp_path):
    """A damaged capture file: the same error message and the same remaining rows as a local --keep-going run;
    without --keep-going the same one-line AnalysisError."""
    broken = tmp_path / "relora"
    shutil.copytree(trained_pair.relora, broken)
    h5 = broken / "dynamics" / "step_000004.h5"
    h5.write_bytes(h5.read_bytes()[:200])
    opts = AnalysisOptions.basic(kinds=("weight", "grad"), circuits=False)
    with pytest.warns(UserWarning, match="step 4"):
        local, local_errors = analyze_runs(
            [broken], tmp_path / "l.parquet", options=opts, keep_going=True, progress=False
        )
    with pytest.warns(UserWarning, match="step 4"):
        table, errors = analyze_runs(
            [broken], tmp_path / "c.parquet", options=opts, keep_going=True, progress=False, executor="dask",
            scheduler=scheduler,
        )  # fmt: skip
    assert len(errors) == 1 and errors == local_errors and "step_000004.h5" in errors[0]
    assert table.attrs["units"]["failed"] == 1
    _assert_same_rows(table, local)
    with pytest.raises(AnalysisError, match="step 4.*--keep-going"):
        analyze_runs(
            [broken], tmp_path / "d.parquet", options=opts, progress=False, executor="dask", scheduler=scheduler
        )


def test_a_plain_analyze_holding_the_cache_refuses_a_cluster_run(trained_pair, scheduler, tmp_path):
    out = tmp_path / "r.parquet"
    with DirectoryLock(out.with_name(out.name + ".cache"), command="dynamics analyze"):
        with pytest.raises(DirectoryLockedError, match="`dynamics analyze`"):
            analyze_runs([trained_pair.full], out, options=BASIC, progress=False, executor="dask", scheduler=scheduler)


def test_cli_with_a_scheduler_file(trained_pair, scheduler, tmp_path, capsys):
    sched = tmp_path / "scheduler.json"
    sched.write_text(json.dumps({"address": scheduler}))
    argv = ["analyze", str(trained_pair.full), "--no-progress", "--basic", "--kinds", "weight", "--no-circuits"]
    assert (
        main(argv + ["--out", str(tmp_path / "c.parquet"), "--executor", "dask", "--scheduler-file", str(sched)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "l.parquet")]) == 0  # the same flags, one process
    _assert_same_rows(pd.read_parquet(tmp_path / "c.parquet"), pd.read_parquet(tmp_path / "l.parquet"))


@pytest.mark.slow
def test_worker_killed_mid_unit(trained_pair, tmp_path, monkeypatch):
    """SIGKILL the worker computing ``full`` step 4 (held there by the test hook): the scheduler runs the unit
    again on a live worker, and the table equals a one-process analysis. Uses the LocalCluster that
    ``--executor dask`` without ``--scheduler`` starts (2 workers)."""
    ref, _ = analyze_runs(list(trained_pair), tmp_path / "ref.parquet", options=BASIC, progress=False)
    marker = tmp_path / "stalled.pid"
    monkeypatch.setenv("DYNAMICS_WORKER_THREADS", "1")
    monkeypatch.setenv(cluster_mod.STALL_ENV, json.dumps({"unit": "full:4", "marker": str(marker), "seconds": 120}))
    killed: list[int] = []

    def kill_when_stalled() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    t0 = time.monotonic()
    table, errors = analyze_runs(
        list(trained_pair), tmp_path / "r.parquet", options=BASIC, workers=2, progress=False, executor="dask"
    )
    killer.join(5)
    assert killed and killed[0] != os.getpid()  # a worker process was killed mid-unit ...
    assert time.monotonic() - t0 < 100  # ... and the unit did not wait out the stall: it ran again elsewhere
    assert errors == [] and table.attrs["units"] == {"units": 6, "computed": 6, "cached": 0, "failed": 0}
    _assert_same_rows(table, ref)


@pytest.mark.slow
def test_a_unit_that_keeps_killing_its_workers_is_reported(trained_pair, tmp_path, monkeypatch):
    """A unit whose worker dies on every attempt (here with allowed-failures 0: at the first death) fails with a
    ClusterError; --keep-going lists it and analyses the rest, like a bad input on the local path."""
    monkeypatch.setattr(cluster_mod, "ALLOWED_FAILURES", 0)
    monkeypatch.setenv("DYNAMICS_WORKER_THREADS", "1")
    monkeypatch.setenv(cluster_mod.STALL_ENV, json.dumps({"unit": "full:4", "die": True}))
    with pytest.warns(UserWarning, match="full step 4: ClusterError: workers died"):
        table, errors = analyze_runs(
            [trained_pair.full], tmp_path / "r.parquet", options=BASIC, keep_going=True, workers=2, progress=False,
            executor="dask",
        )  # fmt: skip
    assert len(errors) == 1 and "allowed-failures" in errors[0]
    assert table.attrs["units"] == {"units": 3, "computed": 2, "cached": 0, "failed": 1}
    assert set(table.loc[table["kind"] == "weight", "step"]) == {0, 8}


def test_warns_about_a_scheduler_without_workers_or_with_threaded_workers():
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with (
            pytest.warns(UserWarning, match="no workers yet"),
            cluster_mod.DaskUnits(scheduler=empty.scheduler_address),
        ):
            pass
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    ) as threaded:
        with (
            pytest.warns(UserWarning, match="--nthreads 1"),
            cluster_mod.DaskUnits(scheduler=threaded.scheduler_address),
        ):
            pass


# ------------------------------------------------------------------------------------------- one-line errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_error(argv: list[str], capsys) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_without_dask_names_the_extra(trained_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    out = tmp_path / "r.parquet"
    err = _cli_error(
        ["analyze", str(trained_pair.full), "--out", str(out), "--no-progress", "--executor", "dask"], capsys
    )
    assert "pip install relora-dynamics[cluster]" in err
    assert not out.exists() and not out.with_name(out.name + ".cache").exists()  # refused before any work


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--executor", "dask", "--scheduler", "tcp://127.0.0.1:{port}"], "cannot reach the scheduler at tcp://"),
        (["--executor", "dask", "--scheduler", "nonsense://nowhere"], "is not a scheduler address"),
        (["--executor", "dask", "--scheduler", "tcp://"], "names no host"),
        (["--executor", "dask", "--scheduler-file", "{tmp}/missing.json"], "missing.json not found"),
        (["--executor", "dask", "--scheduler", "tcp://a:1", "--scheduler-file", "{tmp}/s.json"], "not both"),
        (["--scheduler", "tcp://127.0.0.1:{port}"], "need --executor dask"),
    ],
)
def test_cli_cluster_errors_are_one_line(flags, says, trained_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT_S", 1.0)
    flags = [f.format(port=_free_port(), tmp=tmp_path) for f in flags]
    out = tmp_path / "r.parquet"
    t0 = time.monotonic()
    err = _cli_error(["analyze", str(trained_pair.full), "--out", str(out), "--no-progress", *flags], capsys)
    assert says in err and time.monotonic() - t0 < 30
    assert not out.exists() and not out.with_name(out.name + ".cache").exists()
