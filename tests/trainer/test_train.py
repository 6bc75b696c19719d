"""The training loop: exact resume, crash safety under a real SIGKILL, learning, CLI behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamics.cli import main
from trainer.checkpoint import load_checkpoint, read_manifest, verify_checkpoint
from trainer.config import build_config
from trainer.train import Trainer, train


def losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).model


def assert_bit_identical(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = load_checkpoint(a).optimizer, load_checkpoint(b).optimizer
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + ["steps=12", "checkpoint_interval=100", "grad_accum=2"])
    ref = train(cfg, tmp_path / "ref", progress=False)
    t = Trainer(cfg, tmp_path / "split", progress=False)
    t.setup()
    t.run(stop_at=6)  # half-way, with a checkpoint there
    t.cleanup()
    assert [c["step"] for c in read_manifest(tmp_path / "split")["checkpoints"]] == [0, 6]
    train(cfg, tmp_path / "split", resume=True, progress=False)
    assert_bit_identical(ref, tmp_path / "split")


def _train_subprocess(out: Path, overrides: list[str], fault: str | None, resume: bool = False):
    env = dict(os.environ)
    env.pop("TRAINER_FAULT", None)
    if fault:
        env["TRAINER_FAULT"] = fault
    cmd = [sys.executable, "-m", "dynamics.cli", "train", "--out", str(out), "--no-progress"]
    cmd += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["checkpoint-write@10", "before-manifest@10"])
def test_sigkill_during_checkpoint_then_resume(tmp_path, fast_overrides, fault):
    overrides = fast_overrides + ["steps=15"]
    ref = _train_subprocess(tmp_path / "ref", overrides, None)
    assert ref.returncode == 0, ref.stderr
    killed = _train_subprocess(tmp_path / "run", overrides, fault)
    assert killed.returncode == -9  # a real SIGKILL, no cleanup ran
    manifest = read_manifest(tmp_path / "run")  # still readable, never partial
    assert [c["step"] for c in manifest["checkpoints"]] == [0, 5]
    for entry in manifest["checkpoints"]:
        verify_checkpoint(tmp_path / "run", entry)
    resumed = _train_subprocess(tmp_path / "run", overrides, None, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "at step 5" in resumed.stdout
    assert_bit_identical(tmp_path / "ref", tmp_path / "run")
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_resume_refuses_corrupted_latest_checkpoint(tmp_path, fast_overrides, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress"] + [a for o in fast_overrides for a in ("--set", o)]
    assert main(args + ["--steps", "5"]) == 0
    model = out / "checkpoints" / "step_000005" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    capsys.readouterr()
    assert main(args + ["--steps", "10", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "step_000005/model.safetensors is corrupted" in err and "Traceback" not in err


def test_existing_run_needs_resume(tmp_path, fast_overrides, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--steps", "3"] + [
        a for o in fast_overrides for a in ("--set", o)
    ]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_nonfinite_loss_stops_with_clear_error(tmp_path, fast_overrides, capsys):
    args = ["train", "--out", str(tmp_path / "r"), "--no-progress", "--steps", "5"]
    args += [a for o in fast_overrides + ["lr=1e30", "warmup_steps=0"] for a in ("--set", o)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "loss became" in err and "last good checkpoint" in err


@pytest.mark.slow
def test_model_learns_the_text_corpus(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + ["steps=60", "lr=3e-3"])
    run = train(cfg, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert val[0] > 5.0  # ≈ ln(512) at init
    assert val[-1] < 2.6  # well under the ≈ 2.9 nats/byte of the fixture's character distribution
