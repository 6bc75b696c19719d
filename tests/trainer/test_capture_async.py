"""Capture written in the background: same files as a synchronous write, training not blocked, errors surfaced."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import trainer.capture.capturer as capture_mod  # the module whose write_capture the capturer calls
from trainer import checkpoint as ckpt
from trainer.atomic import sha256_file
from trainer.background import BackgroundJob
from trainer.capture import CaptureError, Capturer
from trainer.capture.capturer import _naming_step
from trainer.checkpoint import read_manifest
from trainer.config import build_config
from trainer.train import Trainer, train

RELORA = ["method=relora", "relora.merge_every=4", "relora.lr_restart_warmup=1"]
#: a small probe, so that a capture costs little next to the run
SMALL_PROBE = ["capture.probe_sequences=2", "capture.grad_sequences=2", "capture.token_sample=32"]
TIMEOUT = 60  # seconds any test waits for a thread before failing instead of hanging


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads make these micro runs ~40× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _h5(run: Path, step: int) -> Path:
    return run / "dynamics" / f"step_{step:06d}.h5"


def _listed(run: Path) -> dict[int, dict]:
    """``{step: dynamics record}`` of every checkpoint the manifest lists with a capture."""
    return {e["step"]: e["dynamics"] for e in read_manifest(run)["checkpoints"] if "dynamics" in e}


def _contents(path: Path) -> dict[str, object]:
    """Every dataset (with its dtype) and every attribute of a capture file, root and datasets."""
    with h5py.File(path, "r") as f:
        out: dict[str, object] = {f"@{k}": v for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype, obj[()])
                out.update({f"{name}@{k}": v for k, v in obj.attrs.items()})

        f.visititems(visit)
    return out


def _synchronous(monkeypatch) -> None:
    """Make the trainer build its capturer with ``background=False`` (the pre-background behaviour)."""
    build = Capturer.for_run.__func__
    monkeypatch.setattr(Capturer, "for_run", classmethod(lambda cls, *a, **kw: build(cls, *a, **kw, background=False)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, fast_overrides) -> dict[str, Path]:
    """The same ReLoRA micro run (checkpoints and captures at 0 and 5, one merge) written both ways."""
    overrides = [*fast_overrides, "steps=5", *SMALL_PROBE]
    root = tmp_path_factory.mktemp("capture_async")
    runs = {"background": train(build_config(overrides=overrides + RELORA), root / "background", progress=False)}
    with pytest.MonkeyPatch.context() as m:
        _synchronous(m)
        runs["sync"] = train(build_config(overrides=overrides + RELORA), root / "sync", progress=False)
    return runs


def test_background_files_equal_synchronous_ones_and_are_listed_with_their_hash(pair):
    for run in pair.values():
        listed = _listed(run)
        assert sorted(listed) == [0, 5]
        for step, rec in listed.items():
            path = run / rec["path"]
            assert rec["path"] == f"dynamics/step_{step:06d}.h5"
            assert rec["sha256"] == sha256_file(path) and rec["bytes"] == path.stat().st_size and rec["seconds"] > 0
        assert not list((run / "dynamics").glob(".*"))  # no temporary leftovers
    for step in (0, 5):
        a, b = _contents(_h5(pair["background"], step)), _contents(_h5(pair["sync"], step))
        assert a.keys() == b.keys()
        assert {k.split("/")[0] for k in a if not k.startswith("@")} >= {"act", "act_in", "grad", "weight", "probe"}
        for key in a:  # datasets (dtype, values) and attributes; no timing in the file (`seconds`: manifest only)
            assert _same(a[key], b[key]), (step, key)


def _same(a: object, b: object) -> bool:
    """Equal values and dtypes, NaN equal to NaN (``lora_scale`` of a full-rank phase, for instance)."""
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.dtype):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture
def gated_writes(monkeypatch):
    """``write_capture`` that waits for ``gate`` (an Event) before writing; ``log`` records the order of events."""
    gate, log = threading.Event(), []
    real_write, real_save = capture_mod.write_capture, ckpt.save_checkpoint

    def write_capture(path, captured, probe, cfg, attrs, **kw):
        log.append(("write-start", int(attrs["step"]), threading.current_thread() is threading.main_thread()))
        assert gate.wait(TIMEOUT), "the test never opened the gate"
        real_write(path, captured, probe, cfg, attrs, **kw)
        log.append(("write-done", int(attrs["step"])))

    def save_checkpoint(run_dir, payload):
        log.append(("checkpoint", payload.state["step"]))
        return real_save(run_dir, payload)

    monkeypatch.setattr(capture_mod, "write_capture", write_capture)
    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)
    return gate, log


def test_training_goes_on_while_the_capture_is_written_and_the_next_checkpoint_waits(
    tmp_path, fast_overrides, gated_writes
):
    gate, log = gated_writes
    t = Trainer(
        build_config(overrides=fast_overrides + SMALL_PROBE + ["steps=6", "checkpoint_interval=3"]),
        tmp_path / "run",
        progress=False,
    )
    try:
        t.setup()  # checkpoint 0, then its capture: the pass here, the write handed to the writer (held at the gate)
        assert log == [("checkpoint", 0), ("write-start", 0, False)]  # written off the training thread
        for _ in range(2):
            t.train_step()  # training proceeds while the write is pending
        assert t.step == 2 and t.capturer._writer.running
        assert not _h5(t.run_dir, 0).exists() and _listed(t.run_dir) == {}
        opener = threading.Timer(0.5, gate.set)
        opener.start()
        t0 = time.perf_counter()
        t.run(stop_at=3)  # step 3, then checkpoint 3: its flush() waits for the write of step 0
        waited = time.perf_counter() - t0
        opener.join()
        assert waited >= 0.4, waited
        assert log[:4] == [("checkpoint", 0), ("write-start", 0, False), ("write-done", 0), ("checkpoint", 3)]
        assert 0 in _listed(t.run_dir)  # listed before checkpoint 3 rewrote the manifest, and kept
        t.capturer.flush()
        listed = _listed(t.run_dir)
        assert sorted(listed) == [0, 3]
        assert all(rec["sha256"] == sha256_file(t.run_dir / rec["path"]) for rec in listed.values())
    finally:
        gate.set()
        t.cleanup()


def test_only_the_training_thread_writes_the_manifest(tmp_path, fast_overrides, gated_writes, monkeypatch):
    gate, _ = gated_writes
    writers: list[bool] = []  # per manifest write: was it the training (main) thread?
    for module in (ckpt, capture_mod):  # checkpoint.save_checkpoint's writes, and the capturer's listings
        real = module.write_manifest

        def spy(*args, _real=real, **kwargs):
            writers.append(threading.current_thread() is threading.main_thread())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "write_manifest", spy)
    t = Trainer(build_config(overrides=fast_overrides + SMALL_PROBE + ["steps=5"]), tmp_path / "run", progress=False)
    try:
        t.setup()  # checkpoint 0; the write of its capture waits at the gate
        t.capturer.poll()  # the write is not done: poll returns at once and lists nothing
        assert t.capturer._writer.running and _listed(t.run_dir) == {}
        gate.set()
        deadline = time.monotonic() + TIMEOUT
        while t.capturer._writer.running:
            assert time.monotonic() < deadline, "the capture write never finished"
            time.sleep(0.01)
        assert _h5(t.run_dir, 0).exists() and _listed(t.run_dir) == {}  # written, listed by no one yet
        t.capturer.poll()  # the training thread collects the writer's record and lists it
        assert sorted(_listed(t.run_dir)) == [0]
        t.run()
    finally:
        gate.set()
        t.cleanup()
    assert sorted(_listed(t.run_dir)) == [0, 5]
    assert writers and all(writers), writers


def test_a_failed_background_write_is_raised_at_the_next_flush_naming_the_step(tmp_path, fast_overrides, monkeypatch):
    real_write = capture_mod.write_capture
    fail = {"step": 0, "error": ValueError("simulated HDF5 failure")}

    def write_capture(path, captured, probe, cfg, attrs, **kw):
        if int(attrs["step"]) == fail["step"]:
            raise fail["error"]
        real_write(path, captured, probe, cfg, attrs, **kw)

    monkeypatch.setattr(capture_mod, "write_capture", write_capture)
    cfg = build_config(overrides=fast_overrides + SMALL_PROBE + ["steps=5"])
    with pytest.raises(CaptureError, match=r"capture of step 0 .*ValueError: simulated HDF5 failure") as info:
        train(cfg, tmp_path / "run", progress=False)  # raised by the next poll (or flush): never written
    assert isinstance(info.value.__cause__, ValueError)
    manifest = read_manifest(tmp_path / "run")
    assert [e["step"] for e in manifest["checkpoints"]] == [0] and "dynamics" not in manifest["checkpoints"][0]
    assert not _h5(tmp_path / "run", 0).exists()

    # a full disk keeps its type and errno (the CLI reports it as one `error:` line), and is raised by close()
    fail.update(step=5, error=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "step_000005.h5"))
    needle = r"No space left on device \(writing dynamics/step_000005.h5, the capture of step 5,"
    with pytest.raises(OSError, match=needle) as info:
        train(cfg, tmp_path / "run", resume=True, progress=False)  # capture 0 redone; checkpoint 5 listed
    assert info.value.errno == errno.ENOSPC and info.value.filename == "step_000005.h5"
    assert sorted(_listed(tmp_path / "run")) == [0]
    assert [e["step"] for e in read_manifest(tmp_path / "run")["checkpoints"]] == [0, 5]

    fail["step"] = None
    train(cfg, tmp_path / "run", resume=True, progress=False)  # redoes the capture of the last checkpoint
    assert sorted(_listed(tmp_path / "run")) == [0, 5]


def test_resume_lists_a_capture_written_but_not_listed(tmp_path, fast_overrides, monkeypatch):
    real_list = Capturer._list

    def no_listing(self, record):
        assert threading.current_thread() is threading.main_thread()  # only the training thread writes the manifest
        if record.step == 5:
            raise RuntimeError("simulated crash before the listing")
        real_list(self, record)

    cfg = build_config(overrides=fast_overrides + SMALL_PROBE + ["steps=5"])
    with monkeypatch.context() as m:
        m.setattr(Capturer, "_list", no_listing)
        with pytest.raises(RuntimeError, match="simulated crash before the listing"):
            train(cfg, tmp_path / "run", progress=False)  # listed by close(): its error propagates as it is
    run = tmp_path / "run"
    written = sha256_file(_h5(run, 5))  # the file is complete, the manifest does not list it
    assert sorted(_listed(run)) == [0]
    train(cfg, run, resume=True, progress=False)  # nothing left to train: redoes the capture of step 5
    listed = _listed(run)
    assert sorted(listed) == [0, 5] and listed[5]["sha256"] == written == sha256_file(_h5(run, 5))


def test_close_while_unwinding_abandons_the_write_cleanly(tmp_path, fast_overrides, gated_writes):
    gate, log = gated_writes
    cfg = build_config(overrides=fast_overrides + SMALL_PROBE + ["steps=5"])
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.setup()  # the write of step 0 waits at the gate
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    try:
        raise RuntimeError("training failed")
    except RuntimeError:
        t.cleanup()  # an error is propagating: close() asks the writer to stop, then waits
    opener.join()
    assert ("write-done", 0) not in log  # stopped inside the file (CaptureCancelled), temporary file removed
    assert not (t.run_dir / "dynamics").exists() or not list((t.run_dir / "dynamics").iterdir())
    assert _listed(t.run_dir) == {}
    gate.set()
    train(cfg, t.run_dir, resume=True, progress=False)  # redoes the abandoned capture, then trains on
    assert sorted(_listed(t.run_dir)) == [0, 5]


def test_background_job_runs_one_at_a_time_and_hands_errors_back():
    job, order = BackgroundJob("test"), []
    release = threading.Event()

    def first(stop_requested):
        assert release.wait(TIMEOUT)
        order.append("first")

    job.submit(first, label="first")
    assert job.running
    threading.Timer(0.1, release.set).start()
    job.submit(lambda stop_requested: order.append("second"), label="second")  # waits for the first
    job.wait()
    assert order == ["first", "second"] and not job.pending

    def failing(stop_requested):
        raise KeyError("lost")

    job.submit(failing, label="third")
    with pytest.raises(KeyError) as info:
        job.wait()
    if sys.version_info >= (3, 11):
        assert any("third" in note for note in info.value.__notes__)
    job.wait()  # raised once only

    job.submit(lambda stop_requested: order.append(stop_requested()), label="fourth")
    job.wait()
    assert order[-1] is False


def test_errors_are_named_by_step_and_keep_os_error_types():
    e = _naming_step(
        PermissionError(errno.EACCES, "Permission denied", "/x/step_000100.h5"), 100, "dynamics/step_000100.h5"
    )
    assert type(e) is PermissionError and e.errno == errno.EACCES and e.filename == "/x/step_000100.h5"
    assert "step 100" in str(e)
    assert "step 7" in str(_naming_step(OSError("Unable to create file"), 7, "dynamics/step_000007.h5"))
    wrapped = _naming_step(json.JSONDecodeError("bad", "doc", 0), 3, "dynamics/step_000003.h5")
    assert isinstance(wrapped, CaptureError) and "step 3" in str(wrapped) and "JSONDecodeError" in str(wrapped)
