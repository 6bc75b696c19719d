"""The training recipe: setup → train → save_checkpoint → cleanup.

One loop serves both methods. ``method = "full"`` trains every parameter;
``method = "relora"`` wraps the projections with :class:`trainer.relora.ReLoRALinear`
(after ``relora.warm_start_steps`` full-rank steps), merges and re-initialises
the adapters every ``relora.reset_every`` steps, prunes the adapters' optimizer
state, and follows the jagged cosine schedule.

Step ``t`` in logs and checkpoint names counts optimizer updates done: the
checkpoint ``step_000000`` is the initialisation and ``step_000100`` holds the
state after 100 updates.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer import relora
from trainer.capture import Capturer
from trainer.config import ConfigError, TrainConfig, config_from_dict
from trainer.data import prepare, split_rows, train_micro_rows, validation_batches
from trainer.distributed import DistContext, init_from_env
from trainer.model import Decoder, count_parameters
from trainer.prefetch import Prefetcher
from trainer.schedule import constant_factor, cosine_factor, jagged_cosine_factor, linear_factor


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became non-finite)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine; use device=cpu")
    return torch.device(name)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: ``precision=bf16``, or ``auto`` on CUDA."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def uses_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the training loss is compiled: ``compile`` if set, else on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def lr_at(cfg: TrainConfig, t: int) -> float:
    """Learning rate of update ``t`` (0-based)."""
    kw = dict(total=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    if cfg.method == "relora":
        r = cfg.relora
        return cfg.lr * jagged_cosine_factor(t, restart_every=r.lr_restart_period, restart_warmup=r.restart_warmup, **kw)
    factor = {"cosine": cosine_factor, "linear": linear_factor, "constant": constant_factor}[cfg.schedule]
    return cfg.lr * factor(t, **kw)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters, in ``named_parameters`` order; weight decay on matrices only (not norms)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``tensors`` together, without modifying them (a 0-d float32 tensor)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)  # one fused kernel per device/dtype group
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class CompiledLoss:
    """``torch.compile`` of a loss function that falls back to eager mode, with one warning, if compiling fails.

    A failure to compile (a missing compiler toolchain, an unsupported op on an
    older torch) should cost speed, not the run. Running out of device memory is
    not a compiler failure: it is raised as it is and compiling stays on. Any
    other error that eager mode also raises (a bad input) comes from the eager call.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], **compile_kwargs: Any) -> None:
        self.eager = fn
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(fn, **compile_kwargs)

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure; eager mode re-raises real errors
                from trainer.batch_size import is_out_of_memory

                if is_out_of_memory(e):
                    raise
                self.compiled = None
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {first}); training continues without compile",
                              stacklevel=2)
        return self.eager(*args)


def memory_footprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters (all, and trainable), of gradients they will get and of AdamW state (two moments each).

    Frozen parameters (ReLoRA's base matrices) have no gradient buffer and no
    optimizer state; the optimizer state is counted as AdamW allocates it at its
    first step (``exp_avg`` and ``exp_avg_sq`` of every parameter it updates).
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optimized = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    return {"param_bytes": params, "trainable_bytes": trainable, "grad_bytes": trainable,
            "optimizer_state_bytes": 2 * optimized}


class JsonlLog:
    """Append-only JSON-lines log, flushed after every record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only complete records with ``step <= last_step`` (drops a half-written last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", math.inf) <= last_step:
            kept.append(line)
    from trainer.atomic import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


# Settings that may differ on resume without changing what is computed.
RESUME_MUTABLE = ("steps", "eval_interval", "eval_batches", "checkpoint_interval", "device", "precision", "compile",
                  "tf32", "loss_chunk_tokens", "prefetch")


class Trainer:
    """Runs one training job into ``run_dir``. Use :func:`train` for the common case."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.echo = echo
        self.step = 0
        self.tokens_seen = 0
        self.merges = 0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        self.wrapped: list[str] = []
        self.dist = DistContext()  # joined in setup() when launched by torchrun

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.dist = init_from_env(self.device.type)
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            if cfg.micro_batch_size % self.dist.world_size:
                raise ConfigError(f"batch_size/grad_accum={cfg.micro_batch_size} must be divisible by the number of "
                                  f"processes ({self.dist.world_size})")
            if not self.dist.is_main:
                self.echo = lambda msg: None
        manifest = None
        if (self.run_dir / ckpt.MANIFEST).exists():
            if not self.resume:
                raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
            manifest = ckpt.read_manifest(self.run_dir)
            cfg = self.cfg = self._reconcile(manifest)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not self.resume:
            raise ConfigError(f"{self.run_dir} exists and is not empty; choose a new --out")
        if manifest is not None and not manifest["checkpoints"]:
            manifest = None  # crashed before the first checkpoint: start over
        self.dist.barrier()  # every rank has checked the directory before rank 0 writes into it

        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if uses_bf16(cfg, self.device)
            else contextlib.nullcontext
        )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.data = prepare(cfg.data, self.run_dir / "data")
        self.dist.barrier()
        if not self.dist.is_main:
            self.data = prepare(cfg.data, self.run_dir / "data")  # rank 0 wrote it: verified and memory-mapped
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the data uses {self.data.vocab_size} token ids but model.vocab_size={cfg.model.vocab_size}; "
                f"set model.vocab_size>={self.data.vocab_size}"
            )
        for split, stream in (("train", self.data.train), ("val", self.data.val)):
            if len(stream) < cfg.context + 1:
                raise ConfigError(f"the {split} split has {len(stream)} tokens, fewer than one sequence of seq_len+1={cfg.context + 1}")

        if self.device.type == "cuda":  # TF32 for float32 matrix products (the bf16 autocast ones are unaffected)
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.manual_seed(cfg.seed)
        self.model = Decoder(cfg.model)  # initialised on CPU from the seed: the same on every device
        self.model.loss_chunk_tokens = cfg.loss_chunk_tokens
        self.adapter_rng = torch.Generator().manual_seed(cfg.seed + 1)  # adapter re-draws and optimizer pruning
        if cfg.init_from is not None and manifest is None:
            self._init_from(cfg.init_from)
        self.model.to(self.device)
        if cfg.method == "relora" and cfg.relora.warm_start_steps == 0:
            self._wrap()
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        # training loss, compiled by default on CUDA; a bound method, so state-dict keys keep their names
        self._train_loss = CompiledLoss(self.model.loss) if uses_compile(cfg, self.device) else self.model.loss
        self.batches = Prefetcher(self._micro_rows, self._next_micro, depth=cfg.prefetch, name="trainer-prefetch")
        self._echo_memory()
        from trainer.evaluate import builtin_pairs

        self.eval_pairs = builtin_pairs(self.data.meta, n=200)
        self.val_batches = validation_batches(self.data.val, n_batches=cfg.eval_batches,
                                              batch_size=cfg.micro_batch_size, seq_len=cfg.context)
        # the fixed probe set; None when capture.enabled is false, and on ranks other than 0
        self.capturer = Capturer.for_trainer(self) if self.dist.is_main else None
        self.log = None

        if manifest is not None:
            self._load(manifest)
            if self.capturer is not None:
                self.capturer.on_resume(self, manifest)
            if self.dist.is_main:
                self.log = JsonlLog(self.run_dir / ckpt.METRICS)
        elif not self.dist.is_main:
            self.save_checkpoint()  # rank 0 writes the manifest and the step-0 checkpoint; the others check and wait
        else:
            manifest = ckpt.new_manifest(cfg.to_dict(), self.data.meta)
            if self.capturer is not None:
                self.capturer.describe(manifest)  # records the probe set: indices and sha256
            ckpt.write_manifest(self.run_dir, manifest)
            (self.run_dir / ckpt.METRICS).unlink(missing_ok=True)
            self.log = JsonlLog(self.run_dir / ckpt.METRICS)
            self.log.write({"step": 0, **self.evaluate_all(), "tokens_seen": 0})
            self.save_checkpoint()

    def _reconcile(self, manifest: dict[str, Any]) -> TrainConfig:
        """Config to resume with: the stored one, except the settings in :data:`RESUME_MUTABLE`; warn on differences."""
        stored = config_from_dict(manifest["config"])
        asked, kept = self.cfg.to_dict(), stored.to_dict()
        diffs = [k for k in asked if asked[k] != kept[k]]
        mutable = {k: asked[k] for k in diffs if k in RESUME_MUTABLE}
        ignored = [k for k in diffs if k not in RESUME_MUTABLE and k != "preset"]
        if ignored:
            warnings.warn(f"resuming {self.run_dir}: keeping the run's stored {', '.join(ignored)} (the new values are ignored)",
                          stacklevel=3)
        if mutable:
            warnings.warn(f"resuming {self.run_dir} with changed {', '.join(f'{k}={v}' for k, v in mutable.items())}", stacklevel=3)
        return config_from_dict({**kept, **mutable})

    def _init_from(self, spec: str) -> None:
        """Load dense weights from ``RUN_DIR@STEP`` (or ``RUN_DIR``: latest); shapes must match this model."""
        run, _, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
        payload = ckpt.load_checkpoint(run, int(step) if step else None)
        ours = self.model.state_dict()
        bad = [k for k in ours if k not in payload.model or payload.model[k].shape != ours[k].shape]
        if bad:
            raise ckpt.CheckpointError(f"init_from {spec}: weights do not fit this model (first mismatch: {bad[0]})")
        self.model.load_state_dict({k: payload.model[k] for k in ours})
        self.echo(f"initialised from {run} step {payload.state['step']}")

    def _wrap(self) -> None:
        self.wrapped = relora.wrap_model(self.model, self.cfg.relora, self.adapter_rng)

    def _load(self, manifest: dict[str, Any]) -> None:
        removed = ckpt.remove_unlisted_checkpoints(self.run_dir, manifest) if self.dist.is_main else []
        for path in removed:
            self.echo(f"removed incomplete checkpoint {path}")
        payload = ckpt.load_checkpoint(self.run_dir, map_location=self.device)
        state = payload.state
        if self.cfg.method == "relora" and state.get("wrapped") and not self.wrapped:
            self._wrap()
            self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        weights = dict(payload.model)
        if payload.adapters is not None:
            weights.update(payload.adapters)
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(payload.optimizer)
        torch.set_rng_state(payload.rng["torch"])
        if self.device.type == "cuda" and "cuda" in payload.rng:
            torch.cuda.set_rng_state(payload.rng["cuda"], self.device)
        self.adapter_rng.set_state(payload.rng["adapter"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.merges = state.get("merges", 0)
        self.last_loss, self.last_val_loss = state.get("loss"), state.get("val_loss")
        if self.dist.is_main:
            truncate_log(self.run_dir / ckpt.METRICS, self.step)
        self.echo(f"resumed {self.run_dir} at step {self.step}")

    # -- train -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer update (all micro-batches of step ``self.step``); returns its log record."""
        cfg = self.cfg
        t = self.step
        if cfg.method == "relora" and not self.wrapped and t >= cfg.relora.warm_start_steps:
            self._switch_to_relora()
        lr = lr_at(cfg, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:
            self.model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = split_rows(self.batches.get((t, micro)).to(self.device, non_blocking=True))
            with self.autocast():
                loss = self._train_loss(x, y) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        if self.dist.enabled:
            self.dist.average_gradients([p for group in self.optimizer.param_groups for p in group["params"]])
            total = self.dist.mean(torch.as_tensor(total))
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None], cfg.grad_clip)
        else:
            grad_norm = global_norm(grads)
        # one host sync per step, for both numbers (the loss must be checked before the update)
        loss_value, norm_value = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss became {loss_value} at step {t}; the last good checkpoint is kept in {self.run_dir}. "
                "Try a lower lr or grad_clip=1.0"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = t + 1
        self.tokens_seen += cfg.tokens_per_step
        self.last_loss = loss_value
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                  "tokens_seen": self.tokens_seen}
        if cfg.method == "relora" and self.wrapped:
            record.update(self._relora_events(t))
        return record

    def _micro_rows(self, key: tuple[int, int]) -> torch.Tensor:
        """This rank's windows ``(b, seq_len + 1)`` int64 of micro-batch ``key = (step, micro)``; pinned on CUDA."""
        cfg = self.cfg
        step, micro = key
        rows = train_micro_rows(self.data.train, seed=cfg.seed, step=step, micro=micro, batch_size=cfg.batch_size,
                                grad_accum=cfg.grad_accum, seq_len=cfg.context)
        rows = self.dist.shard(rows)  # this rank's rows of the global micro-batch
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def _next_micro(self, key: tuple[int, int]) -> tuple[int, int]:
        step, micro = key
        return (step, micro + 1) if micro + 1 < self.cfg.grad_accum else (step + 1, 0)

    def _switch_to_relora(self) -> None:
        """End of the warm start: wrap the projections and rebuild the optimizer.

        Parameters that stay trainable (embeddings, norms, head) keep their Adam
        state; the adapters start fresh and the frozen bases leave the optimizer.
        """
        old = self.optimizer
        self._wrap()
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old.state:
                    self.optimizer.state[p] = old.state[p]
        self._echo_memory()

    def _echo_memory(self) -> None:
        m = memory_footprint(self.model, self.optimizer)
        mib = {k: v / 2**20 for k, v in m.items()}
        self.echo(f"memory: weights {mib['param_bytes']:.1f} MiB ({mib['trainable_bytes']:.1f} MiB trainable), "
                  f"gradients {mib['grad_bytes']:.1f} MiB, AdamW state {mib['optimizer_state_bytes']:.1f} MiB")

    def _relora_events(self, t: int) -> dict[str, Any]:
        """Merge and/or prune after update ``t`` when its index is a multiple of the respective period."""
        r = self.cfg.relora
        events: dict[str, Any] = {}
        if t > 0 and t % r.reset_every == 0:
            relora.merge_all(self.model, self.adapter_rng)
            self.merges += 1
            events["merge"] = self.merges
        if t > 0 and t % r.optimizer_reset_period == 0 and r.optimizer_reset != "none":
            stats = relora.prune_optimizer_state(self.optimizer, relora.lora_parameters(self.model),
                                                 mode=r.optimizer_reset, ratio=r.prune_ratio, generator=self.adapter_rng)
            events["optimizer_reset"] = stats["zero_fraction"]
        return events

    def evaluate_all(self) -> dict[str, float]:
        """Validation loss (nats/token) and, on the built-in corpus, minimal-pair accuracy; sets ``last_val_loss``."""
        self.last_val_loss = self.evaluate()
        out = {"val_loss": self.last_val_loss}
        if self.eval_pairs is not None:
            from trainer.evaluate import minimal_pair_accuracy, tokenizer_for

            acc = minimal_pair_accuracy(self.model, self.eval_pairs, tokenizer_for(self.data.meta), device=self.device)
            out["pair_acc"] = acc["overall"]
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss (nats/token) over the fixed validation batches; no RNG is consumed."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.val_batches:
            with self.autocast():
                total += float(self.model.loss(x.to(self.device), y.to(self.device))) * x.numel()
            count += x.numel()
        self.model.train(was_training)
        return total / count

    def run(self, *, stop_at: int | None = None) -> Path:
        """Train until ``cfg.steps``, evaluating and checkpointing at their intervals (and at the end).

        ``stop_at`` ends the session early at that step, with a checkpoint there;
        the schedule still follows ``cfg.steps``, so ``--resume`` continues exactly.
        """
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = _progress_bar(total=cfg.steps, initial=self.step, enabled=self.progress and self.dist.is_main)
        last_saved = self.step
        try:
            t0, tokens0 = time.perf_counter(), self.tokens_seen
            while self.step < end:
                record = self.train_step()
                if (self.step % cfg.eval_interval == 0 or self.step == cfg.steps) and self.dist.is_main:
                    record.update(self.evaluate_all())
                elapsed = time.perf_counter() - t0
                record["tokens_per_s"] = (self.tokens_seen - tokens0) / max(elapsed, 1e-9)
                if self.log is not None:
                    self.log.write(record)
                if self.step % cfg.checkpoint_interval == 0 or self.step in (cfg.steps, end):
                    self.save_checkpoint()
                    last_saved = self.step
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        except KeyboardInterrupt:
            if self.step != last_saved:
                self.echo(f"\ninterrupted: saving a checkpoint at step {self.step}")
                self.save_checkpoint()
            raise
        finally:
            bar.close()
        return self.run_dir

    # -- save / cleanup ----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (and its capture file); every rank then meets at a barrier."""
        if self.dist.enabled:
            state = [t for p in self.model.parameters() for t in (p, *self.optimizer.state.get(p, {}).values())
                     if isinstance(t, torch.Tensor)]
            if not self.dist.in_sync(state):
                raise TrainingError(f"step {self.step}: the processes' weights or optimizer states differ; "
                                    f"refusing to checkpoint (the last good checkpoint is kept in {self.run_dir})")
        if self.dist.is_main:
            self._write_checkpoint()
        self.dist.barrier()

    def _write_checkpoint(self) -> None:
        if getattr(self, "capturer", None) is not None:
            self.capturer.flush()  # the previous capture is written and listed before the manifest changes again
        model = self.model
        rng = {"torch": torch.get_rng_state(), "adapter": self.adapter_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loss": self.last_loss,
            "val_loss": self.last_val_loss,
            "lr": lr_at(self.cfg, max(self.step - 1, 0)),
            "method": self.cfg.method,
            "wrapped": bool(self.wrapped),
            "merges": self.merges,
            "n_params": count_parameters(model),
            "n_trainable": count_parameters(model, trainable_only=True),
            "memory": memory_footprint(model, self.optimizer),
        }
        ckpt.save_checkpoint(self.run_dir, ckpt.CheckpointPayload(
            model=relora.dense_state_dict(model),
            adapters=relora.adapter_state_dict(model) if self.wrapped else None,
            optimizer=self.optimizer.state_dict(),
            rng=rng,
            state=state,
        ))
        if getattr(self, "capturer", None) is not None:
            self.capturer.on_checkpoint(self)  # dynamics/step_XXXXXX.h5 when due, listed in the manifest entry

    def cleanup(self) -> None:
        """Finish the pending capture write, stop the prefetch thread, close the log and leave the process group."""
        try:
            capturer = getattr(self, "capturer", None)
            if capturer is not None:
                capturer.close()  # finishes (or, after a crash, abandons cleanly) any capture still being written
        finally:
            batches = getattr(self, "batches", None)
            if batches is not None:
                batches.close()
            log = getattr(self, "log", None)
            if log is not None:
                log.close()
            self.dist.close()


def _progress_bar(*, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.5, leave=True)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming from its last complete checkpoint if ``resume``); returns ``run_dir``."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.cleanup()


def threads_hint() -> None:
    """Use every core for intra-op parallelism unless the user said otherwise (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
