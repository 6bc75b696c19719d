"""The trainer's exceptions: one root, each also the builtin it behaves like.

Catch :class:`TrainerError` for "the trainer refused or could not finish"; the
``dynamics`` command turns it into one ``error:`` line (exit status 2 for bad
input, 1 for a failed run or a damaged file on disk). Each subclass is also the
builtin a caller would expect, so ``except ValueError`` around a config still
works and a damaged checkpoint is also an ``OSError``::

    TrainerError
    ├── ConfigError(ValueError)       an impossible or unknown setting, before anything is written
    ├── DataError(ValueError)         a corpus that cannot be read or tokenised
    ├── EvaluationError(ValueError)   an evaluation input (BLiMP file, step) that cannot be used
    ├── CheckpointError(OSError)      a run directory or checkpoint missing, incomplete, corrupted or too new
    ├── CaptureError(RuntimeError)    a capture that could not be written (background writer), naming the step
    ├── TrainingError(RuntimeError)   a run that failed while training (divergence, out of memory ...)
    └── DirectoryLockedError(BlockingIOError)  another process writes this run directory (trainer.lock)

This module imports nothing: every other module of the trainer may import it.
"""

from __future__ import annotations

__all__ = [
    "TrainerError",
    "ConfigError",
    "DataError",
    "EvaluationError",
    "CheckpointError",
    "CaptureError",
    "TrainingError",
]


class TrainerError(Exception):
    """Root of every error the trainer raises on purpose (bad input, damaged files, failed runs)."""


class ConfigError(TrainerError, ValueError):
    """One or more invalid settings; the message lists all of them."""


class DataError(TrainerError, ValueError):
    """A training corpus or data setting that cannot be used (missing files, too few tokens, bad format)."""


class EvaluationError(TrainerError, ValueError):
    """An evaluation input (a minimal-pair file, a checkpoint step) that cannot be used."""


class CheckpointError(TrainerError, OSError):
    """A run directory or checkpoint that is missing, incomplete, corrupted or of an unknown schema."""


class CaptureError(TrainerError, RuntimeError):
    """A capture could not be written; raised in the training thread for a background write, naming the step."""


class TrainingError(TrainerError, RuntimeError):
    """Training could not go on (non-finite loss, out of memory, a failed collective ...)."""
