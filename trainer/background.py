"""One background job at a time, on a worker thread, with its result or error handed back to the caller's thread.

Used by :class:`trainer.capture.Capturer` to write capture files while training
goes on. The contract is deliberately small:

* :meth:`BackgroundJob.submit` first waits for the previous job (so at most one
  runs, and jobs finish in submission order; the previous result is dropped:
  call :meth:`~BackgroundJob.wait` first to get it), then starts the new one;
* :meth:`BackgroundJob.wait` blocks until the current job is done and returns
  its result, or re-raises, in the calling thread, the exception it raised
  (the same object; on Python 3.11+ with a note naming the job);
* :meth:`BackgroundJob.cancel` asks the current job to stop early: the job
  receives a ``stop_requested()`` callable and decides where it can stop
  cleanly (it may also ignore it).

The worker is a plain, non-daemon thread: the interpreter waits for a job
still running at exit instead of killing it half-way. A ``SIGKILL`` (or
``os._exit``) from either thread ends the whole process, as for any crash.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: A job: called on the worker thread with ``stop_requested()``, which turns true after
#: :meth:`BackgroundJob.cancel`; what it returns is handed to the owner by :meth:`BackgroundJob.wait`.
Job = Callable[[Callable[[], bool]], T]


class BackgroundJob(Generic[T]):
    """Runs :data:`Job` callables one at a time on a worker thread; ``T`` is what a job returns.

    Not itself thread-safe: ``submit``/``wait``/``cancel`` are meant to be called
    from one (the owner's) thread.
    """

    def __init__(self, name: str = "background") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._label = ""
        self._result: T | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    @property
    def pending(self) -> bool:
        """Whether a job was submitted and not yet waited for (it may have finished already)."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        """Whether the current job is still executing."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def finished(self) -> bool:
        """Whether a job was submitted, has ended, and was not yet waited for (:meth:`wait` then returns at once)."""
        return self._thread is not None and not self._thread.is_alive()

    @property
    def label(self) -> str:
        """The label of the current (or last) job."""
        return self._label

    def submit(self, job: Job[T], *, label: str) -> None:
        """Wait for the previous job (re-raising its error, dropping its result), then start ``job`` on a new thread."""
        self.wait()
        self._stop.clear()
        self._label = label
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"{self.name}: {label}", daemon=False)
        self._thread.start()

    def _run(self, job: Job[T]) -> None:
        try:
            self._result = job(self._stop.is_set)
        except BaseException as e:  # noqa: BLE001 - handed to the owner's thread by wait()
            self._error = e

    def cancel(self) -> None:
        """Ask the current job to stop at its next check of ``stop_requested()``; does not wait."""
        self._stop.set()

    def wait(self) -> T | None:
        """Block until the current job is done; return its result, or re-raise its exception here (once each).

        ``None`` when no job is pending (or the job returned ``None``).
        """
        thread = self._thread
        if thread is not None:
            thread.join()  # interruptible (KeyboardInterrupt) on the main thread; the job then keeps running
            self._thread = None
        result, self._result = self._result, None
        error, self._error = self._error, None
        if error is not None:
            if hasattr(error, "add_note"):  # Python >= 3.11: shown with the traceback
                error.add_note(f"raised in the background by {self.name}: {self._label}")
            raise error
        return result
