"""Keep freed memory for reuse while analysis runs (glibc's ``malloc``; elsewhere a no-op; stdlib only).

An analysis unit allocates and frees the same large temporaries over and over: each matrix group's float64
copies, differences, ``|W|`` and its sorted copy (tens to hundreds of MiB each for a ``small`` model). glibc
serves a block above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and gives it back with
``munmap`` when freed, and a thread other than the main one allocates from its own arena, made of 64 MiB heaps
that are unmapped when they empty. Either way the kernel zero-fills the same pages again for the next group:
analysing the ``small`` full-rank run of ``benchmarks/analyze_bench.py`` (5 checkpoints, 2 cores) spent 28 s of
system time in 3.1M page faults, against 78 s of wall time, and page faults of two threads serialise on the
process's memory map.

:func:`reuse_freed_memory` turns that off for as long as it is held: ``mallopt(M_MMAP_MAX, 0)`` (every block from
a heap, whose freed blocks are reused without the kernel), a trim threshold of 2 GiB (freed memory is not handed
back between groups), and ``M_ARENA_MAX`` 1 (a new thread, such as those of a unit's pool, shares an existing
arena instead of making its own). On the way out it restores glibc's defaults (``M_MMAP_MAX`` 65536, trim
threshold 128 KiB; glibc then keeps these thresholds fixed instead of adapting them) and calls ``malloc_trim(0)``,
which hands the freed memory back to the system. glibc fixes its arena limit the first time a thread looks for an
arena, so the limit stays for the process; and arenas made before (importing pandas makes one) are still shared
out. Processes started inside :func:`child_tunables` (the analysis' worker processes) get the limit from their
start, through ``GLIBC_TUNABLES``, and so only ever use the main arena.

The peak resident set grows a little (freed blocks are kept for reuse, not returned); set
``DYNAMICS_REUSE_FREED_MEMORY=0`` to leave ``malloc`` as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

from trainer.envvars import environ_set  # standard library only, as this module must be

__all__ = ["REUSE_ENV", "child_tunables", "hold_for_process", "one_arena", "reuse_freed_memory"]

#: Environment variable: ``0`` leaves glibc's ``malloc`` settings alone.
REUSE_ENV = "DYNAMICS_REUSE_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX, _DEFAULT_ARENA_MAX = 128 * 1024, 65536, 0
#: held: freed memory at the top of the heap is returned to the system only above this much (``mallopt`` takes a C
#: int: 2 GiB, above a ``small`` unit's whole peak)
_HELD_TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _enabled() -> Any | None:
    """:func:`_glibc`, or ``None`` when ``DYNAMICS_REUSE_FREED_MEMORY=0`` turns the settings of this module off."""
    return _glibc() if os.environ.get(REUSE_ENV, "1") != "0" else None


def _set(libc: Any, held: bool) -> None:
    """The held settings (``held``) or glibc's defaults."""
    libc.mallopt(_M_TRIM_THRESHOLD, _HELD_TRIM_THRESHOLD if held else _DEFAULT_TRIM_THRESHOLD)
    libc.mallopt(_M_MMAP_MAX, 0 if held else _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_ARENA_MAX, 1 if held else _DEFAULT_ARENA_MAX)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, glibc's ``malloc`` reuses freed memory instead of unmapping and re-faulting it (see the
    module docstring). Re-entrant and thread-safe: the outermost exit restores the defaults and trims the heap.
    Yields whether the setting is in effect (``False``: not glibc, or ``DYNAMICS_REUSE_FREED_MEMORY=0``)."""
    global _depth
    libc = _enabled()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            _set(libc, held=True)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, held=False)
                libc.malloc_trim(0)


def one_arena() -> bool:
    """From now on, threads of this process that look for a malloc arena share the existing ones (``M_ARENA_MAX``
    1, for the rest of the process). For a process that is ours, such as the ``dynamics analyze`` command: called
    before anything makes a second arena (importing pandas does), every thread then uses the main arena, as
    :func:`child_tunables` gives worker processes. Returns whether it applied (glibc, and the setting is on)."""
    libc = _enabled()
    if libc is None:
        return False
    libc.mallopt(_M_ARENA_MAX, 1)
    return True


_held_for_process: contextlib.ExitStack | None = None


def hold_for_process() -> None:
    """:func:`reuse_freed_memory` from now until the process exits (a worker process of the analysis: its units
    then reuse each other's freed memory too). Idempotent."""
    global _held_for_process
    if _held_for_process is None:
        _held_for_process = contextlib.ExitStack()
        _held_for_process.enter_context(reuse_freed_memory())


#: glibc tunables (``name=value``) that child processes of :func:`child_tunables` start with: one malloc arena.
CHILD_TUNABLES = {"glibc.malloc.arena_max": "1"}


@contextlib.contextmanager
def child_tunables() -> Iterator[None]:
    """Processes started inside the block start with :data:`CHILD_TUNABLES` added to ``GLIBC_TUNABLES`` (a tunable
    the variable already names is left as it is); the environment is restored afterwards. A no-op where
    :func:`reuse_freed_memory` is (not glibc, or ``DYNAMICS_REUSE_FREED_MEMORY=0``)."""
    if _enabled() is None:
        yield
        return
    old = os.environ.get("GLIBC_TUNABLES")
    named = {item.partition("=")[0] for item in (old or "").split(":") if item}
    extra = [f"{k}={v}" for k, v in CHILD_TUNABLES.items() if k not in named]
    with environ_set({"GLIBC_TUNABLES": ":".join(([old] if old else []) + extra)} if extra else {}):
        yield
