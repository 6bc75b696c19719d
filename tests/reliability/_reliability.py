"""Helpers of the fault campaign (imported by the tests in this folder; see RELIABILITY.md).

Training runs are started in child processes of a ``forkserver`` that has
imported torch once, so a case costs its training time, not an interpreter
start; a child is a real process, killed with a real SIGKILL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

#: Kill points of trainer.atomic.fault_point, in the order a checkpoint passes them.
FAULT_POINTS = (
    "checkpoint-write",
    "before-manifest",
    "manifest-write",
    "capture-write",
    "before-capture-manifest",
    "capture-manifest-write",
)
#: Steps and checkpoint steps of the campaign's run (checkpoint_interval 3, steps 10).
STEPS, CKPT_STEPS = 10, (0, 3, 6, 9, 10)


def overrides(corpus: Path, steps: int = STEPS) -> list[str]:
    """A micro run on the text fixture: 10 steps, a checkpoint (and capture) every 3 steps and at the end."""
    return [
        "data.source=text",
        f"data.path={corpus}",
        "seq_len=32",
        "batch_size=8",
        "eval_interval=4",
        "eval_batches=2",
        "checkpoint_interval=3",
        "warmup_steps=2",
        f"steps={steps}",
        "capture.probe_sequences=2",
        "capture.grad_sequences=2",
        "capture.token_sample=32",
        "capture.grad_names=[layers.0.**,layers.3.**]",
    ]


def train_argv(out: Path, corpus: Path, *, resume: bool = False, steps: int = STEPS) -> list[str]:
    argv = ["train", "--out", str(out), "--no-progress"] + [a for o in overrides(corpus, steps) for a in ("--set", o)]
    return argv + (["--resume"] if resume else [])


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Child process: run the ``dynamics`` CLI with ``env`` set, output to ``log``; exit with its status."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    torch.set_num_threads(1)  # the same in every child: the reference and resumed runs compute alike
    from dynamics.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Launcher:
    """Starts CLI runs in forked children; optionally SIGKILLs one after a delay."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(
            [
                "torch",
                "torch._dynamo",
                "torch.optim",
                "tqdm.auto",
                "trainer.evaluate",
                "h5py",
                "safetensors.torch",
                "trainer.train",
                "dynamics.cli",
                "_reliability",
            ]
        )

    def warm(self, log: Path) -> None:
        """Start the forkserver (imports torch once) so that later timings measure only the runs."""
        self.run(["train", "--help"], log)

    def start(self, argv: list[str], log: Path, *, fault: str | None = None):
        """Start a CLI run in a child and return its ``multiprocessing.Process`` at once (the caller joins it)."""
        env = {"OMP_NUM_THREADS": "1", "TRAINER_FAULT": fault or ""}
        p = self.ctx.Process(target=_child, args=(argv, env, str(log)))
        p.start()
        return p

    def run(
        self,
        argv: list[str],
        log: Path,
        *,
        fault: str | None = None,
        kill_after: float | None = None,
        timeout: float = 300,
    ) -> tuple[int, float]:
        t0 = time.perf_counter()
        p = self.start(argv, log, fault=fault)
        p.join(kill_after if kill_after is not None else timeout)
        if p.exitcode is None and kill_after is not None:
            p.kill()  # SIGKILL: no cleanup, no flush, whatever the process was doing
            p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise TimeoutError(f"{argv} did not finish in {timeout} s; log: {log.read_text()[-2000:]}")
        return p.exitcode, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# what a run holds, for comparisons


def losses(run: Path) -> list[tuple[int, float | None, float | None]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]


def assert_same_run(ref: Path, run: Path, *, skip_interrupts: bool = False) -> None:
    """``run`` equals ``ref`` bit for bit: step log, every checkpoint's tensors and state, every capture file's data.

    ``skip_interrupts``: ``run`` may also hold checkpoints saved on a signal (``"interrupt": true``), which are
    left out of the comparison of checkpoint lists (their step log records are compared like any other).
    """
    import h5py
    import torch

    from trainer.checkpoint import load_checkpoint, read_manifest

    assert losses(run) == losses(ref), "step losses differ"
    mr, mx = read_manifest(ref), read_manifest(run)
    if skip_interrupts:
        mx["checkpoints"] = [c for c in mx["checkpoints"] if not c.get("interrupt")]
    assert [c["step"] for c in mx["checkpoints"]] == [c["step"] for c in mr["checkpoints"]]
    for c in mr["checkpoints"]:
        a, b = load_checkpoint(ref, c["step"]), load_checkpoint(run, c["step"])
        assert a.model.keys() == b.model.keys()
        for k in a.model:
            assert torch.equal(a.model[k], b.model[k]), (c["step"], k)
        for i, st in a.optimizer["state"].items():
            for key, v in st.items():
                assert torch.equal(v, b.optimizer["state"][i][key]), (c["step"], i, key)
        assert torch.equal(a.rng["torch"], b.rng["torch"])
        assert {k: v for k, v in a.state.items()} == b.state
    for c in mr["checkpoints"]:
        if "dynamics" not in c:
            continue
        other = next(e for e in mx["checkpoints"] if e["step"] == c["step"])
        assert "dynamics" in other, f"capture of step {c['step']} missing"
        with h5py.File(ref / c["dynamics"]["path"], "r") as fa, h5py.File(run / other["dynamics"]["path"], "r") as fb:
            for kind in ("act", "act_in", "grad", "weight", "probe"):
                assert list(fa[kind]) == list(fb[kind]), kind
                for name in fa[kind]:
                    assert np.array_equal(fa[kind][name][()], fb[kind][name][()]), (c["step"], kind, name)
            for key in ("step", "tokens_seen", "lr", "loss", "probe_loss", "grad_loss"):
                assert fa.attrs[key] == fb.attrs[key] or (np.isnan(fa.attrs[key]) and np.isnan(fb.attrs[key])), key


def strict_records(run: Path) -> list[dict]:
    """``metrics.jsonl`` as strict JSON: a bare ``NaN``/``Infinity`` (invalid JSON) raises ``ValueError``."""

    def refuse(token: str):
        raise ValueError(f"{run / 'metrics.jsonl'} holds a bare {token}: not JSON")

    return [json.loads(x, parse_constant=refuse) for x in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, timeout: float = 240.0, what: str = "") -> None:
    """Poll ``predicate()`` every 10 ms until true; fail when ``proc`` (a Process) ends first or time runs out."""
    t0 = time.perf_counter()
    while not predicate():
        if not proc.is_alive():
            raise AssertionError(f"the process ended (exit {proc.exitcode}) before {what}")
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.01)


def n_records(run: Path) -> int:
    log = run / "metrics.jsonl"
    try:
        return len(log.read_text().splitlines())
    except OSError:
        return 0


def mount_tmpfs(path: Path, size_bytes: int) -> str | None:
    """Mount a real tmpfs of ``size_bytes`` at ``path`` (created); ``None`` on success, else why it failed.

    Needs the right to mount (root, or CAP_SYS_ADMIN); tests skip with the reason otherwise.
    """
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run mount: {e}"
    if out.returncode != 0:
        return f"mount -t tmpfs failed: {(out.stderr or out.stdout).strip()[:200]}"
    return None


def umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def check_readers(run: Path) -> int:
    """What a reader sees of a (possibly killed) run is complete: every listed checkpoint and capture file verifies.

    Returns the number of complete checkpoints. A run killed before its first
    manifest has nothing to read (0).
    """
    from dynamics.io import open_run
    from trainer.checkpoint import load_checkpoint, read_manifest

    if not (run / "manifest.json").exists():
        return 0
    manifest = read_manifest(run)  # never partial: raises on a truncated or corrupted file
    for c in manifest["checkpoints"]:
        load_checkpoint(run, c["step"])  # sha256 of every file, then parsed
    r = open_run(run)
    assert r.check() == {}, r.check()  # every capture file a reader can see: sha256 and every dataset
    for step in r.capture_steps:
        assert r.get("grad", step)
    return len(manifest["checkpoints"])


# --------------------------------------------------------------------------------------------------
# damage


def flip(path: Path, rng: random.Random) -> str:
    """XOR one byte at a random offset with a random non-zero value; returns a description."""
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    x = rng.randrange(1, 256)
    data[i] ^= x
    path.write_bytes(bytes(data))
    return f"flip byte {i}/{len(data)} ^0x{x:02x}"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    n = rng.randrange(len(data))
    path.write_bytes(data[:n])
    return f"truncate to {n}/{len(data)}"


def scale(config) -> int:
    n = config.getoption("--reliability-scale")
    if n is None:
        n = int(os.environ.get("RELIABILITY_N", "1"))
    return max(1, n)


def report(title: str, lines: list[str]) -> None:
    """Print a campaign's figures (shown with ``pytest -s``; also appended to $RELIABILITY_REPORT if set)."""
    text = f"\n== {title} ==\n" + "\n".join(lines) + "\n"
    print(text)
    dest = os.environ.get("RELIABILITY_REPORT")
    if dest:
        with open(dest, "a") as f:
            f.write(text)
