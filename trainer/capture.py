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

The pass cannot change training: it runs in eval mode (no dropout) inside
``torch.random.fork_rng``, computes gradients with ``torch.autograd.grad`` (no
``.grad`` is touched), restores the train/eval mode and never sees the
optimizer. Files are written atomically (temp file, fsync, rename) and listed
with their sha256 in the manifest's checkpoint entry.

Training does not wait for the file: the pass runs in the training thread (on
CUDA, copies to pinned host memory without a sync per tensor, one sync per
pass), then a background thread writes, hashes and lists the file while the
next steps train; the next checkpoint waits for it (:class:`Capturer`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from trainer.atomic import atomic_write, fault_point, sha256_file
from trainer.background import BackgroundJob
from trainer.config import ConfigError, TrainConfig
from trainer.names import select, step_dirname

#: Version of the capture file schema (``schema_version`` root attribute), documented in ``data/README.md``.
CAPTURE_SCHEMA_VERSION = 1
#: Directory of the capture files inside a run directory.
DYNAMICS_DIR = "dynamics"
#: Kinds (HDF5 groups) a capture file holds, besides ``probe``.
CAPTURE_KINDS = ("act", "act_in", "grad", "weight")
#: Target bytes of one HDF5 chunk.
CHUNK_BYTES = 1 << 18


def capture_relpath(step: int) -> str:
    """Path of the capture file of ``step`` relative to the run directory: ``dynamics/step_000100.h5``."""
    return f"{DYNAMICS_DIR}/{step_dirname(step)}.h5"


# --------------------------------------------------------------------------------------------------
# Sites


def _is_projection(module: nn.Module) -> bool:
    from trainer.relora import ReLoRALinear

    return isinstance(module, (nn.Linear, ReLoRALinear))


def activation_sites(model: nn.Module, patterns: Iterable[str] = ("**",)) -> list[tuple[str, str]]:
    """``(kind, name)`` of every activation captured, in model order, filtered by glob ``patterns``.

    Per layer: ``act`` of ``resid_pre``, ``attn.{q,k,v}``, ``act_in`` and ``act`` of ``attn.o``,
    ``act`` of ``resid_mid``, ``mlp.{gate,up}``, ``act_in`` and ``act`` of ``mlp.down``, ``resid_post``.
    """
    from trainer.names import parse

    modules = dict(model.named_modules())
    chosen = set(select([n for n in modules if n], list(patterns)))
    sites = []
    for name, module in modules.items():
        if name not in chosen or not name.startswith("layers."):
            continue
        try:
            parts = parse(name)
        except ValueError:
            continue  # lora_a/lora_b submodules, dropout ...
        if parts.sub is not None:
            continue
        if parts.block == "resid":
            sites.append(("act", name))
        elif parts.block in ("attn", "mlp") and parts.proj not in ("attn", "mlp") and _is_projection(module):
            if parts.proj in ("o", "down"):
                sites.append(("act_in", name))
            sites.append(("act", name))
    return sites


def matrix_names(model: nn.Module) -> list[str]:
    """Canonical names of every 2-D weight (``embed``, projections, ``lm_head``), in model order."""
    out = []
    for name, module in model.named_modules():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and name:
            out.append(name)
    return out


def gradient_names(model: nn.Module, patterns: Iterable[str] = ("layers.**",)) -> list[str]:
    """Names of the ``grad`` datasets: selected matrices, plus ``<name>.lora_a``/``.lora_b`` for wrapped ones."""
    from trainer.relora import ReLoRALinear

    out = []
    for name in select(matrix_names(model), list(patterns)):
        out.append(name)
        if isinstance(model.get_submodule(name), ReLoRALinear):
            out += [f"{name}.lora_a", f"{name}.lora_b"]
    return out


# --------------------------------------------------------------------------------------------------
# The probe set


@dataclass(frozen=True)
class ProbeSet:
    """The fixed inputs of every capture of a run.

    ``act_ids`` ``(N, T)`` validation sequences (window ids ``act_windows``) whose
    activations are captured at the flat token positions ``token_index`` (``n·T + t``,
    sorted); ``grad_ids``/``grad_targets`` ``(M, T)`` training sequences (windows
    ``grad_windows``) on which gradients are taken.
    """

    act_ids: torch.Tensor
    act_targets: torch.Tensor
    act_windows: np.ndarray
    token_index: np.ndarray
    grad_ids: torch.Tensor
    grad_targets: torch.Tensor
    grad_windows: np.ndarray
    sha256: str

    @property
    def seq_len(self) -> int:
        return int(self.act_ids.shape[1])

    def record(self) -> dict[str, Any]:
        """What the manifest stores about the probe set (``manifest["probe"]``)."""
        return {
            "schema_version": CAPTURE_SCHEMA_VERSION,
            "sha256": self.sha256,
            "seq_len": self.seq_len,
            "act": {"split": "val", "windows": [int(i) for i in self.act_windows],
                    "n_tokens": int(len(self.token_index)),
                    "token_index_sha256": hashlib.sha256(self.token_index.astype("<i8").tobytes()).hexdigest()},
            "grad": {"split": "train", "windows": [int(i) for i in self.grad_windows]},
        }


def choose_probe(cfg: TrainConfig, train: np.ndarray, val: np.ndarray) -> ProbeSet:
    """Draw the probe set from ``numpy.random.default_rng([capture.seed, ...])``; independent of ``cfg.seed``.

    Raises :class:`ConfigError` when a split has fewer windows than requested.
    """
    from trainer.data import get_windows, n_windows

    c, T = cfg.capture, cfg.context
    n_val, n_train = n_windows(val, T), n_windows(train, T)
    for split, have, want, key in (("validation", n_val, c.probe_sequences, "probe_sequences"),
                                   ("training", n_train, c.grad_sequences, "grad_sequences")):
        if have < want:
            raise ConfigError(f"capture.{key}={want} but the {split} split holds only {have} sequences of "
                              f"seq_len+1={T + 1} tokens; lower capture.{key}")
    act_windows = np.sort(np.random.default_rng([c.seed, 1]).choice(n_val, c.probe_sequences, replace=False))
    grad_windows = np.sort(np.random.default_rng([c.seed, 2]).choice(n_train, c.grad_sequences, replace=False))
    n_tok = c.probe_sequences * T
    if c.token_sample is None or c.token_sample >= n_tok:
        token_index = np.arange(n_tok, dtype=np.int64)
    else:
        token_index = np.sort(np.random.default_rng([c.seed, 3]).choice(n_tok, c.token_sample, replace=False)).astype(np.int64)
    act_ids, act_targets = get_windows(val, act_windows, T)
    grad_ids, grad_targets = get_windows(train, grad_windows, T)
    h = hashlib.sha256()
    for a in (act_ids, act_targets, grad_ids, grad_targets):
        h.update(a.numpy().astype("<i8").tobytes())
    h.update(token_index.astype("<i8").tobytes())
    return ProbeSet(act_ids, act_targets, act_windows, token_index, grad_ids, grad_targets, grad_windows, h.hexdigest())


# --------------------------------------------------------------------------------------------------
# The capture pass


@dataclass
class Captured:
    """One step's capture in host memory: ``{kind: {name: float32 array}}`` plus the losses of the pass.

    On CUDA the arrays are views of pinned (page-locked) host tensors, filled by
    non-blocking copies; the functions that return a ``Captured`` synchronise
    once before returning, so the arrays are complete.
    """

    data: dict[str, dict[str, np.ndarray]]
    probe_loss: float
    grad_loss: float


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _host_empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 CPU tensor of ``shape``, page-locked when ``device`` is CUDA (for async copies)."""
    return torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")


def _start_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` (any device, any float dtype) into the float32 host tensor ``dst``.

    The float32 conversion runs where ``src`` lives (on the GPU: before the
    transfer, so the pinned buffer is written by one DMA). From CUDA into pinned
    memory the copy is queued on the current stream and not waited for: call
    :func:`_synchronize` before reading ``dst``.
    """
    dst.copy_(src.detach().float(), non_blocking=dst.is_pinned())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the CPU to CUDA through pinned memory, without waiting for the device.

    (A plain ``.to("cuda")`` from pageable memory synchronises the stream: once per chunk it would stall the pass.)
    """
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (every :func:`_start_copy` before it); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@torch.no_grad()
def _activation_pass(model: nn.Module, probe: ProbeSet, sites: list[tuple[str, str]], *, device: torch.device,
                     batch_size: int) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """:func:`capture_activations` without its final synchronisation.

    Returns ``({kind: {name: (K, features) float32 host tensor}}, Σ_chunks loss·rows)`` as a 0-d
    float64 tensor on ``device``; on CUDA neither is valid before :func:`_synchronize`.
    """
    by_name: dict[str, list[str]] = {}
    for kind, name in sites:
        by_name.setdefault(name, []).append(kind)
    n_rows = len(probe.token_index)
    bufs: dict[tuple[str, str], torch.Tensor] = {}  # (kind, name) → (K, features), filled chunk by chunk
    where: dict[str, Any] = {}  # the current chunk: "rows" (its local token positions, on device) and "offset" (in K)

    def hook_for(name: str, kinds: list[str]):
        def hook(module, inputs, output):
            for kind in kinds:
                t = inputs[0] if kind == "act_in" else output
                flat = t.detach().reshape(-1, t.shape[-1])  # (b·T, features)
                rows = flat.index_select(0, where["rows"])  # (k, features), k sampled positions of this chunk
                if (kind, name) not in bufs:
                    bufs[(kind, name)] = _host_empty((n_rows, rows.shape[1]), device)
                o = where["offset"]
                _start_copy(bufs[(kind, name)][o:o + rows.shape[0]], rows)
        return hook

    # every input on the device before the first forward: no transfer (and no wait) between chunks
    T, chunks = probe.seq_len, _chunks(len(probe.act_ids), batch_size)
    act_ids, act_targets = _to_device(probe.act_ids, device), _to_device(probe.act_targets, device)
    local_rows = [_to_device(torch.from_numpy(probe.token_index[(probe.token_index >= s * T)
                                                                & (probe.token_index < e * T)] - s * T), device)
                  for s, e in chunks]  # per chunk: its sampled flat positions, relative to the chunk
    total = torch.zeros((), dtype=torch.float64, device=device)
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n, k)) for n, k in by_name.items()]
    try:
        offset = 0
        for (s, e), rows in zip(chunks, local_rows):
            where["rows"], where["offset"] = rows, offset
            # float64 sum of loss·rows on the device: the same value a float() per chunk gave, without its sync
            total += model.loss(act_ids[s:e], act_targets[s:e]).detach().double() * (e - s)
            offset += len(rows)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, torch.Tensor]] = {"act": {}, "act_in": {}}
    for kind, name in sites:  # model order, as the file stores them
        if (kind, name) not in bufs:
            raise RuntimeError(f"capture site {kind} {name!r} was not reached by the forward pass")
        out[kind][name] = bufs[(kind, name)]
    return out, total


@torch.no_grad()
def capture_activations(model: nn.Module, probe: ProbeSet, sites: list[tuple[str, str]], *, device: torch.device,
                        batch_size: int) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Forward the probe sequences in chunks of ``batch_size``; rows ``token_index`` of every site, float32.

    Returns ``({kind: {name: (K, features)}}, mean probe loss in nats/token)``. On
    CUDA every site is copied into pinned host memory without waiting, and the
    device is synchronised once at the end.
    """
    out, total = _activation_pass(model, probe, sites, device=device, batch_size=batch_size)
    _synchronize(device)
    return ({kind: {n: t.numpy() for n, t in d.items()} for kind, d in out.items()},
            float(total) / len(probe.act_ids))


def _gradient_pass(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, names: list[str], *,
                   device: torch.device, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`capture_gradients` without its final synchronisation.

    Returns ``({name: (out, in) float32 host tensor}, Σ_chunks loss·rows)`` as a 0-d float64
    tensor on ``device``; on CUDA neither is valid before :func:`_synchronize`.
    """
    from trainer.relora import ReLoRALinear

    params: dict[str, torch.Tensor] = {}
    wrapped: list[str] = []
    for name in names:
        if name.endswith((".lora_a", ".lora_b")):
            params[name] = model.get_submodule(name).weight
            continue
        module = model.get_submodule(name)
        if isinstance(module, ReLoRALinear) or not module.weight.requires_grad:
            wrapped.append(name)
        else:
            params[name] = module.weight
    total = torch.zeros((), dtype=torch.float64, device=device)
    if not names:
        return {}, total.fill_(float("nan"))
    sums: dict[str, torch.Tensor | None] = {n: None for n in names}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in wrapped]
    n = len(ids)
    ids, targets = _to_device(ids, device), _to_device(targets, device)  # one transfer per pass, no wait
    try:
        with torch.enable_grad():
            for s, e in _chunks(n, batch_size):
                seen.clear()
                loss = model.loss(ids[s:e], targets[s:e])
                total += loss.detach().double() * (e - s)  # no per-chunk sync (see _activation_pass)
                inputs = list(params.values()) + [seen[w][1] for w in wrapped]
                grads = torch.autograd.grad(loss * ((e - s) / n), inputs, allow_unused=True)
                for name, g in zip(list(params) + wrapped, grads):
                    if name in params:
                        g = torch.zeros_like(params[name]) if g is None else g
                        g = g.detach().float()
                    elif g is None:
                        w = model.get_submodule(name).weight
                        g = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                    else:
                        x = seen[name][0]
                        g_flat = g.detach().float().reshape(-1, g.shape[-1])  # (b·T, out)
                        g = g_flat.T @ x.float().reshape(-1, x.shape[-1])  # (out, in)
                    sums[name] = g if sums[name] is None else sums[name] + g
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    host: dict[str, torch.Tensor] = {}
    for name, g in sums.items():
        if device.type == "cuda":
            host[name] = _host_empty(tuple(g.shape), device)
            _start_copy(host[name], g)
        else:
            host[name] = g.detach().float()  # already a fresh CPU tensor: no copy
    return host, total


def capture_gradients(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, names: list[str], *,
                      device: torch.device, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """``dL/dW`` (out×in, float32) of the mean next-token loss over ``ids`` for each name of :func:`gradient_names`.

    Plain parameters (full-rank matrices, LoRA factors) use ``torch.autograd.grad``;
    a ReLoRA-wrapped matrix gets the gradient with respect to its effective weight,
    ``Σ_tokens g xᵀ``, from forward hooks on its input ``x`` and output (whose
    gradient ``g`` is asked of autograd too). No parameter's ``.grad`` is touched.
    The caller puts the model in eval mode (LoRA dropout off, so the effective
    weight is exactly what acts on ``x``). ``ids``/``targets`` are ``(M, T)``
    token ids; the loss returned is the mean over them in nats/token (NaN when
    ``names`` is empty). On CUDA the sums are copied into pinned host memory
    without waiting and the device is synchronised once at the end.
    """
    host, total = _gradient_pass(model, ids, targets, names, device=device, batch_size=batch_size)
    _synchronize(device)
    return {k: v.numpy() for k, v in host.items()}, float(total) / len(ids) if names else float("nan")


def capture_model(model: nn.Module, probe: ProbeSet, cfg: TrainConfig, *, device: torch.device,
                  batch_size: int) -> Captured:
    """The whole extra pass, with no effect on training: eval mode, forked RNG, no ``.grad`` left behind.

    On CUDA every captured tensor is copied into pinned host memory as soon as
    it is computed, without waiting; the device is synchronised once, at the end.
    """
    from trainer.relora import relora_modules

    c = cfg.capture
    was_training = model.training
    grads_before = {id(p): p.grad for p in model.parameters()}
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices, enabled=True):
            model.eval()
            acts, act_total = _activation_pass(model, probe, activation_sites(model, c.act_names),
                                               device=device, batch_size=batch_size)
            names = gradient_names(model, c.grad_names)
            grads, grad_total = _gradient_pass(model, probe.grad_ids, probe.grad_targets, names, device=device,
                                               batch_size=batch_size)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = grads_before.get(id(p))
    factors: dict[str, torch.Tensor] = {}
    for name, m in relora_modules(model).items():
        for leaf in ("lora_a", "lora_b"):
            w = getattr(m, leaf).weight
            factors[f"{name}.{leaf}"] = _host_empty(tuple(w.shape), device)
            _start_copy(factors[f"{name}.{leaf}"], w)
    _synchronize(device)  # the one wait of the pass: every copy above is complete after it
    data = {kind: {n: t.numpy() for n, t in d.items()} for kind, d in (*acts.items(), ("grad", grads),
                                                                       ("weight", factors))}
    grad_loss = float(grad_total) / len(probe.grad_ids) if names else float("nan")
    return Captured(data, float(act_total) / len(probe.act_ids), grad_loss)


# --------------------------------------------------------------------------------------------------
# Writing


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Row blocks of about :data:`CHUNK_BYTES`, whole rows (so a full-matrix read touches few chunks)."""
    rows = max(1, min(shape[0], CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * itemsize)))
    return (rows,) + tuple(shape[1:])


def _dataset_kwargs(cfg: TrainConfig, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    c = cfg.capture
    kw: dict[str, Any] = {"chunks": _chunk_shape(shape, np.dtype(dtype).itemsize), "fletcher32": True}
    if c.compression == "gzip":
        kw.update(compression="gzip", compression_opts=c.compression_level, shuffle=True)
    elif c.compression == "lzf":
        kw.update(compression="lzf", shuffle=True)
    return kw


def _as_stored(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """Cast to the storage dtype; keep float32 when float16 would overflow a finite value (returns ``fell_back``)."""
    if dtype == "float32":
        return arr.astype(np.float32, copy=False), False
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(arr).all():
        return arr.astype(np.float32, copy=False), True
    return half, False


class CaptureCancelled(Exception):
    """A capture write stopped early on request (``should_stop``); its temporary file is removed, nothing renamed."""


def write_capture(path: str | Path, captured: Captured, probe: ProbeSet, cfg: TrainConfig,
                  attrs: dict[str, Any], *, should_stop: Callable[[], bool] | None = None) -> None:
    """Write one capture file atomically (temp file in the same directory, fsync, rename).

    ``should_stop`` is asked before every dataset; when it returns true the write
    raises :class:`CaptureCancelled` and ``path`` is left as it was. Safe to call
    from a background thread: it reads ``captured`` and ``probe`` only.
    """
    import h5py

    c = cfg.capture

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["schema_version"] = CAPTURE_SCHEMA_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["probe_loss"] = captured.probe_loss
            f.attrs["grad_loss"] = captured.grad_loss
            f.attrs["probe_sha256"] = probe.sha256
            f.attrs["act_dtype"], f.attrs["grad_dtype"] = c.act_dtype, c.grad_dtype
            g = f.create_group("probe", track_order=True)
            g.create_dataset("input_ids", data=probe.act_ids.numpy().astype(np.int32))
            g.create_dataset("windows", data=probe.act_windows.astype(np.int64))
            g.create_dataset("token_index", data=probe.token_index.astype(np.int64))
            g.create_dataset("grad_input_ids", data=probe.grad_ids.numpy().astype(np.int32))
            g.create_dataset("grad_windows", data=probe.grad_windows.astype(np.int64))
            for i, kind in enumerate(CAPTURE_KINDS):
                if i == len(CAPTURE_KINDS) // 2:
                    f.flush()
                    fault_point("capture-write", int(attrs.get("step", -1)))  # test hook: a crash mid-file
                group = f.create_group(kind, track_order=True)
                dtype = c.act_dtype if kind in ("act", "act_in") else c.grad_dtype if kind == "grad" else "float32"
                for name, arr in captured.data.get(kind, {}).items():
                    if should_stop is not None and should_stop():
                        raise CaptureCancelled(f"writing {Path(path).name} was cancelled")
                    stored, fell_back = _as_stored(arr, dtype)
                    ds = group.create_dataset(name, data=stored, **_dataset_kwargs(cfg, stored.shape, stored.dtype))
                    if fell_back:
                        ds.attrs["float16_overflow"] = True

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Volume


def estimate_bytes(cfg: TrainConfig) -> dict[str, int]:
    """Uncompressed bytes of one capture file's datasets under ``cfg`` (full-rank; ReLoRA adds the small factors).

    Keys ``act`` (activations at the token sample), ``grad`` and ``total``.
    """
    m, c = cfg.model, cfg.capture
    hd = m.d_model // m.n_heads
    q, kv, d, f = m.n_heads * hd, m.n_kv_heads * hd, m.d_model, m.d_mlp
    # (name, features) of every site of one layer, as activation_sites lists them (act_in of o and down included)
    per_layer = [("resid_pre", d), ("attn.q", q), ("attn.k", kv), ("attn.v", kv), ("attn.o", q), ("attn.o", d),
                 ("resid_mid", d), ("mlp.gate", f), ("mlp.up", f), ("mlp.down", f), ("mlp.down", d), ("resid_post", d)]
    sites = [(f"layers.{i}.{leaf}", w) for i in range(m.n_layers) for leaf, w in per_layer]
    chosen = set(select([n for n, _ in sites], list(c.act_names)))
    width = sum(w for n, w in sites if n in chosen)
    n_tok = c.probe_sequences * cfg.context
    tokens = n_tok if c.token_sample is None else min(c.token_sample, n_tok)
    act = tokens * width * np.dtype(c.act_dtype).itemsize
    mats = {"embed": m.vocab_size * d, "lm_head": m.vocab_size * d}
    for i in range(m.n_layers):
        mats.update({f"layers.{i}.attn.q": q * d, f"layers.{i}.attn.k": kv * d, f"layers.{i}.attn.v": kv * d,
                     f"layers.{i}.attn.o": d * q, f"layers.{i}.mlp.gate": f * d, f"layers.{i}.mlp.up": f * d,
                     f"layers.{i}.mlp.down": d * f})
    grad = sum(mats[k] for k in select(list(mats), list(c.grad_names))) * np.dtype(c.grad_dtype).itemsize
    return {"act": int(act), "grad": int(grad), "total": int(act + grad)}


# --------------------------------------------------------------------------------------------------
# Trainer integration


def _finite(x: float | None) -> float:
    return float("nan") if x is None or not math.isfinite(float(x)) else float(x)


class CaptureError(RuntimeError):
    """A capture could not be written; raised in the training thread for a background write, naming the step."""


def _naming_step(error: Exception, step: int, rel: str) -> Exception:
    """``error`` of a background write, re-expressed for the training thread with the step it concerns.

    An :class:`OSError` (disk full, permissions ...) stays an ``OSError`` of the
    same class, errno and file name, its message extended, so code that reports
    I/O errors (the CLI's one-line ``error:``) handles it as before; anything else
    becomes a :class:`CaptureError`. The caller chains the original.
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
    return CaptureError(f"the capture of step {step} ({rel}) failed in the background writer: "
                        f"{type(error).__name__}: {error}")


class Capturer:
    """The trainer's side of capture: the probe set, when to capture, writing and listing files.

    At a due checkpoint (:meth:`on_checkpoint`) the capture *pass* runs in the
    training thread; on CUDA its tensors reach pinned host memory by
    non-blocking copies and one synchronisation. The *write* then runs on a
    background thread while training goes on: the HDF5 file (temporary name,
    fsync, rename), its sha256, and the ``dynamics`` record in the manifest
    entry (``background=False``: all in the calling thread). One write at a
    time: a new capture first waits for the previous write, so the host holds
    at most one step's captured tensors (the one being written).

    **One manifest writer at a time.** The training thread rewrites
    ``manifest.json`` in ``checkpoint.save_checkpoint``; the trainer calls
    :meth:`flush` just before (at the start of ``Trainer._write_checkpoint``),
    so the background :meth:`_list` (read the manifest, add the record, write it)
    only runs while the training thread is between two checkpoints, and neither
    loses the other's change. Any other code that writes the manifest while a
    capture may be pending must call :meth:`flush` first.

    **Crash safety is that of a synchronous write.** A kill at any moment leaves
    the capture file absent, present but unlisted (``on_resume`` redoes it), or
    complete and listed; never listed and partial. Because the next checkpoint
    waits for the write, an unlisted capture always belongs to the last listed
    checkpoint, the one a resume starts from. An error of a background write is
    raised in the training thread by the next :meth:`flush` (the next
    checkpoint) or :meth:`close`, naming the step; the failed capture is not
    listed.
    """

    def __init__(self, cfg: TrainConfig, probe: ProbeSet, run_dir: Path, *, background: bool = True) -> None:
        self.cfg, self.probe, self.run_dir = cfg, probe, Path(run_dir)
        self.background = background
        self.code_version: Any = None
        self._writer = BackgroundJob("capture writer")
        self._pending: tuple[int, str] | None = None  # (step, relative path) of the write handed to the writer

    @classmethod
    def for_trainer(cls, trainer: Any, *, background: bool = True) -> "Capturer | None":
        """Build from a set-up trainer (``cfg``, ``data``, ``run_dir``); ``None`` when capture is disabled."""
        if not trainer.cfg.capture.enabled:
            return None
        return cls(trainer.cfg, choose_probe(trainer.cfg, trainer.data.train, trainer.data.val), trainer.run_dir,
                   background=background)

    def due(self, step: int) -> bool:
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

    def _pass(self, trainer: Any) -> tuple[Captured, dict[str, Any], float]:
        """Run the capture pass on ``trainer``'s model now; returns the host tensors, the file's attributes, seconds."""
        from trainer.train import lr_at

        cfg, step = self.cfg, trainer.step
        t0 = time.perf_counter()
        captured = capture_model(trainer.model, self.probe, cfg, device=trainer.device,
                                 batch_size=max(1, cfg.micro_batch_size))
        attrs = {
            "step": step,
            "tokens_seen": int(trainer.tokens_seen),
            "lr": lr_at(cfg, max(step - 1, 0)),
            "loss": _finite(trainer.last_loss),
            "val_loss": _finite(trainer.last_val_loss),
            "method": cfg.method,
            "wrapped": bool(trainer.wrapped),
            "merges": int(getattr(trainer, "merges", 0)),
            "lora_scale": cfg.relora.scale if trainer.wrapped else float("nan"),
            "seed": cfg.seed,
            "config": json.dumps(cfg.to_dict()),
            "code_version": json.dumps(self.code_version),
        }
        return captured, attrs, time.perf_counter() - t0

    def _write(self, step: int, captured: Captured, attrs: dict[str, Any], pass_seconds: float, *,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Write the file of ``step``; returns its manifest record (``seconds``: the pass plus the write)."""
        t0 = time.perf_counter()
        rel = capture_relpath(step)
        path = self.run_dir / rel
        write_capture(path, captured, self.probe, self.cfg, attrs, should_stop=should_stop)
        fault_point("before-capture-manifest", step)  # test hook: renamed, not yet listed
        return {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "seconds": round(pass_seconds + time.perf_counter() - t0, 3)}

    def capture(self, trainer: Any) -> dict[str, Any]:
        """Capture ``trainer``'s model at its current step into ``dynamics/step_XXXXXX.h5``; returns the manifest record.

        Synchronous: the file exists when this returns (a pending background write
        is waited for first). It is not listed in the manifest (see :meth:`submit`).
        """
        self.flush()
        captured, attrs, seconds = self._pass(trainer)
        return self._write(trainer.step, captured, attrs, seconds)

    def submit(self, trainer: Any) -> None:
        """Capture ``trainer``'s model now; write the file and list it in the manifest entry of its step.

        The pass runs here, after waiting for the previous write (whose error, if
        any, is raised here). With ``background`` the write and the listing are
        handed to the writer thread and this returns at once; :meth:`flush` waits
        for them.
        """
        self.flush()
        step = trainer.step
        captured, attrs, seconds = self._pass(trainer)
        if not self.background:
            self._list(step, self._write(step, captured, attrs, seconds))
            return

        def job(stop_requested: Callable[[], bool]) -> None:
            try:
                record = self._write(step, captured, attrs, seconds, should_stop=stop_requested)
            except CaptureCancelled:
                return  # abandoned by close(): nothing renamed, nothing listed; on_resume redoes it
            self._list(step, record)

        self._pending = (step, capture_relpath(step))
        self._writer.submit(job, label=f"capture of step {step}")

    def on_checkpoint(self, trainer: Any) -> None:
        """After a checkpoint is listed: capture if due (:meth:`submit`: written and listed in the background)."""
        if self.due(trainer.step):
            self.submit(trainer)

    def on_resume(self, trainer: Any, manifest: dict[str, Any]) -> None:
        """After loading a checkpoint: drop temp leftovers; redo a capture that a crash left unlisted."""
        from trainer.checkpoint import read_manifest, write_manifest

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
        entry = next((c for c in read_manifest(self.run_dir)["checkpoints"] if c["step"] == trainer.step), None)
        if entry is not None and self.due(trainer.step) and "dynamics" not in entry:
            self.on_checkpoint(trainer)

    def flush(self) -> None:
        """Block until the capture handed to the writer (if any) is written and listed.

        Re-raises its error here: an ``OSError`` as the same class and errno, any
        other error as :class:`CaptureError`, the message naming the step (the
        original is chained). The failed capture is not listed.
        """
        if self._pending is None:
            return
        step, rel = self._pending
        try:
            self._writer.wait()  # a KeyboardInterrupt while waiting leaves the write pending
        except Exception as e:
            self._pending = None
            raise _naming_step(e, step, rel) from e
        self._pending = None

    def close(self, *, abandon: bool | None = None) -> None:
        """Finish the pending write; the trainer calls this from ``cleanup``, after success or an error.

        ``abandon`` (default: whether an exception is being handled, i.e. the
        trainer is unwinding from an error) asks the writer to stop at its next
        dataset: its temporary file is removed and nothing is listed (``on_resume``
        redoes the capture); a file already renamed is still hashed and listed.
        An error of the write is then a warning, so the original error is the one
        that propagates. Without ``abandon`` this is :meth:`flush`.
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

    def _list(self, step: int, record: dict[str, Any]) -> None:
        """Add ``record`` as ``dynamics`` of the manifest entry of ``step`` (read, modify, atomic write).

        Runs on the writer thread; see the class docstring for why it never races the trainer's own writes.
        """
        from trainer.checkpoint import read_manifest, write_manifest

        manifest = read_manifest(self.run_dir)
        for entry in manifest["checkpoints"]:
            if entry["step"] == step:
                entry["dynamics"] = record
                break
        else:  # the checkpoint is not listed (cannot happen from the trainer): keep the file unlisted
            warnings.warn(f"capture at step {step} has no checkpoint entry in the manifest", stacklevel=2)
            return
        write_manifest(self.run_dir, manifest, fault=f"capture-manifest-write@{step}")
