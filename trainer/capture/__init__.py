"""Dense learning-dynamics capture: hooks keyed by module path → ``dynamics/step_XXXXXX.h5``.

At every capture step (``capture.every``, default every checkpoint) the trainer
runs one extra, off-graph pass over a **fixed probe set** and writes one HDF5
file per step (schema: ``data/README.md``, "Dynamics capture files"):

* activations of ``probe_sequences`` validation sequences, at every position,
  of which a fixed, recorded sample of ``token_sample`` token positions is
  stored as ``(tokens, features)`` matrices: the residual stream
  (``layers.{i}.resid_{pre,mid,post}``), every projection's output
  (``layers.{i}.attn.{q,k,v,o}``, ``layers.{i}.mlp.{gate,up,down}``; ``act`` of
  ``attn.o`` is the attention output), and the inputs of ``attn.o`` (the heads'
  mixed values) and ``mlp.down`` (the SwiGLU hidden after the gate);
* gradients ``dL/dW`` of the mean next-token loss on ``grad_sequences`` training
  sequences for every selected matrix. For a ReLoRA-wrapped matrix ``grad`` is
  the gradient with respect to the *effective* weight ``W + s·B·A``,
  ``Σ_tokens g xᵀ`` from the module's input ``x`` and output gradient ``g``,
  so both methods compare key for key; the factors' gradients are
  ``<name>.lora_a`` / ``<name>.lora_b``;
* the LoRA factors themselves (``weight`` kind, ``<name>.lora_a``/``.lora_b``).

Three modules, imported in this order (each only by the ones after it):

* :mod:`trainer.capture.extract` — the pass that turns a model into host tensors:
  sites, the probe set, :func:`capture_model`. It cannot change training: eval
  mode (no dropout), a forked RNG, gradients by ``torch.autograd.grad`` (no
  ``.grad`` is touched), the train/eval mode restored, no optimizer.
* :mod:`trainer.capture.store` — the HDF5 file, written atomically (temp file,
  fsync, rename); its schema version and kinds come from :mod:`trainer.run_format`,
  which the reader ``dynamics.io`` shares.
* :mod:`trainer.capture.capturer` — running it during training
  (:class:`Capturer`, fed a :class:`TrainingState`): the pass in the training
  thread (on CUDA, copies to pinned host memory, one sync per pass), the file
  written and hashed by a background thread while the next steps train, its
  record listed in the manifest by the training thread; the next checkpoint
  waits for it.

Every name is importable from ``trainer.capture`` itself.
"""

from __future__ import annotations

from trainer.capture.capturer import Capturer, CaptureRecord, TrainingState
from trainer.capture.extract import (
    Captured,
    ProbeSet,
    activation_sites,
    capture_activations,
    capture_gradients,
    capture_model,
    choose_probe,
    gradient_names,
    matrix_names,
)
from trainer.capture.store import CHUNK_BYTES, CaptureCancelled, estimate_bytes, write_capture
from trainer.errors import CaptureError
from trainer.run_format import CAPTURE_KINDS, CAPTURE_SCHEMA_VERSION, DYNAMICS_DIR, capture_relpath

__all__ = [
    # the run format (trainer.run_format)
    "CAPTURE_SCHEMA_VERSION",
    "CAPTURE_KINDS",
    "DYNAMICS_DIR",
    "capture_relpath",
    # the pass (trainer.capture.extract)
    "activation_sites",
    "matrix_names",
    "gradient_names",
    "ProbeSet",
    "choose_probe",
    "Captured",
    "capture_activations",
    "capture_gradients",
    "capture_model",
    # the file (trainer.capture.store)
    "CHUNK_BYTES",
    "CaptureCancelled",
    "write_capture",
    "estimate_bytes",
    # during training (trainer.capture.capturer)
    "TrainingState",
    "CaptureRecord",
    "Capturer",
    "CaptureError",
]
