"""Publish an analysis table to an experiment tracker, so the study's curves sit next to the loss curves.

``dynamics analyze RUN... --log-to tensorboard DIR`` (or ``wandb DIR`` / ``mlflow DIR``) calls
:func:`publish` on the table :func:`dynamics.analyze.analyze_runs` returned. Each run of the
table becomes one tracker run, one point per analysed step, with one series per
``(kind, metric, component)``::

    <kind>/<metric>/<component>      e.g.  weight/proportional_effective_rank/attn.q

the value being the **mean over layers** (and over heads, for per-head circuits:
``attn.ov.h3`` → ``attn.ov``) of the finite values at that step; a model-level
component (``embed``, ``lm_head``, ``model``) is its one value. Non-finite values
(an infinite condition number) are left out of the mean, and a series with none
at a step has no point there. ``run`` rows (the seed) are not curves and are
skipped. The x axis is the training step, as in the trainer's own tracker logs
(:mod:`trainer.tracking`), so ``tensorboard --logdir .`` over the runs and DIR
shows both.

Where it writes: TensorBoard event files in ``DIR/<run>/``; W&B runs named
``<run>-analysis`` under ``DIR/wandb/`` (offline unless ``$WANDB_MODE`` says
otherwise); MLflow runs ``<run>-analysis`` of experiment ``relora-dynamics`` in the
store at ``DIR`` (a directory: a local file store; or a tracking URI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.validation import DynamicsError
from trainer.tracking import (
    TRACKERS,
    MlflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    mlflow_uri,
    require,
)

__all__ = ["PUBLISHERS", "series", "publish", "describe"]

#: Trackers ``--log-to`` accepts (those of ``logger=``).
PUBLISHERS = TRACKERS
#: Kinds of rows that are not curves over training.
SKIPPED_KINDS = ("run",)
_HEAD = re.compile(r"\.h\d+$")
_NEEDED = ("run", "step", "component", "kind", "metric", "value")


def series(table: pd.DataFrame) -> dict[str, dict[int, dict[str, float]]]:
    """``{run: {step: {tag: value}}}`` of a results table: the means described in the module docstring.

    Runs and steps are sorted ascending. Raises :class:`DynamicsError` if a column is missing.
    """
    missing = [c for c in _NEEDED if c not in table.columns]
    if missing:
        raise DynamicsError(f"publish: the results table lacks the columns {missing}; is it from `dynamics analyze`?")
    rows = table.loc[~table["kind"].isin(SKIPPED_KINDS), list(_NEEDED)]
    values = pd.to_numeric(rows["value"], errors="coerce")
    rows = rows.assign(value=values)[np.isfinite(values.to_numpy(dtype=float))]
    rows = rows.assign(component=rows["component"].astype(str).str.replace(_HEAD, "", regex=True))
    means = rows.groupby(["run", "step", "kind", "metric", "component"], sort=True)["value"].mean()
    out: dict[str, dict[int, dict[str, float]]] = {}
    for (run, step, kind, metric, component), value in means.items():
        out.setdefault(str(run), {}).setdefault(int(step), {})[f"{kind}/{metric}/{component}"] = float(value)
    return out


def _safe(label: str) -> str:
    """A run label as one path component."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("._") or "run"


def _open(logger: str, target: Path | str, run: str) -> Tracker:
    if logger == "tensorboard":
        return TensorBoardTracker(Path(target) / _safe(run))
    if logger == "wandb":
        mode = os.environ.get("WANDB_MODE") or "offline"
        return WandbTracker(target, project="relora-dynamics", name=f"{run}-analysis", mode=mode)
    return MlflowTracker(mlflow_uri(target), experiment="relora-dynamics", run_name=f"{run}-analysis")


def publish(table: pd.DataFrame, logger: str, target: str | Path) -> dict[str, int]:
    """Write ``table``'s series (:func:`series`) to ``logger`` at ``target``; returns ``{run: points written}``.

    ``logger`` is one of :data:`PUBLISHERS`; a missing package is a one-line
    :class:`~trainer.errors.ConfigError` naming the extra, and a tracker that fails is a
    :class:`DynamicsError` naming it and the target.
    """
    if logger not in PUBLISHERS:
        raise DynamicsError(f"--log-to: unknown tracker {logger!r}; choose from {', '.join(PUBLISHERS)}")
    require([logger])
    counts: dict[str, int] = {}
    for run, steps in series(table).items():
        tracker: Tracker | None = None
        try:
            tracker = _open(logger, target, run)
            for step, values in steps.items():
                tracker.log_scalars(step, values)
            counts[run] = sum(len(v) for v in steps.values())
        except Exception as e:  # noqa: BLE001 - each tracker raises its own types; one line names it
            raise DynamicsError(
                f"--log-to {logger} {target}: publishing run {run!r} failed: {_first_line(e)}"
            ) from None
        finally:
            if tracker is not None:
                tracker.close()
    return counts


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def describe(counts: Mapping[str, int], logger: str, target: str | Path) -> str:
    """One line for the command: what was published where."""
    return f"published {sum(counts.values())} points of {len(counts)} run(s) to {logger} at {target}"
