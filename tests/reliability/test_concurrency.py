"""Concurrent writers: a second command writing into a directory another process is writing is refused.

A training run is started in a child process; once it is a random number of
steps in (its ``metrics.jsonl`` says so), a second ``dynamics train`` into the
same directory (with other settings), or a ``--resume`` of it, is started. The
second must exit with status 2 and one ``error:`` line naming the first (its
pid, host and start time), and the first must finish bit-identical to the
uninterrupted reference run. ``dynamics analyze`` into the same ``--out`` and
``dynamics export`` into the same directory are refused the same way.
"""

from __future__ import annotations

import random
import shutil

import _reliability as R
import pytest

from dynamics.cli import main
from trainer.checkpoint import read_manifest

pytestmark = pytest.mark.reliability

ANALYZE = ["--kinds", "weight,update", "--no-circuits", "--basic", "--no-progress"]


def _second_writer_argv(run, corpus, kind: str) -> list[str]:
    if kind == "resume":
        return R.train_argv(run, corpus, resume=True)
    argv = R.train_argv(run, corpus, steps=5)
    return argv + ["--set", "seed=1", "--set", "lr=1e-3"]  # another run entirely


def test_a_second_trainer_is_refused_and_the_first_run_is_intact(
    reference_run, launcher, text_corpus, tmp_path, campaign_scale
):
    rng = random.Random(17 + campaign_scale)
    cases = [kind for _ in range(campaign_scale) for kind in ("train", "train", "resume")]
    lines, failures = [], []
    for n, kind in enumerate(cases):
        d = tmp_path / f"case{n:03d}"
        d.mkdir()
        run = d / "run"
        after = rng.randrange(1, R.STEPS - 1)  # records in the log when the second writer starts (step 0 is one)
        try:
            first = launcher.start(R.train_argv(run, text_corpus), d / "first.txt")
            R.wait_for(lambda run=run, k=after: R.n_records(run) >= k, first, what=f"{after} records")
            code, _ = launcher.run(_second_writer_argv(run, text_corpus, kind), d / "second.txt")
            err = (d / "second.txt").read_text()
            first.join(300)
            assert first.exitcode == 0, (d / "first.txt").read_text()[-1500:]
            assert code == 2, f"second writer exit {code}: {err[-1500:]}"
            errors = [x for x in err.splitlines() if x.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in err, err
            assert f"pid {first.pid} on host" in errors[0] and "in use by `dynamics train`" in errors[0], errors[0]
            R.assert_same_run(reference_run, run)  # the first run is whole and exactly the reference
            assert not (run / ".lock").exists()
            lines.append(f"{kind:6s} second writer after {after} records: refused (exit 2), first run bit-identical")
        except Exception as e:  # collect every failure, then fail once with all of them
            failures.append(f"case {n} ({kind} after {after} records): {type(e).__name__}: {e}")
    for n in range(campaign_scale):  # both started at once, before either has written anything
        d = tmp_path / f"together{n:03d}"
        d.mkdir()
        run = d / "run"
        try:
            a = launcher.start(R.train_argv(run, text_corpus), d / "a.txt")
            b = launcher.start(_second_writer_argv(run, text_corpus, "train"), d / "b.txt")
            a.join(300)
            b.join(300)
            codes = {"a": a.exitcode, "b": b.exitcode}
            assert sorted(codes.values()) == [0, 2], codes  # exactly one ran; the other was refused
            winner, loser = (a, b) if a.exitcode == 0 else (b, a)
            err = (d / ("b.txt" if loser is b else "a.txt")).read_text()
            assert f"pid {winner.pid} on host" in err, err
            if winner is a:
                R.assert_same_run(reference_run, run)
            else:  # the other settings won: their run is whole and is theirs
                assert R.check_readers(run) == 3 and read_manifest(run)["config"]["seed"] == 1
            lines.append(f"both at once: {'first' if winner is a else 'second'} ran, the other refused (exit 2)")
        except Exception as e:
            failures.append(f"both at once {n}: {type(e).__name__}: {e}")
    R.report(
        "concurrent trainers",
        [f"cases: {len(cases) + campaign_scale}", *lines, f"failures: {len(failures)}", *failures],
    )
    assert not failures, "\n".join(failures)


def test_a_second_analysis_or_export_is_refused(reference_run, launcher, tmp_path, capsys, campaign_scale):
    from trainer.lock import DirectoryLock

    lines = []
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    for n in range(campaign_scale):
        out = tmp_path / f"a{n}" / "results.parquet"
        first = launcher.start(["analyze", str(run), "--out", str(out), *ANALYZE], tmp_path / f"a{n}.txt")
        lock = out.parent / "results.parquet.cache" / ".lock"
        R.wait_for(lock.exists, first, what="the cache lock")
        overlapped = first.is_alive()
        code = main(["analyze", str(run), "--out", str(out), *ANALYZE])
        err = capsys.readouterr().err
        first.join(300)
        assert first.exitcode == 0, (tmp_path / f"a{n}.txt").read_text()[-1500:]
        if overlapped and code != 0:
            assert code == 2 and f"pid {first.pid}" in err and "in use by `dynamics analyze`" in err, err
            lines.append("analyze while another analyze writes the same --out: refused (exit 2)")
        else:  # the first finished before the second could ask: nothing to refuse
            assert code == 0, err
            lines.append("analyze after the first finished: ran (no overlap)")
        assert not (out.parent / "results.parquet.cache" / ".lock").exists()
    # export: a directory being exported to is locked by a sibling lock file
    target = tmp_path / "hf"
    with DirectoryLock(tmp_path, command="dynamics export", name=".hf.lock"):
        assert main(["export", str(run), str(target)]) == 2
        assert "in use by `dynamics export`" in capsys.readouterr().err and not target.exists()
    assert main(["export", str(run), str(target)]) == 0 and (target / "model.safetensors").is_file()
    assert not (tmp_path / ".hf.lock").exists()
    lines.append("export into a directory another export holds: refused (exit 2); afterwards it runs")
    R.report("concurrent analysis and export", lines)
