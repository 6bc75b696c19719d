"""Training throughput: the trainer against a bare loop over the same model and data, in one process.

    python benchmarks/train_bench.py                       # micro preset on this machine (CPU: about 1-2 min)
    python benchmarks/train_bench.py --quick               # a few seconds; smoke check
    python benchmarks/train_bench.py --preset tiny --batch-size 64 --device cuda --json bench.json

For each method (``full``, ``relora``) it builds two loops over the same
:class:`trainer.model.Decoder`, config and token stream:

* **trainer** — a real :class:`trainer.train.Trainer` set up in a temporary run
  directory (data preparation, model construction and the step-0 evaluation and
  checkpoint are not timed), timed through ``Trainer.run(stop_at=...)``: every
  step does what a real run does (learning-rate schedule, gradient norm, the
  ``metrics.jsonl`` record, ReLoRA bookkeeping). Evaluation (val loss and, on
  the built-in corpus, minimal-pair accuracy), checkpoints and the dense
  dynamics capture that a checkpoint triggers are charged at their configured
  intervals (``--eval-interval``, ``--checkpoint-interval``: 100 each by default,
  as in the study; ``capture.every``, default every checkpoint): each cost is
  measured on the very ``evaluate_all``/``save_checkpoint``/``capture`` calls the
  loop makes and amortised over its interval, so the result does not depend on
  how many interval boundaries happen to fall inside the timed window. (Each
  ``run(stop_at=...)`` chunk ends with a checkpoint; that one is measured and
  charged only at the interval, like every other.) For ReLoRA the adapter merge
  and optimizer-state reset are charged the same way, every ``relora.merge_every``
  steps. Settings the benchmark does not set (capture, ReLoRA rank ...) are the
  trainer's defaults; change them with ``--set``.
* **bare** — the same model (same seed and init; ReLoRA-wrapped for ``relora``),
  AdamW with the trainer's settings (same parameter groups, fused on CUDA),
  bf16 autocast where the trainer uses it, and the same batches
  (:func:`trainer.data.train_micro_batch` on the trainer's stream, the same step
  indices): forward, ``backward``, ``step``, ``zero_grad`` and nothing else.

The loops are interleaved in counterbalanced order (A B C D, D C B A, ...) so
machine drift hits all of them alike; CUDA is synchronised before every timer
read. Each figure is the median over ``--repeats`` chunks. Reported: tokens/s
of trainer and bare loop, their ratio (target >= 0.95), the ratio without
eval/checkpoint ("steps-only"), the trainer's step time relative to full-rank,
and on CUDA the model FLOPs utilisation and peak memory.

MFU counts, per token, ``6·N + 12·L·d·T`` FLOPs for full-rank training, with
``N`` the weights of all matrix multiplies (every linear layer and the LM head;
not the input embedding, a lookup, nor the norms), ``L`` layers, ``d``
d_model, ``T`` sequence length (attention scores and values, forward and
backward, unmasked). For ReLoRA the frozen base matrices ``N_frozen`` need no
weight gradient: ``4·N_frozen + 6·N_trainable + 12·L·d·T``, ``N_trainable`` the
adapters and the LM head. The peak is ``--peak-tflops`` (989: H100 SXM dense bf16).

``benchmarks/gpu_bench.py`` reuses these loops, the interleaved timing (:func:`time_loops`),
the amortisation (:func:`trainer_step_time`) and :func:`flops_per_token`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import trainer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from trainer import relora
from trainer.batch_size import training_model
from trainer.config import build_config
from trainer.data import train_micro_batch
from trainer.runtime import build_optimizer, release_memory, resolve_device, uses_bf16
from trainer.train import Trainer

METHODS = ("full", "relora")
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_bench.py",
        description="Tokens/s of the trainer against a bare training loop over the same model and data (same process).",
    )
    p.add_argument("--preset", choices=["micro", "tiny", "small"], default="micro", help="model size (default micro)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (default: the trainer's, 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    add_common_arguments(p)
    return p


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every trainer benchmark shares: timing, device, methods, intervals, MFU peak, ``--set``, output."""
    p.add_argument(
        "--steps", type=int, help="timed steps per loop, split over --repeats chunks (default 60 on CPU, 150 on CUDA)"
    )
    p.add_argument("--warmup", type=int, help="untimed steps per loop before timing (default 5 on CPU, 10 on CUDA)")
    p.add_argument(
        "--repeats",
        type=int,
        help="interleaved timed chunks per loop; medians are reported (default 3 on CPU, 5 on CUDA)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--methods", default="full,relora", help="comma-separated subset of full,relora (default both)")
    p.add_argument("--eval-interval", type=int, default=100, help="trainer validation every N steps (default 100)")
    p.add_argument(
        "--checkpoint-interval", type=int, default=100, help="trainer checkpoint every N steps (default 100)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=DEFAULT_PEAK_TFLOPS,
        help=f"accelerator peak for MFU, TFLOP/s (default {DEFAULT_PEAK_TFLOPS:g}: H100 dense bf16)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads (default: as `dynamics train`, every core unless OMP_NUM_THREADS)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra trainer setting, as `dynamics train --set` (relora.rank=8, grad_accum=2, ...); repeatable",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the temporary run directories go (default: the system temp dir); "
        "checkpoint cost depends on the file system",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke check, seconds)")


@dataclass
class Settings:
    preset: str
    device: torch.device
    methods: list[str]
    steps: int
    warmup: int
    repeats: int
    batch_size: int | None
    seq_len: int | None
    eval_interval: int
    checkpoint_interval: int
    peak_tflops: float
    overrides: list[str]
    quick: bool
    workdir: Path | None

    @property
    def chunk(self) -> int:
        return self.steps // self.repeats


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    methods = list(dict.fromkeys(methods))
    if args.quick:
        steps, warmup, repeats = args.steps or 4, args.warmup if args.warmup is not None else 1, args.repeats or 2
        batch_size, seq_len = args.batch_size or 8, args.seq_len or 32
    else:
        steps = args.steps or (150 if cuda else 60)
        warmup = args.warmup if args.warmup is not None else (10 if cuda else 5)
        repeats = args.repeats or (5 if cuda else 3)
        batch_size, seq_len = args.batch_size, args.seq_len
    if repeats < 1 or steps < repeats:
        parser.error(f"need --repeats >= 1 and --steps >= --repeats, got steps={steps} repeats={repeats}")
    if warmup < 1:
        parser.error("--warmup must be >= 1 (the first steps are not representative)")
    for name in ("eval_interval", "checkpoint_interval", "peak_tflops"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return Settings(
        preset=args.preset,
        device=device,
        methods=methods,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        peak_tflops=args.peak_tflops,
        overrides=list(args.overrides),
        quick=args.quick,
        workdir=args.workdir,
    )


def trainer_config(s: Settings, method: str):
    """The benchmark's :class:`TrainConfig` for ``method`` (validated; raises ``ConfigError``)."""
    probe = build_config(preset=s.preset, overrides=_size_overrides(s))
    ctx, mb = probe.context, probe.micro_batch_size
    # A small generated corpus (setup stays fast) that still fills every validation batch.
    val_tokens = max(20_000, (probe.eval_batches * mb + 2) * (ctx + 1))
    train_tokens = (
        max(200_000, 8 * probe.batch_size * (ctx + 1)) if not s.quick else max(20_000, 4 * probe.batch_size * (ctx + 1))
    )
    overrides = [
        f"method={method}",
        # The schedule's horizon lies beyond the timed window, so no end-of-run eval/checkpoint happens in it.
        f"steps={s.warmup + s.steps + 1}",
        f"eval_interval={s.eval_interval}",
        f"checkpoint_interval={s.checkpoint_interval}",
        f"device={s.device}",
        f"data.train_tokens={train_tokens}",
        f"data.val_tokens={val_tokens}",
    ]
    if s.quick:
        overrides.append("eval_batches=1")
    return build_config(preset=s.preset, overrides=overrides + _size_overrides(s))


def _size_overrides(s: Settings) -> list[str]:
    out = []
    if s.batch_size is not None:
        out.append(f"batch_size={s.batch_size}")
    if s.seq_len is not None:
        out.append(f"seq_len={s.seq_len}")
    return out + s.overrides


# ---------------------------------------------------------------------------------------------
# The two loops


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes of parameters, buffers and optimizer state that live on ``device`` (each storage once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.device.type != device.type:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass
class Loop:
    """One timed loop; ``chunk(start, n)`` runs steps ``start .. start+n-1`` and returns seconds not to count."""

    name: str
    method: str
    kind: str  # "trainer" or "bare"
    step_s: list[float] = field(default_factory=list)  # per timed chunk: seconds per step (events excluded)
    peak_bytes: list[int] = field(default_factory=list)


class TrainerLoop(Loop):
    def __init__(self, cfg, run_dir: Path, device: torch.device, *, name: str | None = None) -> None:
        super().__init__(name=name or f"{cfg.method}/trainer", method=cfg.method, kind="trainer")
        self.sync = _sync(device)
        self.device = device
        self.trainer = Trainer(cfg, run_dir, progress=False, echo=lambda _msg: None)
        try:
            self.trainer.setup()  # data, model, step-0 eval and checkpoint: not timed
        except BaseException:
            self.trainer.cleanup()
            raise
        self.cfg = self.trainer.cfg
        # Seconds per event. "checkpoint" excludes the capture it triggers, which is timed on its own.
        self.events: dict[str, list[float]] = {"eval": [], "checkpoint": [], "capture": [], "reset": []}
        self._in_chunk = 0.0  # event seconds inside the current timed chunk (subtracted from it)
        self._capture_total = 0.0
        self._captured_this_chunk = False
        tr = self.trainer
        # Time the very calls Trainer.run makes (instance attributes shadow the methods): the interval
        # evaluation (evaluate_all where the trainer has it: val loss + minimal pairs) and save_checkpoint.
        self.eval_attr = "evaluate_all" if hasattr(tr, "evaluate_all") else "evaluate"
        setattr(tr, self.eval_attr, self._outer("eval", getattr(tr, self.eval_attr)))
        tr.save_checkpoint = self._outer("checkpoint", tr.save_checkpoint)
        self.capturer = getattr(tr, "capturer", None)  # dense dynamics capture, run by save_checkpoint when due
        if self.capturer is not None:
            # a checkpoint submits the capture: the pass (and any wait for the previous write) blocks training,
            # the file write overlaps it in a background thread; `capture` is the synchronous path
            self.capturer.submit = self._nested_capture(self.capturer.submit)
            self.capturer.capture = self._nested_capture(self.capturer.capture)

    def _outer(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0, cap0 = time.perf_counter(), self._capture_total
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self._in_chunk += dt
                self.events[kind].append(dt - (self._capture_total - cap0))

        return wrapper

    def _nested_capture(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self._capture_total += dt
                self._captured_this_chunk = True
                self.events["capture"].append(dt)

        return wrapper

    @property
    def capture_period(self) -> int | None:
        """Steps between captures in a real run (``None``: capture disabled)."""
        if self.capturer is None:
            return None
        return self.cfg.capture.every or self.cfg.checkpoint_interval

    def chunk(self, start: int, n: int) -> float:
        assert self.trainer.step == start, (self.trainer.step, start)
        self._in_chunk = 0.0
        self._captured_this_chunk = False
        self.trainer.run(stop_at=start + n)
        return self._in_chunk

    def after_chunk(self) -> None:
        """Untimed: samples of the events that did not occur in the chunk, and drop all but the newest outputs."""
        tr = self.trainer
        if self.capturer is not None:
            self.capturer.flush()  # the chunk's last background write ends here, not inside another loop's timing
        getattr(tr, self.eval_attr)()
        if self.capturer is not None and not self._captured_this_chunk:
            # capture.every > checkpoint_interval: the chunk-end checkpoint was not due
            self.capturer.capture(tr.model, tr.training_state(), tr.device)
        if self.method == "relora" and tr.wrapped:
            self.events["reset"].append(self._time_reset())
        for sub in ("checkpoints", "dynamics"):
            outputs = sorted((tr.run_dir / sub).glob("step_*"))
            for d in outputs[:-1]:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)

    def _time_reset(self) -> float:
        """Seconds of one adapter merge + optimizer-state reset, each weighted by its period relative to the merge period."""
        tr, r = self.trainer, self.cfg.relora
        self.sync()
        t0 = time.perf_counter()
        relora.merge_all(tr.model, tr.adapter_rng)
        self.sync()
        merge = time.perf_counter() - t0
        prune = 0.0
        if r.optimizer_reset != "none":
            t0 = time.perf_counter()
            relora.prune_optimizer_state(
                tr.optimizer,
                relora.lora_parameters(tr.model),
                mode=r.optimizer_reset,
                ratio=r.prune_ratio,
                generator=tr.adapter_rng,
            )
            self.sync()
            prune = time.perf_counter() - t0
        # Amortised later over merge_every: express the optimizer reset's cost at the merge period.
        return merge + prune * r.merge_every / r.optimizer_reset_period

    def reset_events(self) -> None:
        for v in self.events.values():
            v.clear()

    def resident(self) -> int:
        return _resident_bytes(self.trainer.model, self.trainer.optimizer, self.device)

    def close(self) -> None:
        self.trainer.cleanup()


class BareLoop(Loop):
    """Forward, backward, AdamW step, zero_grad: nothing else.

    ``loss_fn(x, y)`` (default: the model's own loss) maps token ids ``(B, T)`` int64 and targets ``(B, T)`` int64
    to the mean cross-entropy, a 0-d tensor; subclasses may swap it (e.g. for a compiled one).
    """

    def __init__(self, cfg, stream, device: torch.device, *, name: str | None = None, kind: str = "bare") -> None:
        super().__init__(name=name or f"{cfg.method}/bare", method=cfg.method, kind=kind)
        self.cfg, self.stream, self.device = cfg, stream, device
        self.model = model = training_model(cfg, device)  # as the trainer's: same seed, init, wrapping, loss settings
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = model.loss
        self.optimizer = build_optimizer(model, cfg, device)  # the trainer's groups; fused on CUDA
        bf16 = uses_bf16(cfg, device)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def chunk(self, start: int, n: int) -> float:
        cfg, opt = self.cfg, self.optimizer
        ga = cfg.grad_accum
        for t in range(start, start + n):
            for micro in range(ga):
                x, y = train_micro_batch(
                    self.stream,
                    seed=cfg.seed,
                    step=t,
                    micro=micro,
                    batch_size=cfg.batch_size,
                    grad_accum=ga,
                    seq_len=cfg.context,
                )
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast():
                    loss = self.loss_fn(x, y)
                if ga > 1:
                    loss = loss / ga
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return 0.0

    def resident(self) -> int:
        return _resident_bytes(self.model, self.optimizer, self.device)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(model: nn.Module, cfg) -> tuple[float, str]:
    """Training FLOPs per token (see the module docstring) and the formula, for a plain or ReLoRA-wrapped model."""
    m = cfg.model
    attention = 12.0 * m.n_layers * m.d_model * cfg.context
    frozen = trainable = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("embed."):
            continue  # norms, and the embedding lookup
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    if frozen:
        return 4.0 * frozen + 6.0 * trainable + attention, (
            f"4*N_frozen + 6*N_trainable + 12*L*d*T = 4*{frozen} + 6*{trainable} + 12*{m.n_layers}*{m.d_model}*{cfg.context}"
        )
    return 6.0 * trainable + attention, f"6*N + 12*L*d*T = 6*{trainable} + 12*{m.n_layers}*{m.d_model}*{cfg.context}"


# ---------------------------------------------------------------------------------------------
# Running


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _time_chunk(loop: Loop, start: int, n: int, device: torch.device) -> None:
    sync = _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync()
    t0 = time.perf_counter()
    excluded = loop.chunk(start, n)
    sync()
    elapsed = time.perf_counter() - t0
    loop.step_s.append((elapsed - excluded) / n)
    if cuda:
        transient = torch.cuda.max_memory_allocated(device) - base
        loop.peak_bytes.append(loop.resident() + max(transient, 0))


def _warm(loop: Loop, steps: int) -> None:
    loop.chunk(0, steps)
    if isinstance(loop, TrainerLoop):
        loop.after_chunk()  # warms the evaluation, capture and reset paths too
        loop.reset_events()


def _timed(loop: Loop, start: int, s: Settings) -> None:
    _time_chunk(loop, start, s.chunk, s.device)
    if isinstance(loop, TrainerLoop):
        loop.after_chunk()


def run_guarded(fn: Callable[[], Any], failure: Callable[[BaseException], str | None] | None) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, reason)`` when ``fn`` raises an exception that ``failure`` names; others propagate.

    The exception is dropped before this returns, so memory its traceback held (a failed step's tensors) can be freed.
    """
    reason = None
    try:
        return fn(), None
    except Exception as e:
        reason = failure(e) if failure is not None else None
        if reason is None:
            raise
    return None, reason


def time_loops(
    loops: list[Loop],
    s: Settings,
    *,
    tag: str = "train_bench",
    failure: Callable[[BaseException], str | None] | None = None,
) -> dict[str, str]:
    """Warm ``loops`` up for ``s.warmup`` steps, then time ``s.repeats`` chunks of ``s.chunk`` steps each.

    The chunks are interleaved in counterbalanced order (A B C, C B A, ...) and fill each loop's
    ``step_s`` and ``peak_bytes``. ``failure`` names the exceptions a loop may die of without ending
    the benchmark (e.g. out of memory → ``"OOM"``; ``None`` for any other): such a loop is closed,
    removed from ``loops`` (in place) and its memory released. Returns ``{loop name: reason}``.
    """
    failed: dict[str, str] = {}

    def attempt(loop: Loop, fn: Callable[[], None]) -> None:
        _, reason = run_guarded(fn, failure)
        if reason is not None:
            _log(f"[{tag}] {loop.name}: {reason}; left out of the rest of the run")
            failed[loop.name] = reason
            loops.remove(loop)
            loop.close()
            release_memory()

    _log(f"[{tag}] warmup: {s.warmup} steps per loop")
    for loop in list(loops):
        attempt(loop, lambda: _warm(loop, s.warmup))
    _sync(s.device)()
    for r in range(s.repeats):
        start = s.warmup + r * s.chunk
        order = list(loops) if r % 2 == 0 else loops[::-1]
        _log(
            f"[{tag}] repeat {r + 1}/{s.repeats}: steps {start}..{start + s.chunk - 1}, "
            f"order {' '.join(lp.name for lp in order)}"
        )
        for loop in order:
            attempt(loop, lambda: _timed(loop, start, s))
    return failed


def run_benchmark(s: Settings) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="train_bench.", dir=s.workdir))
    loops: list[Loop] = []
    try:
        cfgs = {}
        for method in s.methods:
            cfg = trainer_config(s, method)
            cfgs[method] = cfg
            _log(f"[train_bench] setting up {method}: trainer run dir, data, model (not timed)")
            tl = TrainerLoop(cfg, root / method, s.device)
            loops += [tl, BareLoop(tl.cfg, tl.trainer.data.train, s.device)]
        time_loops(loops, s)
        return summarise(s, cfgs, loops)
    finally:
        for loop in loops:
            loop.close()
        loops.clear()
        release_memory()
        shutil.rmtree(root, ignore_errors=True)


def trainer_step_time(tl: TrainerLoop) -> dict[str, Any]:
    """Seconds per step of a timed trainer loop, with eval, checkpoint, capture and ReLoRA reset amortised.

    Keys: ``trainer_step_s`` (all included), ``trainer_steps_only_step_s`` (median chunk, events excluded),
    ``amortised_events_s_per_step``, and the median seconds of one ``eval_s``, ``checkpoint_s``,
    ``capture_s`` (``None`` with capture disabled) and ``reset_s`` (``None`` for full-rank).
    """
    cfg = tl.cfg
    eval_s, ckpt_s = _median(tl.events["eval"]), _median(tl.events["checkpoint"])
    reset_s = _median(tl.events["reset"]) if tl.events["reset"] else 0.0
    capture_s = _median(tl.events["capture"]) if tl.capture_period else 0.0
    steps_only = _median(tl.step_s)
    amortised = eval_s / cfg.eval_interval + ckpt_s / cfg.checkpoint_interval
    if tl.capture_period:
        amortised += capture_s / tl.capture_period
    if tl.method == "relora":
        amortised += reset_s / cfg.relora.merge_every
    return {
        "trainer_step_s": steps_only + amortised,
        "trainer_steps_only_step_s": steps_only,
        "eval_s": eval_s,
        "checkpoint_s": ckpt_s,
        "capture_s": capture_s if tl.capture_period else None,
        "reset_s": reset_s if tl.method == "relora" else None,
        "amortised_events_s_per_step": amortised,
    }


def summarise(s: Settings, cfgs: dict, loops: list[Loop]) -> dict[str, Any]:
    cuda = s.device.type == "cuda"
    by = {(lp.method, lp.kind): lp for lp in loops}
    any_cfg = next(iter(cfgs.values()))
    tokens_per_step = any_cfg.tokens_per_step
    methods: dict[str, dict[str, Any]] = {}
    for method in s.methods:
        tl: TrainerLoop = by[(method, "trainer")]  # type: ignore[assignment]
        bl: BareLoop = by[(method, "bare")]  # type: ignore[assignment]
        cfg = tl.cfg
        t = trainer_step_time(tl)
        trainer_step, steps_only = t["trainer_step_s"], t["trainer_steps_only_step_s"]
        bare_step = _median(bl.step_s)
        rec: dict[str, Any] = {
            "trainer_tokens_per_s": tokens_per_step / trainer_step,
            "bare_tokens_per_s": tokens_per_step / bare_step,
            "ratio": bare_step / trainer_step,
            "trainer_steps_only_tokens_per_s": tokens_per_step / steps_only,
            "steps_only_ratio": bare_step / steps_only,
            "bare_step_s": bare_step,
            **t,
            "n_trainable": sum(p.numel() for p in tl.trainer.model.parameters() if p.requires_grad),
            "raw": {
                "trainer_step_s": tl.step_s,
                "bare_step_s": bl.step_s,
                "eval_s": tl.events["eval"],
                "checkpoint_s": tl.events["checkpoint"],
                "capture_s": tl.events["capture"],
                "reset_s": tl.events["reset"],
            },
        }
        if cuda:
            flops, formula = flops_per_token(tl.trainer.model, cfg)
            peak = s.peak_tflops * 1e12
            rec.update(
                {
                    "flops_per_token": flops,
                    "flops_formula": formula,
                    "mfu_trainer": rec["trainer_tokens_per_s"] * flops / peak,
                    "mfu_bare": rec["bare_tokens_per_s"] * flops / peak,
                    "peak_mem_trainer_gib": max(tl.peak_bytes) / 2**30,
                    "peak_mem_bare_gib": max(bl.peak_bytes) / 2**30,
                }
            )
        methods[method] = rec
    if "full" in methods:
        full = methods["full"]
        for rec in methods.values():
            rec["step_time_vs_full"] = rec["trainer_step_s"] / full["trainer_step_s"]
            rec["bare_step_time_vs_full"] = rec["bare_step_s"] / full["bare_step_s"]
    cfg = any_cfg
    return {
        "settings": {
            "preset": s.preset,
            "device": str(s.device),
            "device_name": torch.cuda.get_device_name(s.device) if cuda else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seq_len": cfg.context,
            "tokens_per_step": tokens_per_step,
            "precision": "bf16 autocast" if uses_bf16(cfg, s.device) else "fp32",
            "warmup_steps": s.warmup,
            "timed_steps_per_loop": s.chunk * s.repeats,
            "repeats": s.repeats,
            "steps_per_chunk": s.chunk,
            "eval_interval": cfg.eval_interval,
            "eval_batches": cfg.eval_batches,
            "checkpoint_interval": cfg.checkpoint_interval,
            "eval_call": by[(s.methods[0], "trainer")].eval_attr,
            "capture_every": by[(s.methods[0], "trainer")].capture_period,
            "relora_merge_every": cfg.relora.merge_every if "relora" in s.methods else None,
            "peak_tflops": s.peak_tflops if cuda else None,
            "overrides": s.overrides,
            "quick": s.quick,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "target_ratio": 0.95,
        "methods": methods,
    }


# ---------------------------------------------------------------------------------------------
# Output


def format_table(res: dict[str, Any]) -> str:
    st, methods = res["settings"], res["methods"]
    cuda = st["device"].startswith("cuda")
    lines = [
        f"train_bench: preset={st['preset']} device={st['device']} ({st['device_name']}, {st['threads']} threads) "
        f"{st['precision']}, batch {st['batch_size']}x{st['seq_len']} = {st['tokens_per_step']} tokens/step, "
        f"torch {st['torch']}, python {st['python']}",
        f"timed: {st['timed_steps_per_loop']} steps per loop in {st['repeats']} interleaved chunks of {st['steps_per_chunk']} "
        f"(after {st['warmup_steps']} warmup steps); medians over chunks",
        f"trainer = Trainer.run() steps + {st['eval_call']} ({st['eval_batches']} val batches) every {st['eval_interval']} steps "
        f"+ checkpoint every {st['checkpoint_interval']} steps"
        + (f" + dynamics capture every {st['capture_every']} steps" if st["capture_every"] else " (capture disabled)")
        + (
            f" + ReLoRA merge + optimizer reset every {st['relora_merge_every']} steps"
            if st["relora_merge_every"]
            else ""
        ),
        "  (each event's cost is measured on the calls Trainer.run makes and amortised over its interval)",
        "",
    ]
    head = [
        "method",
        "trainer tok/s",
        "bare tok/s",
        "ratio",
        "steps-only",
        "step ms",
        "vs full",
        "eval ms",
        "ckpt ms",
        "capture ms",
    ]
    if cuda:
        head += ["MFU trainer", "MFU bare", "peak GiB tr/bare"]
    rows = [head]
    for method, r in methods.items():
        row = [
            method,
            f"{r['trainer_tokens_per_s']:,.0f}",
            f"{r['bare_tokens_per_s']:,.0f}",
            f"{r['ratio']:.3f}",
            f"{r['steps_only_ratio']:.3f}",
            f"{r['trainer_step_s'] * 1e3:.1f}",
            f"{r['step_time_vs_full']:.2f}" if "step_time_vs_full" in r else "-",
            f"{r['eval_s'] * 1e3:.0f}",
            f"{r['checkpoint_s'] * 1e3:.0f}",
            f"{r['capture_s'] * 1e3:.0f}" if r.get("capture_s") is not None else "-",
        ]
        if cuda:
            row += [
                f"{r['mfu_trainer']:.1%}",
                f"{r['mfu_bare']:.1%}",
                f"{r['peak_mem_trainer_gib']:.2f}/{r['peak_mem_bare_gib']:.2f}",
            ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("")
    lines.append(
        "ratio = trainer tok/s / bare tok/s (target >= 0.95); steps-only = the same without eval/checkpoint; "
        "vs full = trainer step time / full-rank trainer step time"
    )
    for method, r in methods.items():
        if r.get("reset_s"):
            lines.append(
                f"{method}: merge + optimizer reset {r['reset_s'] * 1e3:.0f} ms per {st['relora_merge_every']} steps"
            )
    if cuda:
        formulas = {m: r["flops_formula"] for m, r in methods.items()}
        for m, f in formulas.items():
            lines.append(f"MFU {m}: FLOPs/token = {f}; peak {st['peak_tflops']:g} TFLOP/s")
    if st.get("loadavg_1min_at_end") is not None and not cuda:
        lines.append(f"load average (1 min) at the end: {st['loadavg_1min_at_end']:.2f} on {os.cpu_count()} cores")
    return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Intra-op threads while benchmarking: ``n``, else as `dynamics train` (every core unless OMP_NUM_THREADS); restored after."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(os.cpu_count() or 1)  # as trainer.runtime.threads_hint
        yield
    finally:
        torch.set_num_threads(before)


def write_json(path: Path | None, res: dict[str, Any]) -> None:
    """Write ``res`` as indented JSON to ``path`` (parents created; non-JSON values as strings); nothing if ``None``."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON; returns the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        s = resolve_settings(args, parser)
        res = run_benchmark(s)
    print(format_table(res), flush=True)
    write_json(args.json, res)
    return res


def run_script(main_fn: Callable[[], Any]) -> None:
    """Run a benchmark's ``main()`` as a script: an invalid trainer setting prints one ``error:`` line, exit status 2."""
    from trainer.config import ConfigError

    try:
        main_fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main)
