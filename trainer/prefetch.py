"""Prepare the next micro-batches in a background thread while the device computes.

The training loop asks for micro-batches by key ``(step, micro)`` in order. A
:class:`Prefetcher` runs ``make(key)`` for the keys that follow in one daemon
thread, at most ``depth`` ahead, so reading windows from the memory-mapped
token file, stacking them and pinning them (on CUDA) overlap the previous
step's compute. What ``make`` returns does not depend on the thread: the
batches are exactly those of the synchronous path.

Asking for a key other than the next one (a resume, a jump) discards what was
prepared and starts again from that key. An exception in ``make`` is raised by
the :meth:`Prefetcher.get` that asks for its key.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked worker checks whether it was told to stop


class Prefetcher(Generic[K, T]):
    """``get(key)`` returns ``make(key)``; with ``depth > 0`` the following keys are made ahead in a thread."""

    def __init__(
        self, make: Callable[[K], T], successor: Callable[[K], K], *, depth: int = 2, name: str = "prefetch"
    ) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.make, self.successor, self.depth, self.name = make, successor, depth, name
        self._queue: queue.Queue[tuple[K, T | None, BaseException | None]] | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def get(self, key: K) -> T:
        """The item for ``key``, prepared ahead when possible."""
        if self.depth == 0:
            return self.make(key)
        if self._queue is None:
            self._start(key)
        assert self._queue is not None
        got, item, error = self._queue.get()
        if got != key:  # not the next key in order: start over from this one
            self._start(key)
            got, item, error = self._queue.get()
        if error is not None:
            self.close()  # the worker has stopped; a later get starts a fresh one
            raise error
        return item  # type: ignore[return-value]

    def _start(self, key: K) -> None:
        self.close()
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(key, self._queue, self._stop), name=self.name, daemon=True
        )
        self._thread.start()

    def _work(self, key: K, out: queue.Queue[tuple[K, T | None, BaseException | None]], stop: threading.Event) -> None:
        while not stop.is_set():
            entry: tuple[K, T | None, BaseException | None]
            try:
                entry = (key, self.make(key), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                entry = (key, None, e)
            while not stop.is_set():
                try:
                    out.put(entry, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if entry[2] is not None:
                return
            key = self.successor(key)

    def close(self) -> None:
        """Stop the worker thread (if any) and drop what it prepared."""
        if self._thread is not None:
            assert self._stop is not None and self._queue is not None
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a worker waiting to put
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=_POLL_S)
        self._thread = self._stop = self._queue = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finaliser must not raise (the interpreter may be shutting down)
            pass
