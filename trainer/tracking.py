"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, behind one small interface.

``logger=tensorboard,wandb,mlflow`` (any subset; :class:`trainer.config.TrackingConfig`
says where each writes) makes the trainer send what it writes to ``metrics.jsonl``
to each tracker too, under these names (the same in every tracker):

============================ ==================================================================
``train/<key>``              every step: ``loss``, ``lr``, ``grad_norm``, ``tokens_seen``,
                             ``tokens_per_s`` (any other number of the step's record too)
``eval/<key>``               at evaluations: ``val_loss``, ``pair_acc``
``events/<key>``             ReLoRA events at the step they happen: ``merge`` (merges so far),
                             ``optimizer_reset`` (fraction of the adapters' Adam state zeroed),
                             ``diverged`` (1 at the step training stopped on a NaN/Inf)
``weights/per/<component>``  at each checkpoint: mean over layers of the proportional effective
                             rank of the (effective, for ReLoRA ``W + s·B·A``) weight of each
                             projection ``q k v o gate up down`` (:func:`weight_per`)
============================ ==================================================================

The step is the ``step`` of ``metrics.jsonl`` (optimizer updates done). Events are
plain scalars in every tracker (a TensorBoard scalar, a W&B key, an MLflow
metric), so they line up with the loss curves. The resolved config
(:func:`trainer.config.flatten` of ``TrainConfig.to_dict()``) is logged once as
hyper-parameters: TensorBoard's HParams plugin plus a ``config`` text, the W&B
run config, MLflow params.

Where they write (defaults under the run directory): TensorBoard ``<run>/tb/``;
W&B ``<run>/wandb/`` in offline mode unless ``tracking.wandb_mode`` or
``$WANDB_MODE`` says otherwise (``wandb sync <run>/wandb/offline-run-*`` uploads
it later); MLflow the local file store ``<run>/mlruns`` (``mlflow ui
--backend-store-uri <run>/mlruns``). MLflow 3 refuses file stores unless
``MLFLOW_ALLOW_FILE_STORE=true``, and mlflow-skinny cannot open ``sqlite:`` stores
(no SQLAlchemy), so for a ``file:`` store this module sets that variable while it
opens the store, and restores it after.

Failure policy: a tracker whose package is missing is a one-line
:class:`~trainer.errors.ConfigError` naming the extra to install
(:func:`require`), raised before anything is written. A tracker that raises
while opening or logging warns once (:class:`TrackerWarning`, one line) and is
off for the rest of the run: training never stops because of a tracker.

Packages are imported inside the functions that need them, so importing this
module costs nothing beyond torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.config import TRACKERS, WANDB_MODES, TrainConfig, flatten
from trainer.envvars import environ_set
from trainer.errors import ConfigError
from trainer.names import ATTN_PROJS, MLP_PROJS

__all__ = [
    "TRACKERS",
    "TrackerWarning",
    "Tracker",
    "TensorBoardTracker",
    "WandbTracker",
    "MlflowTracker",
    "mlflow_uri",
    "Trackers",
    "require",
    "open_trackers",
    "tag_for",
    "hyperparameters",
    "proportional_effective_rank",
    "weight_per",
]

#: The import that proves each tracker is installed, and the extra of ``relora-dynamics`` that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
#: ``metrics.jsonl`` keys logged under ``eval/`` and ``events/``; every other number of a record goes under ``train/``.
EVAL_KEYS = ("val_loss", "pair_acc")
EVENT_KEYS = ("merge", "optimizer_reset", "diverged")


class TrackerWarning(UserWarning):
    """A tracker failed while the run went on; it is off from then on."""


def require(names: Sequence[str] | None) -> None:
    """Import each tracker's package; a missing one is a one-line :class:`ConfigError` naming the extra to install."""
    import importlib

    for name in names or ():
        if name not in _PACKAGES:
            raise ConfigError(f"logger: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, extra = _PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"logger={name} needs the {module} package: pip install relora-dynamics[{extra}]"
            ) from None


def tag_for(key: str) -> str:
    """The tracker name of a ``metrics.jsonl`` key: ``loss`` → ``train/loss``, ``val_loss`` → ``eval/val_loss``, ``merge`` → ``events/merge``."""
    if key in EVAL_KEYS:
        return f"eval/{key}"
    if key in EVENT_KEYS:
        return f"events/{key}"
    return f"train/{key}"


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as flat ``{dotted key: value}`` (lists as ``"a,b"``, ``None`` as ``"null"``)."""
    out: dict[str, Any] = {}
    for key, value in flatten(cfg.to_dict()).items():
        if value is None:
            out[key] = "null"
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = value
    return out


class Tracker(Protocol):
    """One tracker. ``name`` is its ``logger=`` name; every method may raise (:class:`Trackers` contains that)."""

    name: str

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``{tag: value}`` at ``step``."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat hyper-parameters ``{dotted key: str | int | float | bool}``."""

    def close(self, *, finished: bool = True) -> None:
        """Flush and finish the run; ``finished=False``: the session ended early (interrupted, diverged, failed)."""


class TensorBoardTracker:
    """Event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``); one scalar series per tag."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first new step; TensorBoard hides the events of that step and later
        ones that an interrupted session logged after its last checkpoint, so re-run steps appear once."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """HParams-plugin summaries (read by TensorBoard's HParams tab) and a ``config`` text of the JSON."""
        from torch.utils.tensorboard.summary import hparams

        experiment, start, end = hparams(dict(params), {})
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(dict(params), indent=1, sort_keys=True) + "\n```", 0)

    def close(self, *, finished: bool = True) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run whose files go to ``<dir>/wandb/``; ``mode`` ``offline`` needs no network or account."""

    name = "wandb"

    def __init__(self, dir: str | Path, *, project: str, name: str, mode: str) -> None:
        import wandb

        Path(dir).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True)
        if mode not in WANDB_MODES:
            raise ValueError(f"W&B mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        run_mode: Any = mode  # one of wandb.init's literal modes
        self.run = wandb.init(dir=str(dir), project=project, name=name, mode=run_mode, settings=settings)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def close(self, *, finished: bool = True) -> None:
        self.run.finish(exit_code=0 if finished else 1)


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 opens a ``file:`` store only with ``MLFLOW_ALLOW_FILE_STORE=true``: set it around the opening."""
    if not uri.startswith("file:"):
        yield
        return
    with environ_set({"MLFLOW_ALLOW_FILE_STORE": "true"}):
        yield


def mlflow_uri(location: str | Path) -> str:
    """A tracking URI: ``location`` itself if it has a scheme (``file:``, ``http://`` ...), else the ``file:`` URI of that directory."""
    text = str(location)
    if "://" in text or text.startswith("file:"):
        return text
    return Path(text).resolve().as_uri()


class MlflowTracker:
    """An MLflow run in experiment ``experiment`` of the store at ``uri`` (``MlflowClient``: no global state)."""

    name = "mlflow"

    def __init__(self, uri: str, *, experiment: str, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        with _file_store_allowed(uri):
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)  # opens (and caches) the store
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for tag, value in values.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def close(self, *, finished: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Trackers:
    """The run's trackers together: each call goes to every live tracker; one that raises warns once and is dropped."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers: list[Tracker] = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, action: Callable[[Tracker], object], what: str) -> None:
        for tracker in list(self.trackers):
            try:
                action(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker never stops training, whatever it raises
                self.trackers.remove(tracker)
                _warn(
                    f"{tracker.name} tracker failed while {what} ({_first_line(e)}); it is off for the rest of this run"
                )

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values:
            self._each(lambda t: t.log_scalars(step, values), f"logging step {step}")

    def log_record(self, record: Mapping[str, Any]) -> None:
        """A ``metrics.jsonl`` record: every number but ``step`` (NaN too: a diverged step), named by :func:`tag_for`; ``True`` is 1."""
        values = {tag_for(k): float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.log_scalars(int(record["step"]), values)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each(lambda t: t.log_params(params), "logging the config")

    def log_weight_per(self, step: int, weights: Mapping[str, torch.Tensor], n_layers: int) -> None:
        """``weights/per/<projection>`` at ``step`` of the dense ``weights`` (:func:`weight_per`); nothing is
        computed without a tracker.

        A failed computation (e.g. an SVD that does not converge) warns and skips this checkpoint's values.
        """
        if not self.trackers:
            return
        try:
            per = weight_per(weights, n_layers)
        except Exception as e:  # noqa: BLE001 - a summary never stops training, whatever the SVD raises
            _warn(f"weight PER at step {step} not logged ({_first_line(e)})")
            return
        self.log_scalars(step, {f"weights/per/{proj}": value for proj, value in per.items()})

    def close(self, *, finished: bool = True) -> None:
        """Finish every tracker (a failure warns); the set is empty afterwards. ``finished=False`` marks the
        trackers' runs as ended early where they keep a status (MLflow ``KILLED``, W&B exit code 1)."""
        self._each(lambda t: t.close(finished=finished), "closing")
        self.trackers = []


def _warn(message: str) -> None:
    warnings.warn(message, TrackerWarning, stacklevel=3)


def open_trackers(cfg: TrainConfig, run_dir: str | Path, *, resume_step: int | None = None) -> Trackers:
    """The trackers of ``cfg.logger`` for the run in ``run_dir`` (see the module docstring for where they write).

    ``resume_step``: the checkpoint a resumed run continues from (TensorBoard then replaces what an
    interrupted session logged after it); ``None`` for a new run.

    Call :func:`require` first (before anything is written) for the missing-package error; here a tracker
    that fails to open warns once and is left out.
    """
    run_dir = Path(run_dir)
    t = cfg.tracking
    name = t.run_name or run_dir.resolve().name
    openers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: TensorBoardTracker(
            t.tensorboard_dir or run_dir / "tb", purge_step=None if resume_step is None else resume_step + 1
        ),
        "wandb": lambda: WandbTracker(
            t.wandb_dir or run_dir,
            project=t.wandb_project,
            name=name,
            mode=t.wandb_mode or os.environ.get("WANDB_MODE") or "offline",
        ),
        "mlflow": lambda: MlflowTracker(
            mlflow_uri(t.mlflow_uri or run_dir / "mlruns"), experiment=t.mlflow_experiment, run_name=name
        ),
    }
    opened: list[Tracker] = []
    for tracker in cfg.logger or ():
        try:
            opened.append(openers[tracker]())
        except Exception as e:  # noqa: BLE001 - a tracker never stops training, whatever it raises
            _warn(f"{tracker} tracker could not start ({_first_line(e)}); training goes on without it")
    trackers = Trackers(opened)
    trackers.log_params(hyperparameters(cfg))
    return trackers


# --------------------------------------------------------------------------- spectral summaries


def proportional_effective_rank(matrices: torch.Tensor) -> torch.Tensor:
    """PER of each matrix of ``matrices`` (..., m, n): float64 (...), in (0, 1]; the zero matrix gives 0.

    ``PER = exp(H(p)) / k`` with ``p_i = σ_i / Σσ``, ``H(p) = −Σ p_i ln p_i`` (natural log, ``0 ln 0 = 0``),
    ``k = min(m, n)`` (Roy & Vetterli 2007; SPEC §5). Singular values only (``torch.linalg.svdvals``), in
    float64 on CPU and float32 on an accelerator (float64 SVD is slow there); the entropy in float64.
    """
    if matrices.ndim < 2:
        raise ValueError(
            f"proportional_effective_rank: expected (..., m, n) matrices, got shape {tuple(matrices.shape)}"
        )
    dtype = torch.float64 if matrices.device.type == "cpu" else torch.float32
    tall = matrices if matrices.shape[-2] >= matrices.shape[-1] else matrices.mT  # same σ; LAPACK is faster on tall
    s = torch.linalg.svdvals(tall.to(dtype)).double()  # (..., k), descending, >= 0
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0
    rank = torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))
    return (rank / min(matrices.shape[-2:])).cpu()


@torch.no_grad()
def weight_per(weights: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, float]:
    """Mean over layers of the PER of each projection's weight: ``{"q": ..., ..., "down": ...}``.

    ``weights``: the model's dense weights under canonical keys (``layers.{i}.attn.q.weight`` …), as the
    checkpoint saves them (:func:`trainer.relora.dense_state_dict`: a ReLoRA layer's effective ``W + s·B·A``).
    One batched ``svdvals`` per projection over the ``n_layers`` matrices, on the weights' device.
    """
    out: dict[str, float] = {}
    for block, projs in (("attn", ATTN_PROJS), ("mlp", MLP_PROJS)):
        for proj in projs:
            mats = torch.stack([weights[f"layers.{i}.{block}.{proj}.weight"].detach() for i in range(n_layers)])
            out[proj] = float(proportional_effective_rank(mats).mean())
    return out
