"""Capture during training: when to capture, the pass in the training thread, the file in the background.

The trainer hands a :class:`Capturer` its model, its device and a
:class:`TrainingState` (the few numbers a capture file records) at every
checkpoint; the capturer decides whether the step is due, runs the pass
(:func:`trainer.capture.extract.capture_model`) and has the file written
(:func:`trainer.capture.store.write_capture`) by a background thread, which
hands back a :class:`CaptureRecord`. Only the training thread writes
``manifest.json``: it lists the record at its next :meth:`Capturer.poll`,
:meth:`~Capturer.flush` (every checkpoint starts with one) or
:meth:`~Capturer.close`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.atomic import fault_point, sha256_file
from trainer.background import BackgroundJob
from trainer.capture.extract import Captured, ProbeSet, capture_model, choose_probe
from trainer.capture.store import CaptureCancelled, write_capture
from trainer.checkpoint import read_manifest, write_manifest
from trainer.config import TrainConfig
from trainer.errors import CaptureError, ConfigError
from trainer.model import Decoder
from trainer.run_format import DYNAMICS_DIR, capture_relpath

__all__ = ["TrainingState", "CaptureRecord", "Capturer"]


@dataclass(frozen=True)
class TrainingState:
    """What a capture file records about training at its step (root attributes of ``dynamics/step_*.h5``).

    ``step``: optimizer updates done; ``tokens_seen``: training tokens consumed
    so far (all processes); ``loss``: mean training loss of the last update in
    nats/token (``None`` before the first); ``val_loss``: the last validation
    loss in nats/token (``None`` before the first evaluation); ``lr``: learning
    rate of the last update (of update 0 at step 0); ``merges``: ReLoRA merges
    done; ``wrapped``: whether the projections are ReLoRA-wrapped now;
    ``lora_scale``: the adapters' ``alpha / r`` when wrapped, NaN otherwise.
    """

    step: int
    tokens_seen: int
    loss: float | None
    val_loss: float | None
    lr: float
    merges: int
    wrapped: bool
    lora_scale: float


@dataclass(frozen=True)
class CaptureRecord:
    """A written capture file, as the manifest lists it (``dynamics`` of the checkpoint entry of ``step``).

    ``path`` is relative to the run directory; ``bytes`` the file's size;
    ``seconds`` the pass plus the write (not the wait in between).
    """

    step: int
    path: str
    sha256: str
    bytes: int
    seconds: float

    def manifest_entry(self) -> dict[str, Any]:
        """The record as stored in the manifest: ``{"path", "sha256", "bytes", "seconds"}``."""
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "seconds": self.seconds}


def _finite(x: float | None) -> float:
    return float("nan") if x is None or not math.isfinite(float(x)) else float(x)


def _naming_step(error: Exception, step: int, rel: str) -> Exception:
    """``error`` of a background write, re-expressed for the training thread with the step it concerns.

    An :class:`OSError` (disk full, permissions ...) stays an ``OSError`` of the
    same class, errno and file name, its message extended, so code that reports
    I/O errors (the CLI's one-line ``error:``) handles it as before; anything else
    becomes a :class:`~trainer.errors.CaptureError`. The caller chains the original.
    """
    if isinstance(error, OSError):
        where = f"writing {rel}, the capture of step {step}, in the background"
        try:
            if error.errno is not None:
                extra = (error.filename,) if error.filename is not None else ()
                return type(error)(error.errno, f"{error.strerror} ({where})", *extra)
            return type(error)(f"{error} ({where})")
        except Exception:  # noqa: BLE001 - an OSError subclass with another constructor: wrap it instead
            pass
    return CaptureError(
        f"the capture of step {step} ({rel}) failed in the background writer: {type(error).__name__}: {error}"
    )


class Capturer:
    """The trainer's side of capture: the probe set, when to capture, writing files and listing them.

    At a due checkpoint (:meth:`on_checkpoint`) the capture *pass* runs in the
    training thread; on CUDA its tensors reach pinned host memory by
    non-blocking copies and one synchronisation. The *write* then runs on a
    background thread while training goes on: the HDF5 file (temporary name,
    fsync, rename) and its sha256, handed back as a :class:`CaptureRecord`
    (``background=False``: written in the calling thread). One write at a
    time: a new capture first waits for the previous write, so the host holds
    at most one step's captured tensors (the one being written).

    **Only the training thread writes the manifest.** The writer thread never
    touches ``manifest.json``; the training thread lists a finished write's
    record (read the manifest, add the record, atomic write) in :meth:`poll`
    (the trainer calls it after every step; it never waits), :meth:`flush`
    (the trainer calls it at the start of every checkpoint, before
    ``checkpoint.save_checkpoint`` rewrites the manifest) and :meth:`close`.

    **Crash safety is that of a synchronous write.** A kill at any moment leaves
    the capture file absent, present but unlisted (``on_resume`` redoes it), or
    complete and listed; never listed and partial (the file is renamed into
    place before its record exists). Because every checkpoint first waits for
    and lists the pending capture, an unlisted capture always belongs to the
    last listed checkpoint, the one a resume starts from. An error of a
    background write is raised in the training thread by the next
    :meth:`flush` (the next checkpoint) or :meth:`close`, naming the step; the
    failed capture is not listed.
    """

    def __init__(self, cfg: TrainConfig, probe: ProbeSet, run_dir: str | Path, *, background: bool = True) -> None:
        self.cfg, self.probe, self.run_dir = cfg, probe, Path(run_dir)
        self.background = background
        self.code_version: Any = None
        self._writer: BackgroundJob[CaptureRecord | None] = BackgroundJob("capture writer")
        self._pending: tuple[int, str] | None = None  # (step, relative path) of the write handed to the writer

    @classmethod
    def for_run(
        cls, cfg: TrainConfig, train: np.ndarray, val: np.ndarray, run_dir: str | Path, *, background: bool = True
    ) -> Capturer | None:
        """The capturer of a run on token streams ``train``/``val`` (1-D ids); ``None`` when capture is disabled.

        Draws the probe set (:func:`~trainer.capture.extract.choose_probe`; a
        :class:`~trainer.errors.ConfigError` when a split is too short).
        """
        if not cfg.capture.enabled:
            return None
        return cls(cfg, choose_probe(cfg, train, val), run_dir, background=background)

    def due(self, step: int) -> bool:
        """Whether ``step`` is captured (at a checkpoint): every ``capture.every`` steps, and the last step."""
        every = self.cfg.capture.every
        return every is None or step % every == 0 or step == self.cfg.steps

    def describe(self, manifest: dict[str, Any]) -> None:
        """Record the probe set (window indices, token sample hash, sha256) in a new run's manifest."""
        manifest["probe"] = self.probe.record()
        self.code_version = manifest.get("code_version")

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """On resume: the stored probe set must be the one this code draws (else the run's captures would differ)."""
        stored = manifest.get("probe")
        if stored is not None and stored.get("sha256") != self.probe.sha256:
            raise ConfigError(
                f"{self.run_dir}: the run's probe set (sha256 {str(stored.get('sha256'))[:12]}…) differs from the one "
                f"drawn now ({self.probe.sha256[:12]}…); captures would not be comparable. Use a new run directory"
            )

    # -- the pass (training thread) and the write (any thread) ----------------------------------------

    def _pass(
        self, model: Decoder, state: TrainingState, device: torch.device
    ) -> tuple[Captured, dict[str, Any], float]:
        """Run the capture pass on ``model`` now; returns the host tensors, the file's root attributes, seconds."""
        cfg = self.cfg
        t0 = time.perf_counter()
        captured = capture_model(model, self.probe, cfg, device=device, batch_size=max(1, cfg.micro_batch_size))
        attrs = {
            "step": state.step,
            "tokens_seen": int(state.tokens_seen),
            "lr": float(state.lr),
            "loss": _finite(state.loss),
            "val_loss": _finite(state.val_loss),
            "method": cfg.method,
            "wrapped": bool(state.wrapped),
            "merges": int(state.merges),
            "lora_scale": float(state.lora_scale),
            "seed": cfg.seed,
            "config": json.dumps(cfg.to_dict()),
            "code_version": json.dumps(self.code_version),
        }
        return captured, attrs, time.perf_counter() - t0

    def _write(
        self,
        step: int,
        captured: Captured,
        attrs: dict[str, Any],
        pass_seconds: float,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> CaptureRecord:
        """Write the file of ``step`` (any thread); returns its record (``seconds``: the pass plus the write)."""
        t0 = time.perf_counter()
        rel = capture_relpath(step)
        path = self.run_dir / rel
        write_capture(path, captured, self.probe, self.cfg, attrs, should_stop=should_stop)
        fault_point("before-capture-manifest", step)  # test hook: renamed, not yet listed
        return CaptureRecord(
            step=step,
            path=rel,
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
            seconds=round(pass_seconds + time.perf_counter() - t0, 3),
        )

    def capture(self, model: Decoder, state: TrainingState, device: torch.device) -> CaptureRecord:
        """Capture ``model`` at ``state.step`` into ``dynamics/step_XXXXXX.h5``; returns the file's record.

        Synchronous: the file exists when this returns (a pending background write
        is waited for, and listed, first). It is not listed in the manifest (see :meth:`submit`).
        """
        self.flush()
        captured, attrs, seconds = self._pass(model, state, device)
        return self._write(state.step, captured, attrs, seconds)

    def submit(self, model: Decoder, state: TrainingState, device: torch.device) -> None:
        """Capture ``model`` now; write the file and list it in the manifest entry of ``state.step``.

        The pass runs here, after waiting for (and listing) the previous write,
        whose error, if any, is raised here. With ``background`` the write is
        handed to the writer thread and this returns at once; the record is
        listed by the next :meth:`poll`, :meth:`flush` or :meth:`close`.
        Without, the file is written and listed before this returns.
        """
        self.flush()
        step = state.step
        captured, attrs, seconds = self._pass(model, state, device)
        if not self.background:
            self._list(self._write(step, captured, attrs, seconds))
            return

        def job(stop_requested: Callable[[], bool]) -> CaptureRecord | None:
            try:
                return self._write(step, captured, attrs, seconds, should_stop=stop_requested)
            except CaptureCancelled:
                return None  # abandoned by close(): nothing renamed, nothing to list; on_resume redoes it

        self._pending = (step, capture_relpath(step))
        self._writer.submit(job, label=f"capture of step {step}")

    def on_checkpoint(self, model: Decoder, state: TrainingState, device: torch.device) -> None:
        """After a checkpoint is listed: capture if due (:meth:`submit`: written in the background)."""
        if self.due(state.step):
            self.submit(model, state, device)

    def on_resume(self, model: Decoder, state: TrainingState, device: torch.device, manifest: dict[str, Any]) -> None:
        """After loading a checkpoint: drop temp leftovers; redo a capture that a crash left unlisted."""
        self.flush()  # (nothing is pending in a fresh capturer; the manifest is written below)
        self.check_manifest(manifest)
        self.code_version = manifest.get("code_version")
        if "probe" not in manifest:  # a run started before capture existed
            current = read_manifest(self.run_dir)
            current["probe"] = self.probe.record()
            write_manifest(self.run_dir, current)
        d = self.run_dir / DYNAMICS_DIR
        if d.exists():
            for leftover in d.glob(".step_*.tmp"):
                leftover.unlink(missing_ok=True)
        entry = next((c for c in read_manifest(self.run_dir)["checkpoints"] if c["step"] == state.step), None)
        if entry is not None and self.due(state.step) and "dynamics" not in entry:
            self.on_checkpoint(model, state, device)

    # -- collecting the writer's record (training thread) -----------------------------------------------

    def poll(self) -> None:
        """List the pending capture if its write has finished; never waits. Raises as :meth:`flush` does."""
        if self._pending is not None and self._writer.finished:
            self.flush()

    def flush(self) -> None:
        """Block until the capture handed to the writer (if any) is written, then list it in the manifest.

        Re-raises a failed write's error here: an ``OSError`` as the same class
        and errno, any other error as :class:`~trainer.errors.CaptureError`, the
        message naming the step (the original is chained). The failed capture is
        not listed. An error while listing (the manifest write) propagates as it
        is; the capture then stays unlisted, and a resume redoes it.
        """
        if self._pending is None:
            return
        step, rel = self._pending
        try:
            record = self._writer.wait()  # a KeyboardInterrupt while waiting leaves the write pending
        except Exception as e:
            self._pending = None
            raise _naming_step(e, step, rel) from e
        self._pending = None
        if record is not None:
            self._list(record)

    def close(self, *, abandon: bool | None = None) -> None:
        """Finish the pending write and list it; the trainer calls this from ``cleanup``, after success or an error.

        ``abandon`` (default: whether an exception is being handled, i.e. the
        trainer is unwinding from an error) asks the writer to stop at its next
        dataset: its temporary file is removed and nothing is listed (``on_resume``
        redoes the capture); a file already renamed is still listed. An error of
        the write or the listing is then a warning, so the original error is the
        one that propagates. Without ``abandon`` this is :meth:`flush`.
        """
        if abandon is None:
            abandon = sys.exc_info()[1] is not None
        if not abandon:
            self.flush()
            return
        self._writer.cancel()
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - reported, not raised: another error is already propagating
            warnings.warn(f"{e}; not listed (`--resume` redoes it)", stacklevel=2)

    def _list(self, record: CaptureRecord) -> None:
        """Add ``record`` as ``dynamics`` of the manifest entry of its step (read, modify, atomic write).

        Called in the training thread only (the one that writes the manifest), so
        it never races ``checkpoint.save_checkpoint``.
        """
        manifest = read_manifest(self.run_dir)
        for entry in manifest["checkpoints"]:
            if entry["step"] == record.step:
                entry["dynamics"] = record.manifest_entry()
                break
        else:  # the checkpoint is not listed (cannot happen from the trainer): keep the file unlisted
            warnings.warn(f"capture at step {record.step} has no checkpoint entry in the manifest", stacklevel=2)
            return
        write_manifest(self.run_dir, manifest, fault=f"capture-manifest-write@{record.step}")
