"""``dynamics analyze --shard K/N``: shards split the units, share the cache, and a plain analyze assembles the table."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pytest

import dynamics.analyze as analyze_mod
import dynamics.cross_run as cross_run_mod
from dynamics.analyze import AnalysisError, AnalysisOptions, analyze_runs, parse_shard, shard_units
from dynamics.cli import main
from dynamics.io import open_run
from trainer.lock import DirectoryLock, DirectoryLockedError


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    cols = ["run", "method", "step", "layer", "component", "kind", "metric"]
    return table.sort_values(cols).reset_index(drop=True)


def _record_units(monkeypatch) -> list[tuple[str, int]]:
    """Record every unit computed (run name or ReLoRA~full pair, step), by wrapping the two unit functions."""
    calls: list[tuple[str, int]] = []
    unit, cross = analyze_mod.analyze_unit, cross_run_mod.cross_run_rows

    def counted_unit(run_path, step, opts):
        calls.append((Path(run_path).name, step))
        return unit(run_path, step, opts)

    def counted_cross(relora, full, step, **kw):
        calls.append((f"{Path(relora).name}~{Path(full).name}", step))
        return cross(relora, full, step, **kw)

    monkeypatch.setattr(analyze_mod, "analyze_unit", counted_unit)
    monkeypatch.setattr(cross_run_mod, "cross_run_rows", counted_cross)
    return calls


def test_shards_then_plain_analyze_equal_one_process_analyze(trained_pair, analysed_pair, tmp_path, monkeypatch):
    table, ref_out = analysed_pair
    out = tmp_path / "sharded.parquet"
    calls = _record_units(monkeypatch)
    per_shard = []
    for k in (1, 2):
        before = len(calls)
        part, errors = analyze_runs(list(trained_pair), out, progress=False, shard=(k, 2))
        assert errors == []
        per_shard.append(set(calls[before:]))
        counts = part.attrs["shard"]
        assert counts["computed"] == counts["assigned"] == len(per_shard[-1]) and counts["cached"] == 0
        assert set(zip(part["run"], part["step"])) <= {(r.split("~")[0], s) for r, s in per_shard[-1]}
        assert not out.exists()  # a shard never writes the table
    # each unit computed by exactly one shard; together they cover every unit of the one-process analysis
    assert len(calls) == len(set(calls)) and not per_shard[0] & per_shard[1]
    units = {(r, s) for r, s in calls}
    assert len(units) == counts["units"] and abs(len(per_shard[0]) - len(per_shard[1])) <= 1

    # the final plain analyze computes nothing: both unit functions now fail if called
    def boom(*a, **k):
        raise AssertionError("recomputed a unit the shards had cached")

    monkeypatch.setattr(analyze_mod, "analyze_unit", boom)
    monkeypatch.setattr(cross_run_mod, "cross_run_rows", boom)
    assembled, errors = analyze_runs(list(trained_pair), out, progress=False)
    assert errors == [] and out.exists()
    pd.testing.assert_frame_equal(_sorted(assembled), _sorted(table))
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out)), _sorted(table))
    spectra = ["run", "step", "layer", "component", "kind"]
    ref_spectra = pd.read_parquet(ref_out.with_name(ref_out.stem + ".spectra.parquet"))
    got_spectra = pd.read_parquet(out.with_name(out.stem + ".spectra.parquet"))
    pd.testing.assert_frame_equal(
        got_spectra.sort_values(spectra).reset_index(drop=True), ref_spectra.sort_values(spectra).reset_index(drop=True)
    )
    # a shard re-run finds its units cached
    again, _ = analyze_runs(list(trained_pair), out, progress=False, shard=(1, 2))
    assert again.attrs["shard"]["computed"] == 0 and again.attrs["shard"]["cached"] == len(per_shard[0])


def test_shard_units_partition_deterministically():
    units = [(f"run{r}", s) for r in range(3) for s in range(0, 50, 10)]
    for n in (1, 2, 3, 7, 20):
        parts = [shard_units(reversed(units), (k, n)) for k in range(1, n + 1)]
        assert sorted(u for p in parts for u in p) == sorted(units)  # each unit in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [shard_units(units, (k, n)) for k in range(1, n + 1)]  # order of the input does not matter


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "-1/2", ""])
def test_bad_shard_is_a_one_line_error(bad, trained_pair, tmp_path, capsys):
    with pytest.raises(AnalysisError):
        parse_shard(bad)
    out = tmp_path / "r.parquet"
    status = main(["analyze", str(trained_pair.full), "--out", str(out), "--no-progress", f"--shard={bad}"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: --shard") and err.count("\n") == 1
    assert not out.exists() and not out.with_name(out.name + ".cache").exists()  # refused before any work


def test_bad_shard_tuple_in_the_api(trained_pair, tmp_path):
    for bad in [(0, 2), (3, 2), (1, 0), (True, 1), (1.0, 2)]:
        with pytest.raises(AnalysisError, match="shard"):
            analyze_runs([trained_pair.full], tmp_path / "r.parquet", progress=False, shard=bad)


def test_cli_shards_then_assemble(trained_pair, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    base = ["analyze", str(trained_pair.full), "--out", str(out), "--no-progress", "--basic", "--kinds", "weight"]
    for k in (1, 2):
        assert main(base + ["--shard", f"{k}/2"]) == 0
        printed = capsys.readouterr().out
        assert f"shard {k}/2:" in printed and "computed" in printed and "not written" in printed
    assert not out.exists()
    assert main(base) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()


def test_concurrent_shards_are_not_refused_but_a_plain_analyze_is(trained_pair, tmp_path, monkeypatch):
    """Two shards compute at the same time on one cache (the lock is taken only around writes); a shard waits
    while another shard writes, and stops at once, naming it, while a plain analyze holds the cache."""
    out = tmp_path / "r.parquet"
    cache = out.with_name(out.name + ".cache")
    opts = AnalysisOptions.basic(kinds=("weight",), circuits=False)
    runs = list(trained_pair)
    barrier = threading.Barrier(2, timeout=60)
    first = threading.local()
    unit = analyze_mod.analyze_unit

    def both_at_once(run_path, step, o):  # each shard's first unit waits until the other shard is computing too
        if not getattr(first, "seen", False):
            first.seen = True
            barrier.wait()
        return unit(run_path, step, o)

    monkeypatch.setattr(analyze_mod, "analyze_unit", both_at_once)
    results: dict[int, object] = {}

    def shard(k: int) -> None:
        try:
            results[k] = analyze_runs(runs, out, options=opts, progress=False, shard=(k, 2))
        except BaseException as e:  # reported by the assertion below
            results[k] = e

    # another shard holds the lock for a write: both shards wait for it, then compute side by side
    other = DirectoryLock(cache, command="dynamics analyze --shard 9/9").acquire()
    threads = [threading.Thread(target=shard, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    threading.Timer(0.5, other.release).start()
    for t in threads:
        t.join(120)
    for k in (1, 2):
        assert isinstance(results[k], tuple), results[k]
        assert results[k][0].attrs["shard"]["computed"] == results[k][0].attrs["shard"]["assigned"] > 0

    # a plain analyze holds the cache for its whole run: a shard is refused at once
    with DirectoryLock(cache, command="dynamics analyze"):
        with pytest.raises(DirectoryLockedError, match="`dynamics analyze`"):
            analyze_runs(runs, out, options=opts, progress=False, shard=(1, 2))


@pytest.mark.slow
def test_shard_with_worker_processes(trained_pair, tmp_path):
    """A shard's units run in spawned workers too, each taking the cache's lock around its writes."""
    out = tmp_path / "r.parquet"
    opts = AnalysisOptions.basic(kinds=("weight",), circuits=False)
    part, errors = analyze_runs(list(trained_pair), out, options=opts, workers=2, progress=False, shard=(1, 2))
    assert errors == [] and part.attrs["shard"]["computed"] == part.attrs["shard"]["assigned"] == 3
    units = {(r.name, s) for r in trained_pair for s in open_run(r).steps}  # no cross-run units with --basic
    assert set(zip(part["run"], part["step"])) == set(shard_units(units, (1, 2)))
