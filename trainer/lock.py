"""One writer per directory: an OS-level lock held while a command writes into a run (or a cache) directory.

Every command that writes into a directory holds its lock for as long as it
writes: ``dynamics train`` (new runs and ``--resume``) the run directory,
``dynamics export`` the export directory, ``dynamics analyze`` its cache
directory (``<out>.cache``). A second writer is refused at once with
:class:`DirectoryLockedError` naming the holder (exit status 2 at the CLI)::

    error: runs/a is in use by `dynamics train` (pid 4242 on host gpu1, since 2025-01-02T10:00:00+0000); ...

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.lock``, a small
JSON file naming the holder (``pid``, ``host``, ``since``, ``command``). The
kernel releases a flock when its process dies, however it dies (SIGKILL, power
loss on a local disk), so a lock can never be stuck: a lock file left by a dead
process is simply taken over, with a message naming it. The file is removed
when the lock is released, after the holder has checked (on acquiring) that
the path still names the file it locked, so removing it cannot let two
writers in. A directory the lock had to create is removed again on release if
it is still empty: a refused or failed start leaves the file system as it was.

This module imports only the standard library and :mod:`trainer.errors`
(readers of a run directory never take the lock; only writers do).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from trainer.errors import TrainerError

__all__ = ["LOCK_FILE", "DirectoryLock", "DirectoryLockedError", "lock_holder", "pid_alive"]

#: The lock file's name inside the locked directory.
LOCK_FILE = ".lock"


class DirectoryLockedError(TrainerError, BlockingIOError):
    """Another process holds the directory's lock; the message names it (pid, host, since, command)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (``kill(pid, 0)``; ``EPERM`` counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def lock_holder(directory: str | Path) -> dict[str, Any] | None:
    """What ``<directory>/.lock`` says about its holder (``pid``, ``host``, ``since``, ``command``), or ``None``.

    Only a description: whether the lock is *held* is known to the kernel alone
    (:meth:`DirectoryLock.acquire` asks it).
    """
    try:
        return _parse_holder((Path(directory) / LOCK_FILE).read_text())
    except OSError:
        return None


def _live_holder(fd: int, *, wait: float = 1.0) -> dict[str, Any] | None:
    """The holder named by the locked file ``fd``, waiting up to ``wait`` seconds for the new holder's record.

    A process that has just taken the lock writes its record a moment later; until then the file is empty or
    still names the previous (gone) holder, so re-read until it names a live process on this host (or one on
    another host, which cannot be checked from here), and return what is there after ``wait``.
    """
    deadline = time.monotonic() + wait
    while True:
        holder = _parse_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if holder is not None:
            pid = holder.get("pid")
            if holder.get("host") != socket.gethostname() or (isinstance(pid, int) and pid_alive(pid)):
                return holder
        if time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process (its lock file names no holder yet)"
    command = holder.get("command")
    who = f"`{command}` " if command else ""
    return f"{who}(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')})"


class DirectoryLock:
    """The exclusive lock of one directory, as a context manager::

        with DirectoryLock(run_dir, command="dynamics train"):
            ...  # the only writer of run_dir

    ``acquire`` creates the directory (and missing parents) when needed and
    raises :class:`DirectoryLockedError` when another process holds the lock.
    ``release`` (also on an error) unlocks, removes the lock file and removes
    the directories ``acquire`` created if they are empty again. ``echo``
    receives the one-line message printed when a stale lock file (of a process
    that is gone) is taken over; the default is a :class:`UserWarning`.
    ``name`` is the lock file's name in ``directory`` (:data:`LOCK_FILE`; a
    directory that must not exist yet is locked by ``.<its name>.lock`` beside it).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        command: str,
        echo: Callable[[str], None] | None = None,
        name: str = LOCK_FILE,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.command = command
        self.echo = echo if echo is not None else (lambda msg: warnings.warn(msg, stacklevel=3))
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock (never waits). Raises :class:`DirectoryLockedError` naming the holder when it is taken."""
        if self._fd is not None:
            return self
        self._make_directory()
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _live_holder(fd)
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise DirectoryLockedError(
                            f"{self.directory} is in use by {_describe(holder)}; wait for it to finish, stop it, "
                            "or choose another directory"
                        ) from None
                    raise
                # the holder we waited out may have removed the file between our open and our flock: lock the new one
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
        except BaseException:
            self._remove_created()
            raise
        self._fd = fd
        self._take_over(_parse_holder(os.pread(fd, 4096, 0).decode(errors="replace")))
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": self.command,
        }
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:  # a full disk: say which file, and leave nothing behind
            self.release()
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        return self

    def _take_over(self, previous: dict[str, Any] | None) -> None:
        """Say so when the lock file names another process: it no longer holds the lock (the kernel said so)."""
        if previous is None or previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname():
            return
        pid, host = previous.get("pid"), previous.get("host")
        here = host == socket.gethostname()
        if here and isinstance(pid, int) and not pid_alive(pid):
            state = "which is no longer running"
        elif here:
            state = "which no longer holds it"
        else:
            state = "whose lock is free (that host's process cannot be checked from here)"
        self.echo(f"taking over the stale lock of {self.directory} left by {_describe(previous)}, {state}")

    def _make_directory(self) -> None:
        missing = []
        d = self.directory
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Unlock; remove the lock file and the (empty) directories :meth:`acquire` created. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still ours: acquire() checked that the path names the locked file
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock
        self._remove_created()

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
