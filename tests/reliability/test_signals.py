"""Signals: SIGTERM (what batch schedulers send) and SIGINT (Ctrl-C) at random moments of a training run.

Each case starts the campaign's run in a child process and, once its log holds
a random number of records, plus a random delay, sends it SIGTERM or SIGINT
(in some cases twice in quick succession). The run must stop with the signal's
documented status (143 or 130): the step in progress finished, a checkpoint
saved with its ``metrics.jsonl`` record, marked ``"interrupt": true`` when it
is off the checkpoint grid. A second signal stops it at once; either way every
reader sees only complete files, and ``--resume`` finishes a run whose step log,
regular checkpoints and capture files are bit-identical to the uninterrupted
reference, and whose analysis (update matrices W_t − W_prev) is the reference's.
"""

from __future__ import annotations

import os
import random
import signal
import time

import _reliability as R
import pandas as pd
import pytest

from dynamics.cli import main
from trainer.checkpoint import read_manifest

pytestmark = pytest.mark.reliability

ANALYZE = ["--kinds", "weight,update", "--no-circuits", "--basic", "--no-progress"]


def _update_rows(results) -> pd.DataFrame:
    from dynamics.analyze import read_results

    t = read_results(results)
    t = t[t["kind"].isin(["weight", "update"])].drop(columns=["run"])
    return t.sort_values(["step", "layer", "component", "kind", "metric"]).reset_index(drop=True)


def test_sigterm_or_sigint_at_random_moments_then_resume(
    reference_run, launcher, text_corpus, tmp_path, capsys, campaign_scale
):
    rng = random.Random(31 + campaign_scale)
    cases = []
    for _ in range(campaign_scale):
        cases += [(sig, 1) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT)]
        cases.append((signal.SIGTERM, 2))  # a second signal: stop at once
    reference_rows = None
    lines, failures = [], []
    analysed = 0
    for n, (sig, times) in enumerate(cases):
        d = tmp_path / f"case{n:03d}"
        d.mkdir()
        run, log = d / "run", d / "log.txt"
        after, delay = rng.randrange(1, R.STEPS), rng.uniform(0.0, 0.15)
        label = f"{signal.Signals(sig).name}{' x2' if times == 2 else ''} after {after} records + {delay:.2f}s"
        try:
            p = launcher.start(R.train_argv(run, text_corpus), log)
            R.wait_for(lambda run=run, k=after: R.n_records(run) >= k, p, what=f"{after} records")
            time.sleep(delay)
            for k in range(times):
                if k:
                    time.sleep(rng.uniform(0.0, 0.05))
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:  # it finished (and was reaped) first
                    break
            p.join(300)
            text = log.read_text()
            assert "Traceback" not in text, text[-2000:]
            complete = R.check_readers(run)  # what any reader sees: complete, hash-valid files only
            m = read_manifest(run)
            last = m["checkpoints"][-1] if m["checkpoints"] else {"step": None}
            if p.exitcode == 128 + sig and last["step"] is None:
                outcome = "stopped while setting up (no checkpoint yet)"
            elif p.exitcode == 128 + sig:
                outcome = "stopped"
                if times == 1:  # the stopped step was saved, with its record; marked when off the grid
                    records = R.strict_records(run)
                    assert records[-1]["step"] == last["step"], (records[-1], last)
                    assert bool(last.get("interrupt")) == (last["step"] not in R.CKPT_STEPS), last
            elif p.exitcode == 0 or (p.exitcode == -sig and last["step"] == R.STEPS):
                outcome = "finished first"  # the signal came after the last step
            else:
                raise AssertionError(f"exit {p.exitcode} after {label}: {text[-1500:]}")
            marked = [c["step"] for c in m["checkpoints"] if c.get("interrupt")]
            code, _ = launcher.run(R.train_argv(run, text_corpus, resume=True), log)
            assert code == 0, f"resume failed ({code}): {log.read_text()[-1500:]}"
            R.assert_same_run(reference_run, run, skip_interrupts=True)
            assert not (run / ".lock").exists()
            assert not [x for x in run.rglob("*") if x.name.startswith(".") and x.name.endswith(".tmp")]
            if marked and analysed < 1:  # the analysis of the resumed run is the reference's, interrupt or not
                if reference_rows is None:
                    assert main(["analyze", str(reference_run), "--out", str(tmp_path / "ref.parquet"), *ANALYZE]) == 0
                    reference_rows = _update_rows(tmp_path / "ref.parquet")
                assert main(["analyze", str(run), "--out", str(d / "r.parquet"), *ANALYZE]) == 0
                rows = _update_rows(d / "r.parquet")
                assert sorted(rows["step"].unique()) == list(R.CKPT_STEPS)
                pd.testing.assert_frame_equal(rows, reference_rows)
                analysed += 1
            capsys.readouterr()
            lines.append(
                f"{label:34s} exit {p.exitcode}: {outcome}, {complete} checkpoints complete, "
                f"interrupt checkpoints {marked}, resumed bit-identical"
            )
        except Exception as e:  # collect every failure, then fail once with all of them
            failures.append(f"{label}: {type(e).__name__}: {e}")
    R.report(
        "signals",
        [
            f"cases: {len(cases)}; analyses compared with the reference's: {analysed}",
            *lines,
            f"failures: {len(failures)}",
            *failures,
        ],
    )
    assert not failures, "\n".join(failures)
    assert analysed >= 1 or campaign_scale < 1
