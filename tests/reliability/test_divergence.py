"""Divergence: a non-finite loss or gradient is never applied nor saved, the log stays JSON, analysis goes on.

Runs of the campaign's micro model with an absurd learning rate (log-uniform
in [1e20, 1e36], no warmup, a random checkpoint interval) and runs whose loss
is made NaN at a random step must stop with exit status 1 and one line naming
the step; every listed checkpoint must hold finite weights, ``metrics.jsonl``
must be strict JSON (non-finite values ``null``, listed under ``nonfinite``).
A run with a checkpoint of NaN weights (as older versions saved) must be
analysed everywhere else, with and without ``--keep-going``: the bad checkpoint
is named, nothing is compared with it.
"""

from __future__ import annotations

import math
import random
import shutil

import _reliability as R
import pytest
import torch

from dynamics.cli import main
from trainer.atomic import sha256_file
from trainer.checkpoint import load_checkpoint, read_manifest, write_manifest

pytestmark = pytest.mark.reliability

ANALYZE = ["--kinds", "weight,update,update_cumulative", "--no-circuits", "--basic", "--no-progress"]


def _check_diverged_run(run, err: str) -> str:
    """The run stopped cleanly at a named step; returns a description. Raises on any broken guarantee."""
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    records = R.strict_records(run)  # strict JSON: no bare NaN
    last = records[-1]
    assert last.get("diverged") is True and last["nonfinite"], last
    assert all(last[k] is None for k in last["nonfinite"])
    assert f"diverged at step {last['step']}" in errors[0], (errors[0], last)
    R.check_readers(run)
    steps = [c["step"] for c in read_manifest(run)["checkpoints"]]
    for step in steps:
        weights = load_checkpoint(run, step).model
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), f"step {step} saved non-finite weights"
    assert max(steps) < last["step"]  # the diverged update was not applied, so never saved
    return f"stopped at step {last['step']} ({', '.join(last['nonfinite'])}), checkpoints {steps} all finite"


def test_absurd_learning_rates_and_nan_losses(tmp_path, text_corpus, monkeypatch, capsys, one_thread, campaign_scale):
    from trainer.model import Decoder

    rng = random.Random(43 + campaign_scale)
    lines, failures = [], []
    cases = [(kind, n) for n in range(campaign_scale) for kind in ("lr", "lr", "lr", "nan-loss", "nan-loss")]
    for i, (kind, _) in enumerate(cases):
        run = tmp_path / f"run{i}"
        interval = rng.choice([1, 2, 3])
        extra = ["--set", f"checkpoint_interval={interval}", "--set", "warmup_steps=0"]
        try:
            with monkeypatch.context() as m:
                if kind == "lr":
                    lr = 10 ** rng.uniform(20, 36)
                    extra += ["--set", f"lr={lr:.3g}"]
                    label = f"lr={lr:.2g} checkpoint_interval={interval}"
                else:
                    at = rng.randrange(1, R.STEPS)  # the training loss of update `at` becomes NaN
                    real, calls = Decoder.loss, {"n": 0}

                    def nan_loss(self, *a, real=real, calls=calls, at=at, **kw):
                        out = real(self, *a, **kw)
                        if self.training:
                            calls["n"] += 1
                            if calls["n"] == at + 1:
                                return out * float("nan")
                        return out

                    m.setattr(Decoder, "loss", nan_loss)
                    label = f"NaN loss at update {at} checkpoint_interval={interval}"
                code = main(R.train_argv(run, text_corpus) + extra)
            err = capsys.readouterr().err
            if code == 0:
                lines.append(f"{label:45s} did not diverge")
                continue
            assert code == 1, f"exit {code}: {err}"
            lines.append(f"{label:45s} {_check_diverged_run(run, err)}")
        except Exception as e:  # collect every failure, then fail once with all of them
            failures.append(f"{kind} case {i}: {type(e).__name__}: {e}")
    R.report("divergence", [f"cases: {len(cases)}", *lines, f"failures: {len(failures)}", *failures])
    assert not failures, "\n".join(failures)
    assert any("stopped at step" in x for x in lines)


def _poison(run, step: int) -> None:
    """Replace checkpoint ``step``'s weights by NaN in one matrix, hash updated: what older versions could save."""
    from safetensors.torch import load_file, save_file

    m = read_manifest(run)
    entry = next(c for c in m["checkpoints"] if c["step"] == step)
    path = run / entry["path"] / "model.safetensors"
    weights = load_file(str(path))
    weights["layers.1.mlp.up.weight"] = torch.full_like(weights["layers.1.mlp.up.weight"], math.nan)
    save_file(weights, str(path), metadata={"step": str(step), "format": "pt"})
    entry["sha256"]["model.safetensors"] = sha256_file(path)
    write_manifest(run, m)


@pytest.mark.parametrize("keep_going", [False, True], ids=["plain", "keep-going"])
def test_analysis_of_a_run_with_a_nan_checkpoint_analyses_every_other_one(
    reference_run, tmp_path, capsys, keep_going, campaign_scale
):
    from dynamics.analyze import read_results

    rng = random.Random(47 + campaign_scale + keep_going)
    lines = []
    for n in range(campaign_scale):
        run = tmp_path / f"run{n}"
        shutil.copytree(reference_run, run)
        bad = rng.choice(R.CKPT_STEPS[1:-1])
        _poison(run, bad)
        out = tmp_path / f"r{n}.parquet"
        capsys.readouterr()
        code = main(["analyze", str(run), "--out", str(out), *ANALYZE] + (["--keep-going"] if keep_going else []))
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        failed = [x for x in err.splitlines() if x.startswith("failed:")]
        assert len(failed) == 1 and f"step {bad}" in failed[0] and "NaN or Inf" in failed[0], err
        t = read_results(out)
        good = [s for s in R.CKPT_STEPS if s != bad]
        assert sorted(t.loc[t["kind"] == "weight", "step"].unique()) == good  # every healthy checkpoint
        assert not t.loc[t["kind"] != "train", "value"].isna().any()  # no NaN leaked into the table
        after = R.CKPT_STEPS[R.CKPT_STEPS.index(bad) + 1]
        assert after not in set(t.loc[t["kind"] == "update", "step"])  # W_after − W_bad is never taken
        assert after in set(t.loc[t["kind"] == "update_cumulative", "step"])  # W_after − W_0 still is
        lines.append(f"NaN weights at step {bad}: named once, steps {good} analysed, update at {after} skipped")
    R.report(f"analysis of a diverged checkpoint ({'--keep-going' if keep_going else 'plain'})", lines)
