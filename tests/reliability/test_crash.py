"""Crash campaign: training runs SIGKILLed at random moments, then resumed, must end bit-identical to the reference.

Every case kills one run, checks that every reader sees only complete files
(the manifest parses and verifies, every listed checkpoint and capture file
matches its sha256), resumes it and compares everything with the
uninterrupted reference run: step losses, every checkpoint's weights,
optimizer and RNG state, every capture file's datasets. Kill moments: each
named point inside the checkpoint/capture/manifest writes
(``TRAINER_FAULT``, at a random checkpoint step) and random wall-clock delays.
"""

from __future__ import annotations

import random

import _reliability as R
import pytest

pytestmark = pytest.mark.reliability


def _cases(scale: int) -> list[tuple[str, int | float]]:
    """Scale 1: every named kill point once, at a random checkpoint step, plus 2 random-delay kills."""
    rng = random.Random(1234 + scale)
    cases: list[tuple[str, int | float]] = []
    for _ in range(scale):
        cases += [(point, rng.choice(R.CKPT_STEPS)) for point in R.FAULT_POINTS]
        cases += [("random-delay", rng.random()) for _ in range(2)]
    return cases


def test_sigkill_anywhere_then_resume_is_bit_identical(
    reference_run, reference_seconds, launcher, text_corpus, tmp_path, campaign_scale
):
    cases = _cases(campaign_scale)
    results, failures = [], []
    for n, (point, where) in enumerate(cases):
        d = tmp_path / f"case{n:03d}"
        d.mkdir()
        run, log = d / "run", d / "log.txt"
        try:
            if point == "random-delay":  # uniform over the reference's duration (start-up and data prep included)
                delay = where * reference_seconds
                code, _ = launcher.run(R.train_argv(run, text_corpus), log, kill_after=delay)
                label = f"delay {delay:.2f}s"
            else:
                code, _ = launcher.run(R.train_argv(run, text_corpus), log, fault=f"{point}@{where}")
                assert code == -9, f"expected a SIGKILL at {point}@{where}, exit {code}: {log.read_text()[-1500:]}"
                label = f"{point}@{where}"
            killed = code == -9
            complete = R.check_readers(run)  # what any reader sees right after the crash
            # --resume once anything of the run exists; a kill before that (only a stale .lock, or nothing) leaves
            # an empty directory, which the same command starts again (and --resume refuses: nothing to continue)
            started = run.is_dir() and any(p.name != ".lock" for p in run.iterdir())
            code2, _ = launcher.run(R.train_argv(run, text_corpus, resume=started), log)
            assert code2 == 0, f"resume failed ({code2}): {log.read_text()[-1500:]}"
            R.assert_same_run(reference_run, run)
            leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
            assert not leftovers, leftovers
            results.append(f"{label:34s} killed={killed} complete_checkpoints_after_kill={complete} ok")
        except Exception as e:  # collect every failure, then fail once with all of them
            failures.append(f"{point}@{where}: {type(e).__name__}: {e}")
    covered = sorted({p for p, _ in cases})
    R.report(
        "crash campaign",
        [
            f"cases: {len(cases)}; kill points covered: {', '.join(covered)}",
            *results,
            f"failures: {len(failures)}",
            *failures,
        ],
    )
    assert not failures, "\n".join(failures)
