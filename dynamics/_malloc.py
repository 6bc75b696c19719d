"""Keep freed memory for reuse while analysis runs (glibc's ``malloc``; elsewhere a no-op; stdlib only).

An analysis unit allocates and frees the same large temporaries over and over: each matrix group's float64
copies, differences, ``|W|`` and its sorted copy (tens to hundreds of MiB each for a ``small`` model). glibc
serves every block above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and gives it back with
``munmap`` when freed, so the kernel zero-fills the same pages again for the next group: on the ``small``
benchmark units that page-fault work was a third of the unit's wall time (system time 13 s of a 20 s unit on 2
cores, ``benchmarks/analyze_bench.py``), and page faults of two threads serialise on the process's memory map.

:func:`reuse_freed_memory` turns that off for as long as it is held: ``mallopt(M_MMAP_MAX, 0)`` (every block
from the heap, whose freed blocks are reused without the kernel) and a trim threshold of 2 GiB (freed memory is
not handed back between groups). On the way out it restores glibc's defaults (``M_MMAP_MAX`` 65536, trim
threshold 128 KiB; glibc then keeps these thresholds fixed instead of adapting them) and calls ``malloc_trim(0)``,
which hands the freed memory back to the system. The peak resident set may grow a little (blocks of the heap are
reused, not returned, so a fragmented heap holds more than its live data); set ``DYNAMICS_REUSE_FREED_MEMORY=0``
to leave ``malloc`` as it is.
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

__all__ = ["REUSE_ENV", "hold_for_process", "reuse_freed_memory"]

#: Environment variable: ``0`` leaves glibc's ``malloc`` settings alone.
REUSE_ENV = "DYNAMICS_REUSE_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
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


def _set(libc: Any, held: bool) -> None:
    libc.mallopt(_M_TRIM_THRESHOLD, _HELD_TRIM_THRESHOLD if held else _DEFAULT_TRIM_THRESHOLD)
    libc.mallopt(_M_MMAP_MAX, 0 if held else _DEFAULT_MMAP_MAX)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, glibc's ``malloc`` reuses freed memory instead of unmapping and re-faulting it (see the
    module docstring). Re-entrant and thread-safe: the outermost exit restores the defaults and trims the heap.
    Yields whether the setting is in effect (``False``: not glibc, or ``DYNAMICS_REUSE_FREED_MEMORY=0``)."""
    global _depth
    libc = _glibc() if os.environ.get(REUSE_ENV, "1") != "0" else None
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


_held_for_process: contextlib.ExitStack | None = None


def hold_for_process() -> None:
    """:func:`reuse_freed_memory` from now until the process exits (a worker process of the analysis: its units
    then reuse each other's freed memory too). Idempotent."""
    global _held_for_process
    if _held_for_process is None:
        _held_for_process = contextlib.ExitStack()
        _held_for_process.enter_context(reuse_freed_memory())
