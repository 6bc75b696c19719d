"""The training recipe: setup → train → save_checkpoint → cleanup.

One loop serves both methods. ``method = "full"`` trains every parameter;
``method = "relora"`` wraps the projections with :class:`trainer.relora.ReLoRALinear`
(after ``relora.warm_start_steps`` full-rank steps) and runs ReLoRA's three
periodic events: a **merge** of the adapters into the frozen weights every
``relora.merge_every`` updates, an **optimizer reset** (pruning the adapters'
Adam state) every ``relora.optimizer_reset_every``, and an **lr restart** of
the jagged cosine schedule every ``relora.lr_restart_every`` (both default to
the merge period). ``metrics.jsonl`` records the first two as ``merge`` (the
number of merges so far) and ``optimizer_reset`` (the fraction of pruned state).

Step ``t`` in logs and checkpoint names counts optimizer updates done: the
checkpoint ``step_000000`` is the initialisation and ``step_000100`` holds the
state after 100 updates.

Runtime policy (device, precision, compile, out of memory, the optimizer and
its learning rate) lives in :mod:`trainer.runtime`; its names stay importable
from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer import relora, tracking
from trainer.atomic import atomic_write_bytes, finite_json
from trainer.capture import Capturer, TrainingState
from trainer.config import TEXT_SOURCES, TrainConfig, config_from_dict, flatten
from trainer.data import prepare, split_rows, train_micro_rows, validation_batches
from trainer.distributed import DistContext, init_from_env
from trainer.errors import CheckpointError, ConfigError, TrainingError
from trainer.evaluate import builtin_pairs, minimal_pair_accuracy, tokenizer_for
from trainer.interrupts import Interrupted, SignalGuard
from trainer.keyed_dropout import RowKeys
from trainer.lock import LOCK_FILE, DirectoryLock
from trainer.model import Decoder, count_parameters
from trainer.prefetch import Prefetcher
from trainer.run_format import DATA_DIR, EXECUTION_SETTINGS, MANIFEST, METRICS
from trainer.runtime import (  # importable from here as before (trainer.train.resolve_device ...)
    CompiledLoss,
    autocast_for,
    build_optimizer,
    lr_at,
    resolve_device,
    set_tf32,
    threads_hint,
    training_loss,
    uses_bf16,
    uses_compile,
)
from trainer.tokenizer import padded_vocab_size

__all__ = [
    "Trainer",
    "train",
    "RESUME_MUTABLE",
    "memory_footprint",
    "global_norm",
    "JsonlLog",
    "truncate_log",
    "TrainingError",
    # re-exported from trainer.runtime
    "resolve_device",
    "threads_hint",
    "uses_bf16",
    "uses_compile",
    "CompiledLoss",
    "build_optimizer",
    "lr_at",
]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``tensors`` together, without modifying them (a 0-d float32 tensor)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)  # one fused kernel per device/dtype group
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def memory_footprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters (all, and trainable), of gradients they will get and of AdamW state (two moments each).

    Frozen parameters (ReLoRA's base matrices) have no gradient buffer and no
    optimizer state; the optimizer state is counted as AdamW allocates it at its
    first step (``exp_avg`` and ``exp_avg_sq`` of every parameter it updates).
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    optimized = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    return {
        "param_bytes": params,
        "trainable_bytes": trainable,
        "grad_bytes": trainable,
        "optimizer_state_bytes": 2 * optimized,
    }


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as strict JSON can hold it: each non-finite number ``null``, their keys listed under ``nonfinite``.

    ``{"step": 3, "grad_norm": nan}`` → ``{"step": 3, "grad_norm": None, "nonfinite": ["grad_norm"]}``.
    """
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    out = finite_json(record)
    if bad:
        out["nonfinite"] = bad
    return dict(out)


class JsonlLog:
    """Append-only JSON-lines log, flushed after every record; strict JSON (see :func:`finite_record`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(finite_record(record), allow_nan=False) + "\n")
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
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


#: Settings (dotted keys) that may differ on resume without changing what is computed.
RESUME_MUTABLE = (
    "steps",
    "eval_interval",
    "eval_batches",
    "checkpoint_interval",
    "precision",
    "tf32",
    *EXECUTION_SETTINGS,
)


class Trainer:
    """Runs one training job into ``run_dir``. Use :func:`train` for the common case."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        echo: Callable[[str], None] = print,
        given: Collection[str] | None = None,
    ) -> None:
        self.cfg = cfg.validate()
        tracking.require(self.cfg.logger)  # a tracker's missing package: one line, before anything is written
        self.run_dir = Path(run_dir)
        self.resume = resume
        # dotted keys the user gave (trainer.config.given_settings; by default what build_config recorded in
        # cfg.given); None (a config built by hand): every setting of cfg counts as given
        given = cfg.given if given is None else given
        self.given = None if given is None else frozenset(given)
        self.changed: dict[str, tuple[Any, Any]] = {}  # settings a resume changes: key -> (stored, new)
        self.lock: DirectoryLock | None = None  # held by rank 0 from setup() to cleanup()
        self.last_checkpoint: int | None = None  # step of the last checkpoint written or loaded
        self._init_weights: tuple[dict[str, torch.Tensor], int] | None = None  # --init-from, read before writing
        self.progress = progress
        self.echo = echo
        self.step = 0
        self.tokens_seen = 0
        self.merges = 0
        self.finished = False  # set by run() when training ended normally (cleanup then synchronises the ranks)
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        self.wrapped: list[str] = []
        self.row_keys = RowKeys()  # adapter-dropout keys of the micro-batch's rows, shared by the wrapped modules
        self.dist = DistContext()  # joined in setup() when launched by torchrun
        self.capturer: Capturer | None = None  # set in setup() when capture is enabled, on rank 0
        self.log: JsonlLog | None = None
        self.trackers = tracking.Trackers()  # logger=: opened in setup() on rank 0, closed in cleanup()

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.dist = init_from_env(self.device.type)
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
            if cfg.micro_batch_size % self.dist.world_size:
                raise ConfigError(
                    f"batch_size/grad_accum={cfg.micro_batch_size} must be divisible by the number of "
                    f"processes ({self.dist.world_size})"
                )
            if not self.dist.is_main:
                self.echo = lambda msg: None
        if self.dist.is_main:  # the run's one writer, until cleanup(); a second trainer or a resume is refused
            command = "dynamics train --resume" if self.resume else "dynamics train"
            self.lock = DirectoryLock(self.run_dir, command=command, echo=self.echo).acquire()
        before = {p.name for p in self.run_dir.iterdir()} if self.run_dir.is_dir() else set()
        before.discard(LOCK_FILE)
        manifest = None
        if (self.run_dir / MANIFEST).exists():
            if not self.resume:
                raise ConfigError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out"
                )
            manifest = ckpt.read_manifest(self.run_dir)
            cfg = self.cfg = self._reconcile(manifest)
        elif self.resume and not before:
            raise ConfigError(
                f"--resume: {self.run_dir} holds no run to continue (it is missing or empty); "
                "drop --resume to start a new run there"
            )
        elif before and not self.resume:
            raise ConfigError(f"{self.run_dir} exists and is not empty; choose a new --out")
        if manifest is not None and not manifest["checkpoints"]:
            manifest = None  # crashed before the first checkpoint: start over
        if manifest is None and cfg.init_from is not None:  # read and checked before anything is written
            self._init_weights = self._read_init_from(cfg.init_from)
        try:
            self._setup(manifest)
        except BaseException:
            if manifest is None and self.dist.is_main:
                self._undo_start(before)
            raise

    def _undo_start(self, before: set[str]) -> None:
        """A new run that failed before its manifest was written: remove what it wrote, leave the directory as it was."""
        if (self.run_dir / MANIFEST).exists() or not self.run_dir.is_dir():
            return
        for path in self.run_dir.iterdir():
            if path.name not in before and path.name != LOCK_FILE:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _check_data(self, vocab_size: int, n_train: int, n_val: int) -> None:
        """The corpus fits the model and holds a sequence per split (``prepare`` asks before it writes ``data/``).

        A new run on text whose ``model.vocab_size`` the user did not give takes
        the tokenizer's ``vocab_size`` padded up to a multiple of 64
        (:func:`trainer.tokenizer.padded_vocab_size`; with ``init_from``, the
        source run's, see :meth:`_read_init_from`); the manifest stores the
        resolved value, so a resume keeps it.
        """
        cfg = self.cfg
        if self._vocab_follows_data() and cfg.init_from is None:
            padded = padded_vocab_size(vocab_size)
            if padded != cfg.model.vocab_size:
                self.echo(f"model.vocab_size={padded} (the tokenizer's {vocab_size} ids, padded to a multiple of 64)")
                cfg = self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
        if vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the data uses {vocab_size} token ids but model.vocab_size={cfg.model.vocab_size}; "
                f"set model.vocab_size>={vocab_size}"
            )
        for split, n in (("train", n_train), ("val", n_val)):
            if n < cfg.context + 1:
                raise ConfigError(
                    f"the {split} split has {n} tokens, fewer than one sequence of seq_len+1={cfg.context + 1}"
                )

    def _vocab_follows_data(self) -> bool:
        """A new run on text whose ``model.vocab_size`` the user did not give (``given``, or ``cfg.given``)."""
        given = self.given is not None and "model.vocab_size" in self.given
        return self.given is not None and not given and not self.resume and self.cfg.data.source in TEXT_SOURCES

    def _setup(self, manifest: dict[str, Any] | None) -> None:
        """Everything after the directory checks: data, model, optimizer, capture; then load or start the run."""
        cfg = self.cfg
        self.dist.barrier()  # every rank has checked the directory before rank 0 writes into it

        self.autocast = autocast_for(cfg, self.device)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if manifest is None and self.resume:  # a run killed before its first checkpoint: drop its temp files
                for path in ckpt.remove_unlisted_checkpoints(self.run_dir, {"checkpoints": []}):
                    self.echo(f"removed incomplete {path}")
            self.data = prepare(cfg.data, self.run_dir / DATA_DIR, check=self._check_data, progress=self.progress)
        self.dist.barrier()
        if not self.dist.is_main:  # rank 0 wrote it: verified and memory-mapped
            self.data = prepare(cfg.data, self.run_dir / DATA_DIR, check=self._check_data, progress=self.progress)
        cfg = self.cfg  # _check_data may have resolved model.vocab_size from the tokenizer

        set_tf32(cfg, self.device)
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
        self._train_loss = training_loss(self.model.loss, cfg, self.device)
        self.batches = Prefetcher(self._micro_rows, self._next_micro, depth=cfg.prefetch, name="trainer-prefetch")
        self._echo_memory()
        self.eval_pairs = builtin_pairs(self.data.meta, n=200)
        self.val_batches = validation_batches(
            self.data.val, n_batches=cfg.eval_batches, batch_size=cfg.micro_batch_size, seq_len=cfg.context
        )
        # the fixed probe set; None when capture.enabled is false, and on ranks other than 0
        if self.dist.is_main:
            self.capturer = Capturer.for_run(cfg, self.data.train, self.data.val, self.run_dir)

        if manifest is not None:
            self._load(manifest)
            if self.dist.is_main:
                self.trackers = tracking.open_trackers(cfg, self.run_dir, resume_step=self.step)
            if self.capturer is not None:
                self.capturer.on_resume(self.model, self.training_state(), self.device, manifest)
            if self.dist.is_main:
                if self.changed:  # the manifest describes the run as it now continues, and keeps the history
                    ckpt.record_config_change(self.run_dir, cfg.to_dict(), self.changed, at_step=self.step)
                self.log = JsonlLog(self.run_dir / METRICS)
        elif not self.dist.is_main:
            self.save_checkpoint()  # rank 0 writes the manifest and the step-0 checkpoint; the others check and wait
        else:
            self.trackers = tracking.open_trackers(cfg, self.run_dir)
            manifest = ckpt.new_manifest(cfg.to_dict(), self.data.meta)
            if self.capturer is not None:
                self.capturer.describe(manifest)  # records the probe set: indices and sha256
            ckpt.write_manifest(self.run_dir, manifest)
            (self.run_dir / METRICS).unlink(missing_ok=True)
            self.log = JsonlLog(self.run_dir / METRICS)
            first = {"step": 0, **self.evaluate_all(), "tokens_seen": 0}
            self.log.write(first)
            self.trackers.log_record(first)
            self.save_checkpoint()

    def _reconcile(self, manifest: dict[str, Any]) -> TrainConfig:
        """The config to resume with: the stored one, with the settings the user gave that may change.

        Only settings given explicitly (``self.given``; all of ``self.cfg`` when
        ``None``, as for the Python API) are compared with the stored ones. A
        differing setting of :data:`RESUME_MUTABLE` is applied (``steps`` may only
        grow: an extension; the warmup, when it was 10% of ``steps``, keeps the
        run's); any other differing setting is a :class:`ConfigError` naming it.
        The changes land in ``self.changed`` (written to the manifest's history once
        the checkpoint has loaded).
        """
        stored_dict = manifest["config"]
        # the run it was initialised from may be gone by now: that setting only mattered at the start
        stored = dataclasses.replace(
            config_from_dict({**stored_dict, "init_from": None}), init_from=stored_dict.get("init_from")
        )
        asked, kept = flatten(self.cfg.to_dict()), flatten(stored.to_dict())
        keys = sorted(self.given if self.given is not None else asked)
        diffs = {k: (kept.get(k), asked[k]) for k in keys if k in asked and asked[k] != kept.get(k)}
        fixed = [k for k in diffs if k not in RESUME_MUTABLE]
        if fixed:
            shown = ", ".join(f"{k}={diffs[k][1]!r} (the run has {diffs[k][0]!r})" for k in fixed)
            raise ConfigError(
                f"resuming {self.run_dir}: {shown} cannot change on resume, it would change what the run computes; "
                "drop it to continue the run as stored, or train a new run into another --out"
            )
        if "steps" in diffs and diffs["steps"][1] < diffs["steps"][0]:
            old, new = diffs["steps"]
            raise ConfigError(
                f"resuming {self.run_dir}: steps={new} is fewer than the run's {old}; a run can be extended "
                f"(--steps > {old}), not shortened (stop it early with Ctrl-C instead)"
            )
        merged = {**kept, **{k: new for k, (_, new) in diffs.items()}}
        if "steps" in diffs and stored.warmup_steps is None and "warmup_steps" not in diffs:
            merged["warmup_steps"] = stored.warmup  # 10% of the old steps: an extension does not warm up again
            diffs["warmup_steps"] = (None, stored.warmup)
        nested: dict[str, Any] = {}
        for key, value in merged.items():
            section, _, leaf = key.partition(".")
            if leaf:
                nested.setdefault(section, {})[leaf] = value
            else:
                nested[key] = value
        cfg = dataclasses.replace(
            config_from_dict({**nested, "init_from": None}),
            init_from=stored_dict.get("init_from"),
            logger=self.cfg.logger,  # not stored (trainer.config.NOT_STORED): this session's choice
            tracking=self.cfg.tracking,
        )
        self.changed = diffs
        if diffs:
            self.echo(
                f"resuming {self.run_dir} with "
                + ", ".join(f"{k}={new} (was {old})" for k, (old, new) in diffs.items())
            )
        return cfg

    def _read_init_from(self, spec: str) -> tuple[dict[str, torch.Tensor], int]:
        """``--init-from RUN_DIR[@STEP]``'s dense weights, hash-verified and checked against this model's shapes.

        Called before anything is written: a missing run or step, a damaged file
        or a model of another shape is refused while the directory is untouched.
        """
        run, _, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
        payload = ckpt.load_checkpoint(run, int(step) if step else None)
        embed = payload.model.get("embed.weight")
        if self._vocab_follows_data() and embed is not None:  # the vocabulary of the run it starts from
            model = dataclasses.replace(self.cfg.model, vocab_size=int(embed.shape[0]))
            self.cfg = dataclasses.replace(self.cfg, model=model)
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            ours = Decoder(self.cfg.model).state_dict()
        bad = [k for k in ours if k not in payload.model or payload.model[k].shape != ours[k].shape]
        if bad:
            k = bad[0]
            theirs = tuple(payload.model[k].shape) if k in payload.model else "missing"
            raise CheckpointError(
                f"init_from {spec}: weights do not fit this model (first mismatch: {k}, "
                f"{theirs} there, {tuple(ours[k].shape)} here)"
            )
        return {k: payload.model[k] for k in ours}, int(payload.state["step"])

    def _init_from(self, spec: str) -> None:
        """Load dense weights from ``RUN_DIR@STEP`` (or ``RUN_DIR``: latest); shapes must match this model."""
        weights, step = self._init_weights if self._init_weights is not None else self._read_init_from(spec)
        self.model.load_state_dict(weights)
        self._init_weights = None
        self.echo(f"initialised from {spec.rpartition('@')[0] if '@' in spec else spec} step {step}")

    def _wrap(self) -> None:
        self.wrapped = relora.wrap_model(self.model, self.cfg.relora, self.adapter_rng, self.row_keys)

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
            raise CheckpointError(
                f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.optimizer.load_state_dict(payload.optimizer)
        torch.set_rng_state(payload.rng["torch"])
        if self.device.type == "cuda" and "cuda" in payload.rng:
            torch.cuda.set_rng_state(payload.rng["cuda"], self.device)
        self.adapter_rng.set_state(payload.rng["adapter"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.last_checkpoint = self.step
        self.merges = state.get("merges", 0)
        self.last_loss, self.last_val_loss = state.get("loss"), state.get("val_loss")
        if self.dist.is_main:
            truncate_log(self.run_dir / METRICS, self.step)
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
        total: torch.Tensor | None = None  # Σ micro-batch losses / grad_accum, a 0-d tensor on the device
        mine = self.dist.shard_range(cfg.micro_batch_size)  # this rank's rows of each global micro-batch
        for micro in range(cfg.grad_accum):
            x, y = split_rows(self.batches.get((t, micro)).to(self.device, non_blocking=True))
            if self.wrapped and cfg.relora.dropout > 0:  # masks keyed by the rows' places in step t's global batch
                self.row_keys.set(cfg.seed, t, micro * cfg.micro_batch_size + mine.start, len(mine), self.device)
            with self.autocast():
                loss = self._train_loss(x, y) / cfg.grad_accum
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None  # grad_accum >= 1
        if self.dist.enabled:
            self.dist.average_gradients([p for group in self.optimizer.param_groups for p in group["params"]])
            total = self.dist.mean(total)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None],
                cfg.grad_clip,
            )
        else:
            grad_norm = global_norm(grads)
        # one host sync per step, for both numbers (both must be checked before the update)
        loss_value, norm_value = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._diverged(t, lr, loss_value, norm_value)  # the update is not applied; raises TrainingError
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = t + 1
        self.tokens_seen += cfg.tokens_per_step
        self.last_loss = loss_value
        record = {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "tokens_seen": self.tokens_seen,
        }
        if cfg.method == "relora" and self.wrapped:
            record.update(self._relora_events(t))
        return record

    def _diverged(self, t: int, lr: float, loss: float, grad_norm: float) -> None:
        """Update ``t`` has a non-finite loss or gradient norm: log it (``null`` + ``nonfinite``), apply nothing, stop.

        The optimizer never steps on it and no checkpoint is written after it, so
        the run directory keeps its last finite checkpoint. Raises :class:`TrainingError`.
        """
        self.optimizer.zero_grad(set_to_none=True)
        record = {
            "step": t + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_seen": self.tokens_seen + self.cfg.tokens_per_step,
            "diverged": True,
        }
        if self.log is not None:
            self.log.write(record)
        self.trackers.log_record(record)
        what = [f"{name} became {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))]
        what = [w for w, v in zip(what, (loss, grad_norm)) if not math.isfinite(v)]
        kept = f"step {self.last_checkpoint}" if self.last_checkpoint is not None else "none yet"
        raise TrainingError(
            f"training diverged at step {t + 1}: the {' and the '.join(what)} (lr {lr:.3g}); the update was not "
            f"applied and nothing was saved; the last good checkpoint ({kept}) is kept in {self.run_dir}. "
            "Try a lower lr or grad_clip=1.0"
        )

    def _micro_rows(self, key: tuple[int, int]) -> torch.Tensor:
        """This rank's windows ``(b, seq_len + 1)`` int64 of micro-batch ``key = (step, micro)``; pinned on CUDA."""
        cfg = self.cfg
        step, micro = key
        rows = train_micro_rows(
            self.data.train,
            seed=cfg.seed,
            step=step,
            micro=micro,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            seq_len=cfg.context,
        )
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
        self.echo(
            f"memory: weights {mib['param_bytes']:.1f} MiB ({mib['trainable_bytes']:.1f} MiB trainable), "
            f"gradients {mib['grad_bytes']:.1f} MiB, AdamW state {mib['optimizer_state_bytes']:.1f} MiB"
        )

    def _relora_events(self, t: int) -> dict[str, Any]:
        """The merge and the optimizer reset due after update ``t`` (``t`` a positive multiple of their periods).

        Returns their ``metrics.jsonl`` fields: ``merge`` (merges done so far) and
        ``optimizer_reset`` (the fraction of the adapters' Adam state now zero).
        The lr restart needs no action here: it is part of :func:`~trainer.runtime.lr_at`.
        """
        r = self.cfg.relora
        events: dict[str, Any] = {}
        if t > 0 and t % r.merge_every == 0:
            relora.merge_all(self.model, self.adapter_rng)
            self.merges += 1
            events["merge"] = self.merges
        if t > 0 and t % r.optimizer_reset_period == 0 and r.optimizer_reset != "none":
            stats = relora.prune_optimizer_state(
                self.optimizer,
                relora.lora_parameters(self.model),
                mode=r.optimizer_reset,
                ratio=r.prune_ratio,
                generator=self.adapter_rng,
            )
            events["optimizer_reset"] = stats["zero_fraction"]
        return events

    def evaluate_all(self) -> dict[str, float]:
        """Validation loss (nats/token) and, on the built-in corpus, minimal-pair accuracy; sets ``last_val_loss``."""
        self.last_val_loss = self.evaluate()
        out = {"val_loss": self.last_val_loss}
        if self.eval_pairs is not None:
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

        SIGINT (Ctrl-C) and SIGTERM (:mod:`trainer.interrupts`): the step in
        progress finishes (its evaluation and ``metrics.jsonl`` record included),
        a checkpoint marked ``interrupt`` is saved unless the step just had one,
        and :class:`~trainer.interrupts.Interrupted` is raised; a second signal
        stops the process at once.
        """
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = _progress_bar(total=cfg.steps, initial=self.step, enabled=self.progress and self.dist.is_main)
        last_saved = self.step
        signals = SignalGuard(deferred=True, echo=self.echo).__enter__()
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
                self.trackers.log_record(record)
                if self.capturer is not None:
                    self.capturer.poll()  # lists a capture whose background write has finished; never waits
                if self.step % cfg.checkpoint_interval == 0 or self.step in (cfg.steps, end):
                    self.save_checkpoint()
                    last_saved = self.step
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False,
                )
                signum = self._signal_received(signals)
                if signum is not None:
                    raise Interrupted(signum)
        except KeyboardInterrupt as e:
            if self.step != last_saved:
                self.echo(f"\ninterrupted: saving a checkpoint at step {self.step}")
                self.save_checkpoint(interrupt=True)
            name = signal.Signals(e.signum).name if isinstance(e, Interrupted) else "KeyboardInterrupt"
            self.echo(
                f"stopped ({name}) at step {self.step}, saved; `dynamics train --out {self.run_dir} --resume` continues"
            )
            raise
        finally:
            signals.__exit__(None, None, None)
            bar.close()
        self.finished = True  # every rank got here: cleanup may wait for the others before leaving the group
        return self.run_dir

    def _signal_received(self, signals: SignalGuard) -> int | None:
        """The signal to stop on, if any process of the job received one (all ranks stop at the same step)."""
        if not self.dist.enabled:
            return signals.pending
        flag = torch.tensor(float(signals.pending or 0), device=self.device)
        agreed = int(round(float(self.dist.mean(flag)) * self.dist.world_size))  # the sum of the ranks' signals
        if agreed == 0:
            return None
        return signals.pending or signal.SIGTERM

    # -- save / cleanup ----------------------------------------------------------------------

    def save_checkpoint(self, *, interrupt: bool = False) -> None:
        """Rank 0 writes the checkpoint (and its capture file); every rank then meets at a barrier.

        Non-finite weights are never saved (:class:`TrainingError`; the last good
        checkpoint stays the latest). ``interrupt`` marks a checkpoint saved on a signal.
        """
        bad = self._nonfinite_weights()
        if bad is not None:
            raise TrainingError(
                f"training diverged at step {self.step}: {bad} holds NaN or Inf; not saved (the last good checkpoint, "
                f"step {self.last_checkpoint}, is kept in {self.run_dir}). Try a lower lr or grad_clip=1.0"
            )
        if self.dist.enabled:
            state = [
                t
                for p in self.model.parameters()
                for t in (p, *self.optimizer.state.get(p, {}).values())
                if isinstance(t, torch.Tensor)
            ]
            if not self.dist.in_sync(state):
                raise TrainingError(
                    f"step {self.step}: the processes' weights or optimizer states differ; "
                    f"refusing to checkpoint (the last good checkpoint is kept in {self.run_dir})"
                )
        if self.dist.is_main:
            self._write_checkpoint(interrupt=interrupt)
        self.last_checkpoint = self.step
        self.dist.barrier()

    def _nonfinite_weights(self) -> str | None:
        """The name of the first parameter holding NaN or Inf, else ``None`` (one host sync)."""
        named = [(n, p) for n, p in self.model.named_parameters()]
        if not named:
            return None
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
        return next((n for (n, _), ok in zip(named, finite) if not ok), None)

    def training_state(self) -> TrainingState:
        """Where training stands now: what a checkpoint's ``trainer_state.json`` and a capture file record."""
        wrapped = bool(self.wrapped)
        return TrainingState(
            step=self.step,
            tokens_seen=self.tokens_seen,
            loss=self.last_loss,
            val_loss=self.last_val_loss,
            lr=lr_at(self.cfg, max(self.step - 1, 0)),
            merges=self.merges,
            wrapped=wrapped,
            lora_scale=self.cfg.relora.scale if wrapped else float("nan"),
        )

    def _write_checkpoint(self, *, interrupt: bool = False) -> None:
        if self.capturer is not None:
            self.capturer.flush()  # the previous capture is written and listed before the manifest changes again
        model = self.model
        rng = {"torch": torch.get_rng_state(), "adapter": self.adapter_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        now = self.training_state()
        state = {
            "step": now.step,
            "tokens_seen": now.tokens_seen,
            "loss": now.loss,
            "val_loss": now.val_loss,
            "lr": now.lr,
            "method": self.cfg.method,
            "wrapped": now.wrapped,
            "merges": now.merges,
            "n_params": count_parameters(model),
            "n_trainable": count_parameters(model, trainable_only=True),
            "memory": memory_footprint(model, self.optimizer),
        }
        dense = relora.dense_state_dict(model)  # W + s·B·A of wrapped layers: saved, and summarised for trackers
        ckpt.save_checkpoint(
            self.run_dir,
            ckpt.CheckpointPayload(
                model=dense,
                adapters=relora.adapter_state_dict(model) if self.wrapped else None,
                optimizer=self.optimizer.state_dict(),
                rng=rng,
                state=state,
            ),
            **({"interrupt": True} if interrupt else {}),  # marked only when saved on a signal
        )
        self.trackers.log_weight_per(now.step, dense, self.cfg.model.n_layers)  # no-op without a tracker
        if self.capturer is not None:
            # dynamics/step_XXXXXX.h5 when due: written in the background, listed in the manifest entry later
            self.capturer.on_checkpoint(model, now, self.device)

    def cleanup(self) -> None:
        """Finish the pending capture write, stop the prefetch thread, close the log, leave the process group, unlock."""
        try:
            if self.capturer is not None:
                self.capturer.close()  # finishes (or, after a crash, abandons cleanly) any capture still being written
        finally:
            try:
                batches: Prefetcher[tuple[int, int], torch.Tensor] | None = getattr(self, "batches", None)  # setup()
                if batches is not None:
                    batches.close()
                if self.log is not None:
                    self.log.close()
                self.trackers.close(finished=self.finished)  # warns, never raises
                self.dist.close(synchronize=self.finished)
            finally:
                if self.lock is not None:
                    self.lock.release()  # last: nothing of this run is written after it


def _progress_bar(*, total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5, leave=True
    )


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    given: Collection[str] | None = None,
) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming from its last complete checkpoint if ``resume``); returns ``run_dir``.

    ``given``: the dotted keys the user set explicitly (:func:`trainer.config.given_settings`; ``None``: what
    :func:`~trainer.config.build_config` recorded in ``cfg.given``, or, for a config built by hand, all of
    ``cfg``). On resume only those are compared with the stored run (:meth:`Trainer._reconcile`); a new text
    run's vocabulary follows its tokenizer unless ``model.vocab_size`` is among them.
    A signal while setting up or finishing raises :class:`~trainer.interrupts.Interrupted` at once (a new
    run's files are removed again); while training see :meth:`Trainer.run`. After training stopped on a
    signal, another one exits the process at once (the files on disk are complete either way).
    """
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, given=given)
    with SignalGuard(deferred=False, echo=trainer.echo) as signals:
        try:
            trainer.setup()
            return trainer.run()  # holds its own deferred guard while it trains
        except Interrupted as e:
            signals.pending = e.signum  # a second signal during the cleanup below exits at once
            raise
        finally:
            trainer.cleanup()
