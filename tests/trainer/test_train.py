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


def _strict_records(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity (invalid JSON) fails the test."""

    def refuse(token: str):
        raise AssertionError(f"metrics.jsonl holds a bare {token}, which is not JSON")

    return [json.loads(x, parse_constant=refuse) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(run: Path) -> dict[int, bool]:
    return {
        c["step"]: all(bool(torch.isfinite(t).all()) for t in load_checkpoint(run, c["step"]).model.values())
        for c in read_manifest(run)["checkpoints"]
    }


def test_divergence_is_never_applied_nor_saved(tmp_path, fast_overrides, capsys):
    """lr=1e30: the first non-finite gradient norm (the loss still finite) stops the run before the update."""
    run = tmp_path / "r"
    args = ["train", "--out", str(run), "--no-progress", "--steps", "5"]
    extra = ["lr=1e30", "warmup_steps=0", "checkpoint_interval=1", "capture.enabled=false"]
    args += [a for o in fast_overrides + extra for a in ("--set", o)]
    code = main(args)
    err = capsys.readouterr().err
    finite = _all_finite(run)
    assert finite and all(finite.values()), finite  # every listed checkpoint is finite
    records = _strict_records(run)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "diverged at step" in err and "last good checkpoint" in err
    last = records[-1]
    assert last["diverged"] is True and last["nonfinite"] and all(last[k] is None for k in last["nonfinite"])
    assert f"at step {last['step']}" in err  # the error names the step the log names
    assert max(finite) == last["step"] - 1  # the update of the diverged step was not applied, nor saved


def test_nonfinite_gradient_norm_with_finite_loss_is_not_applied(tmp_path, fast_overrides, monkeypatch):
    import trainer.train as tt
    from trainer.errors import TrainingError

    real = tt.global_norm
    calls = {"n": 0}

    def norm_nan_at_third_step(tensors):
        calls["n"] += 1
        out = real(tensors)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(tt, "global_norm", norm_nan_at_third_step)
    cfg = build_config(overrides=fast_overrides + ["steps=5", "checkpoint_interval=2", "capture.enabled=false"])
    t = Trainer(cfg, tmp_path / "r", progress=False)
    try:
        t.setup()
        with pytest.raises(TrainingError, match="diverged at step 3: the gradient norm became nan"):
            t.run()
        at_2 = load_checkpoint(tmp_path / "r", 2).model
        now = {k: v.detach() for k, v in t.model.state_dict().items()}
        assert all(torch.equal(now[k], at_2[k]) for k in at_2)  # the weights are still those after update 2
    finally:
        t.cleanup()
    assert [c["step"] for c in read_manifest(tmp_path / "r")["checkpoints"]] == [0, 2]
    assert _strict_records(tmp_path / "r")[-1]["nonfinite"] == ["grad_norm"]


def test_metrics_log_writes_strict_json(tmp_path):
    from trainer.train import JsonlLog

    log = JsonlLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    log.close()
    (tmp_path / "metrics.jsonl").write_bytes((tmp_path / "m.jsonl").read_bytes())
    (rec,) = _strict_records(tmp_path)
    assert rec == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["loss", "grad_norm"]}
    assert "NaN" not in (tmp_path / "m.jsonl").read_text()


@pytest.mark.slow
def test_model_learns_the_text_corpus(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + ["steps=60", "lr=3e-3"])
    run = train(cfg, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert val[0] > 5.0  # ≈ ln(512) at init
    assert val[-1] < 2.6  # well under the ≈ 2.9 nats/byte of the fixture's character distribution


# -- resume semantics ---------------------------------------------------------------------------


def _cli(out: Path, overrides: list[str], *flags: str) -> list[str]:
    return ["train", "--out", str(out), "--no-progress", *flags] + [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def six_steps(tmp_path, fast_overrides, capsys):
    """A 6-step run with checkpoints at 0, 3, 6 (no capture), trained through the CLI."""
    out = tmp_path / "run"
    extra = ["checkpoint_interval=3", "eval_interval=3", "capture.enabled=false"]
    assert main(_cli(out, fast_overrides + extra, "--steps", "6")) == 0
    capsys.readouterr()
    return out


def test_bare_resume_continues_the_stored_run_exactly(six_steps, capsys):
    before = (six_steps / "manifest.json").read_bytes()
    assert main(["train", "--out", str(six_steps), "--resume", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "changed" not in err and "with steps" not in out, (out, err)
    m = read_manifest(six_steps)
    assert m["config"]["steps"] == 6 and m["config"]["checkpoint_interval"] == 3 and "history" not in m
    assert [c["step"] for c in m["checkpoints"]] == [0, 3, 6]
    assert (six_steps / "manifest.json").read_bytes() == before  # nothing to do, nothing rewritten


def test_extension_is_explicit_and_recorded_in_the_manifest(six_steps, capsys):
    assert main(["train", "--out", str(six_steps), "--resume", "--steps", "9", "--no-progress"]) == 0
    assert "steps=9 (was 6)" in capsys.readouterr().out
    m = read_manifest(six_steps)
    assert [c["step"] for c in m["checkpoints"]] == [0, 3, 6, 9]
    assert m["config"]["steps"] == 9 and m["config"]["checkpoint_interval"] == 3
    assert m["config"]["warmup_steps"] == 2  # the run's warmup; an extension does not warm up again
    (entry,) = m["history"]
    assert entry["extended"] == {"from": 6, "to": 9} and entry["at_step"] == 6 and entry["time"]
    assert [r["step"] for r in _strict_records(six_steps)] == list(range(10))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--set", "lr=1e-2"], "lr=0.01"),
        (["--method", "relora"], "method='relora'"),
        (["--set", "model.d_model=32"], "model.d_model=32"),
        (["--steps", "4"], "steps=4 is fewer than the run's 6"),
    ],
)
def test_a_setting_that_cannot_change_on_resume_is_an_error(six_steps, capsys, flags, needle):
    before = {p: p.read_bytes() for p in six_steps.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(six_steps), "--resume", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert {p: p.read_bytes() for p in six_steps.rglob("*") if p.is_file()} == before  # the run is untouched


def test_resume_of_a_missing_or_empty_directory_is_an_error(tmp_path, capsys):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for out in (missing, empty):
        assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
        assert "holds no run to continue" in capsys.readouterr().err
    assert not missing.exists() and list(empty.iterdir()) == []


# -- one writer per run directory ---------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(six_steps, fast_overrides, tmp_path, capsys):
    from trainer.lock import DirectoryLock

    new = tmp_path / "new"
    with DirectoryLock(six_steps, command="dynamics train"), DirectoryLock(new, command="dynamics train"):
        before = {p: p.read_bytes() for p in six_steps.rglob("*") if p.is_file() and p.name != ".lock"}
        assert main(["train", "--out", str(six_steps), "--resume", "--steps", "9", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "in use by `dynamics train`" in err and err.count("\n") == 1, err
        assert main(_cli(new, fast_overrides, "--steps", "3")) == 2
        assert "in use by" in capsys.readouterr().err
        after = {p: p.read_bytes() for p in six_steps.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before
    assert not new.exists()  # the lock made the directory and took it away again: as it was
    assert not (six_steps / ".lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(six_steps, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"pid": dead.pid, "host": __import__("socket").gethostname(), "since": "earlier", "command": "x"}
    (six_steps / ".lock").write_text(json.dumps(holder))
    assert main(["train", "--out", str(six_steps), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"taking over the stale lock of {six_steps}" in out and f"pid {dead.pid}" in out
    assert "no longer running" in out and not (six_steps / ".lock").exists()


# -- signals -------------------------------------------------------------------------------------


def test_ctrl_c_during_evaluation_still_writes_the_record(tmp_path, fast_overrides, monkeypatch, capsys):
    import signal

    real = Trainer.evaluate_all
    calls = {"n": 0}

    def interrupted_evaluation(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation of step 3 (the first was step 0's)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate_all", interrupted_evaluation)
    run = tmp_path / "run"
    extra = ["eval_interval=3", "checkpoint_interval=5", "capture.enabled=false"]
    assert main(_cli(run, fast_overrides + extra, "--steps", "10")) == 130
    records = {r["step"]: r for r in _strict_records(run)}
    assert max(records) == 3 and "val_loss" in records[3]  # the step finished, evaluation and record included
    m = read_manifest(run)
    assert [(c["step"], c.get("interrupt", False)) for c in m["checkpoints"]] == [(0, False), (3, True)]
    # analysis leaves the interrupt checkpoint out unless asked
    from dynamics.analyze import read_results
    from dynamics.io import open_run

    assert open_run(run).steps == [0] and open_run(run).interrupt_steps == [3]
    assert open_run(run, include_interrupts=True).steps == [0, 3]
    fast = ["--kinds", "weight", "--no-circuits", "--basic", "--no-progress"]
    for flag, steps in (([], {0}), (["--include-interrupts"], {0, 3})):
        out = tmp_path / f"r{len(flag)}.parquet"
        assert main(["analyze", str(run), "--out", str(out), *fast, *flag]) == 0
        t = read_results(out)
        assert set(t.loc[t["kind"] == "weight", "step"]) == steps


def _wait_for_records(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        log = run / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    raise AssertionError("training did not get going in time")


@pytest.mark.slow
def test_sigterm_saves_a_marked_checkpoint_and_resume_matches_the_uninterrupted_run(tmp_path, fast_overrides):
    import signal

    overrides = fast_overrides + ["steps=12", "checkpoint_interval=4", "eval_interval=4", "capture.enabled=false"]
    ref = _train_subprocess(tmp_path / "ref", overrides, None)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRAINER_FAULT"}
    cmd = [sys.executable, "-m", "dynamics.cli", "train", "--out", str(run), "--no-progress"]
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_records(run, 6, proc)  # step 0 and a few steps: between two checkpoints
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    m = read_manifest(run)
    stopped = m["checkpoints"][-1]
    records = _strict_records(run)
    assert records[-1]["step"] == stopped["step"]  # the checkpoint has its record
    if stopped["step"] % 4:  # off the grid: marked
        assert stopped.get("interrupt") is True
    resumed = _train_subprocess(run, overrides, None, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "ref")
    regular = [c["step"] for c in read_manifest(run)["checkpoints"] if not c.get("interrupt")]
    assert regular == [0, 4, 8, 12]
    for step in regular:
        a, b = load_checkpoint(tmp_path / "ref", step).model, load_checkpoint(run, step).model
        assert all(torch.equal(a[k], b[k]) for k in a)
    from dynamics.analyze import AnalysisOptions, analyze_runs

    opts = AnalysisOptions.basic(kinds=("weight", "update"), circuits=False)
    tables = {
        name: analyze_runs([tmp_path / name], tmp_path / f"{name}.parquet", options=opts, progress=False)[0]
        for name in ("ref", "run")
    }
    rows = {name: t[t["kind"] == "update"].drop(columns=["run"]).reset_index(drop=True) for name, t in tables.items()}
    assert sorted(rows["run"]["step"].unique()) == [4, 8, 12]  # W8 − W4, never against the interrupt checkpoint
    assert rows["run"].equals(rows["ref"])


# -- validation before anything is written --------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["method=relora", "relora.rank=48"], "relora.rank=48 exceeds min(out, in) = 32"),
        (["seed=18446744073709551616"], "seed must be in [0, 2**63-1]"),
        (["data.seed=-1"], "data.seed must be in"),
        (["data.val_fraction=0.0001"], "the val split has"),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_start_leaves_the_directory_as_it_was(tmp_path, fast_overrides, capsys, extra, needle, existing):
    out = tmp_path / "run"
    if existing:
        out.mkdir()
    before = _tree(out)
    assert main(_cli(out, fast_overrides + ["capture.enabled=false"] + extra, "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    assert _tree(out) == before  # nothing written, nothing left behind: the corrected command works
    assert main(_cli(out, fast_overrides + ["capture.enabled=false"], "--steps", "3")) == 0


def test_init_from_is_checked_before_anything_is_written(six_steps, tmp_path, fast_overrides, capsys):
    out = tmp_path / "warm"
    base = fast_overrides + ["capture.enabled=false"]
    cases = [
        ([f"init_from={six_steps}@5"], "has no checkpoint at step 5"),
        ([f"init_from={six_steps}@3", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1"], "do not fit"),
        ([f"init_from={tmp_path / 'nowhere'}"], "is not a run directory"),
    ]
    for extra, needle in cases:
        code = main(_cli(out, base + extra, "--steps", "3"))
        err = capsys.readouterr().err
        assert not out.exists()  # refused before anything was written
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert main(_cli(out, base + [f"init_from={six_steps}@3"], "--steps", "3")) == 0
    assert f"initialised from {six_steps} step 3" in capsys.readouterr().out


def test_resume_after_a_kill_during_tokenisation_removes_its_temporary_files(tmp_path, fast_overrides, capsys):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    leftover = run / "data" / ".train.bin.k1ll3d.tmp"  # what a SIGKILL inside atomic_write leaves
    leftover.write_bytes(b"\0" * 100)
    assert main(_cli(run, fast_overrides + ["capture.enabled=false"], "--steps", "3", "--resume")) == 0
    assert not leftover.exists() and "removed incomplete" in capsys.readouterr().out
    assert [c["step"] for c in read_manifest(run)["checkpoints"]] == [0, 3]
