"""SIGINT (Ctrl-C) and SIGTERM (what batch schedulers send before they kill) stop training the same clean way.

While training, :class:`SignalGuard` turns the first of these signals into a
flag: the trainer finishes the step in progress (its evaluation and its
``metrics.jsonl`` record included), saves a checkpoint marked ``"interrupt":
true`` in the manifest (unless that step was just checkpointed anyway) and
raises :class:`Interrupted`. The ``dynamics`` command then exits with
``128 + signal number``: **130** after SIGINT, **143** after SIGTERM. A second
signal stops the process at once (``os._exit`` with the same status, after one
line on stderr): every file is written under a temporary name and renamed, so
what is on disk stays complete, and ``--resume`` continues from the last listed
checkpoint. Outside the training loop (setting up) the first signal raises
:class:`Interrupted` at once.

Handlers can only be installed from the main thread; elsewhere the guard does
nothing and Python's defaults apply. Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupted", "SignalGuard", "SIGNALS", "exit_status"]

#: The signals handled: Ctrl-C and a polite kill.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status for a process stopped by signal ``signum``: ``128 + signum`` (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``signum`` is the signal and ``exit_status`` what the CLI returns.

    A :class:`KeyboardInterrupt`, so code that handles Ctrl-C handles SIGTERM the same way.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)
        self.exit_status = exit_status(signum)

    def __reduce__(self) -> tuple[type[Interrupted], tuple[int]]:
        """Pickle by signal number (it crosses process boundaries, e.g. from a pool worker)."""
        return (Interrupted, (self.signum,))


class SignalGuard:
    """Installs handlers for :data:`SIGNALS` while active (a context manager); see the module docstring.

    ``deferred=True``: the first signal only sets :attr:`pending` (the caller
    checks it between steps and calls :meth:`raise_pending`); ``deferred=False``:
    it raises :class:`Interrupted` where the program is. Either way a second
    signal ends the process at once. ``echo`` receives the one-line notices.
    """

    def __init__(self, *, deferred: bool, echo: Callable[[str], None] | None = None) -> None:
        self.deferred = deferred
        self.echo = echo if echo is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.pending is not None:
            try:
                sys.stderr.write(
                    f"\n{name} again: stopping now; files written so far are complete "
                    "(`dynamics train --resume` continues from the last listed checkpoint)\n"
                )
                sys.stderr.flush()
            finally:
                os._exit(exit_status(signum))
        self.pending = signum
        if not self.deferred:
            raise Interrupted(signum)
        self.echo(f"\n{name}: finishing this step, then saving a checkpoint (send it again to stop at once)")

    def raise_pending(self) -> None:
        """Raise :class:`Interrupted` if a signal arrived."""
        if self.pending is not None:
            raise Interrupted(self.pending)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)  # None: set outside Python
        self._previous = {}
