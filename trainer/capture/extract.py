"""The capture pass: a model and the fixed probe set → host tensors (activations, gradients, LoRA factors).

Nothing here touches a file or the optimizer. :func:`choose_probe` draws the
run's fixed inputs (:class:`ProbeSet`); :func:`activation_sites` and
:func:`gradient_names` say what is captured, under canonical names;
:func:`capture_model` runs the whole extra pass and returns a
:class:`Captured` (``{kind: {name: float32 array}}``), which
:mod:`trainer.capture.store` writes.

The pass cannot change training: it runs in eval mode (no dropout) inside
``torch.random.fork_rng``, computes gradients with ``torch.autograd.grad`` (no
``.grad`` is touched) and restores the train/eval mode. On CUDA every tensor
reaches pinned host memory by a non-blocking copy, with one synchronisation
per pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.data import get_windows, n_windows
from trainer.errors import ConfigError
from trainer.model import Decoder
from trainer.names import parse, select
from trainer.relora import ReLoRALinear, relora_modules
from trainer.run_format import CAPTURE_SCHEMA_VERSION

__all__ = [
    "activation_sites",
    "matrix_names",
    "gradient_names",
    "ProbeSet",
    "choose_probe",
    "Captured",
    "capture_activations",
    "capture_gradients",
    "capture_model",
]


# --------------------------------------------------------------------------------------------------
# Sites


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ReLoRALinear))


def activation_sites(model: nn.Module, patterns: Iterable[str] = ("**",)) -> list[tuple[str, str]]:
    """``(kind, name)`` of every activation captured, in model order, filtered by glob ``patterns``.

    Per layer: ``act`` of ``resid_pre``, ``attn.{q,k,v}``, ``act_in`` and ``act`` of ``attn.o``,
    ``act`` of ``resid_mid``, ``mlp.{gate,up}``, ``act_in`` and ``act`` of ``mlp.down``, ``resid_post``.
    """
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
            "act": {
                "split": "val",
                "windows": [int(i) for i in self.act_windows],
                "n_tokens": int(len(self.token_index)),
                "token_index_sha256": hashlib.sha256(self.token_index.astype("<i8").tobytes()).hexdigest(),
            },
            "grad": {"split": "train", "windows": [int(i) for i in self.grad_windows]},
        }


def choose_probe(cfg: TrainConfig, train: np.ndarray, val: np.ndarray) -> ProbeSet:
    """Draw the probe set from ``numpy.random.default_rng([capture.seed, ...])``; independent of ``cfg.seed``.

    Raises :class:`ConfigError` when a split has fewer windows than requested.
    """
    c, T = cfg.capture, cfg.context
    n_val, n_train = n_windows(val, T), n_windows(train, T)
    for split, have, want, key in (
        ("validation", n_val, c.probe_sequences, "probe_sequences"),
        ("training", n_train, c.grad_sequences, "grad_sequences"),
    ):
        if have < want:
            raise ConfigError(
                f"capture.{key}={want} but the {split} split holds only {have} sequences of "
                f"seq_len+1={T + 1} tokens; lower capture.{key}"
            )
    act_windows = np.sort(np.random.default_rng([c.seed, 1]).choice(n_val, c.probe_sequences, replace=False))
    grad_windows = np.sort(np.random.default_rng([c.seed, 2]).choice(n_train, c.grad_sequences, replace=False))
    n_tok = c.probe_sequences * T
    if c.token_sample is None or c.token_sample >= n_tok:
        token_index = np.arange(n_tok, dtype=np.int64)
    else:
        token_index = np.sort(np.random.default_rng([c.seed, 3]).choice(n_tok, c.token_sample, replace=False)).astype(
            np.int64
        )
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
def _activation_pass(
    model: Decoder, probe: ProbeSet, sites: list[tuple[str, str]], *, device: torch.device, batch_size: int
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
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

    def hook_for(name: str, kinds: list[str]) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            for kind in kinds:
                t = inputs[0] if kind == "act_in" else output
                flat = t.detach().reshape(-1, t.shape[-1])  # (b·T, features)
                rows = flat.index_select(0, where["rows"])  # (k, features), k sampled positions of this chunk
                if (kind, name) not in bufs:
                    bufs[(kind, name)] = _host_empty((n_rows, rows.shape[1]), device)
                o = where["offset"]
                _start_copy(bufs[(kind, name)][o : o + rows.shape[0]], rows)

        return hook

    # every input on the device before the first forward: no transfer (and no wait) between chunks
    T, chunks = probe.seq_len, _chunks(len(probe.act_ids), batch_size)
    act_ids, act_targets = _to_device(probe.act_ids, device), _to_device(probe.act_targets, device)
    local_rows = [
        _to_device(
            torch.from_numpy(probe.token_index[(probe.token_index >= s * T) & (probe.token_index < e * T)] - s * T),
            device,
        )
        for s, e in chunks
    ]  # per chunk: its sampled flat positions, relative to the chunk
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
def capture_activations(
    model: Decoder, probe: ProbeSet, sites: list[tuple[str, str]], *, device: torch.device, batch_size: int
) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Forward the probe sequences in chunks of ``batch_size``; rows ``token_index`` of every site, float32.

    Returns ``({kind: {name: (K, features)}}, mean probe loss in nats/token)``. On
    CUDA every site is copied into pinned host memory without waiting, and the
    device is synchronised once at the end.
    """
    out, total = _activation_pass(model, probe, sites, device=device, batch_size=batch_size)
    _synchronize(device)
    return ({kind: {n: t.numpy() for n, t in d.items()} for kind, d in out.items()}, float(total) / len(probe.act_ids))


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` of submodule ``name`` (for a ReLoRA-wrapped projection: its frozen base ``W``)."""
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name!r} has no weight tensor")
    return weight


def _gradient_pass(
    model: Decoder, ids: torch.Tensor, targets: torch.Tensor, names: list[str], *, device: torch.device, batch_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`capture_gradients` without its final synchronisation.

    Returns ``({name: (out, in) float32 host tensor}, Σ_chunks loss·rows)`` as a 0-d float64
    tensor on ``device``; on CUDA neither is valid before :func:`_synchronize`.
    """
    params: dict[str, torch.Tensor] = {}
    wrapped: list[str] = []
    for name in names:
        weight = _weight(model, name)
        if name.endswith((".lora_a", ".lora_b")):
            params[name] = weight
        elif isinstance(model.get_submodule(name), ReLoRALinear) or not weight.requires_grad:
            wrapped.append(name)
        else:
            params[name] = weight
    total = torch.zeros((), dtype=torch.float64, device=device)
    if not names:
        return {}, total.fill_(float("nan"))
    sums: dict[str, torch.Tensor | None] = {n: None for n in names}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
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
                        w = _weight(model, name)
                        g = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                    else:
                        x = seen[name][0]
                        g_flat = g.detach().float().reshape(-1, g.shape[-1])  # (b·T, out)
                        g = g_flat.T @ x.float().reshape(-1, x.shape[-1])  # (out, in)
                    before = sums[name]
                    sums[name] = g if before is None else before + g
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    host: dict[str, torch.Tensor] = {}
    for name, summed in sums.items():
        assert summed is not None  # every name got a gradient in the first chunk
        if device.type == "cuda":
            host[name] = _host_empty(tuple(summed.shape), device)
            _start_copy(host[name], summed)
        else:
            host[name] = summed.detach().float()  # already a fresh CPU tensor: no copy
    return host, total


def capture_gradients(
    model: Decoder, ids: torch.Tensor, targets: torch.Tensor, names: list[str], *, device: torch.device, batch_size: int
) -> tuple[dict[str, np.ndarray], float]:
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


def capture_model(
    model: Decoder, probe: ProbeSet, cfg: TrainConfig, *, device: torch.device, batch_size: int
) -> Captured:
    """The whole extra pass, with no effect on training: eval mode, forked RNG, no ``.grad`` left behind.

    On CUDA every captured tensor is copied into pinned host memory as soon as
    it is computed, without waiting; the device is synchronised once, at the end.
    """
    c = cfg.capture
    was_training = model.training
    grads_before = {id(p): p.grad for p in model.parameters()}
    fork_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=fork_devices, enabled=True):
            model.eval()
            acts, act_total = _activation_pass(
                model, probe, activation_sites(model, c.act_names), device=device, batch_size=batch_size
            )
            names = gradient_names(model, c.grad_names)
            grads, grad_total = _gradient_pass(
                model, probe.grad_ids, probe.grad_targets, names, device=device, batch_size=batch_size
            )
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
    data = {
        kind: {n: t.numpy() for n, t in d.items()} for kind, d in (*acts.items(), ("grad", grads), ("weight", factors))
    }
    grad_loss = float(grad_total) / len(probe.grad_ids) if names else float("nan")
    return Captured(data, float(act_total) / len(probe.act_ids), grad_loss)
