"""``dynamics._malloc``: while analysis runs, glibc's malloc serves large blocks from its heap (freed memory is reused,
not unmapped and faulted in again), and the defaults come back afterwards.

Observed through ``mallinfo2().hblks``, glibc's count of blocks it holds as separate ``mmap`` regions: a 64 MiB
array is such a block under the defaults, and is not one while the setting is held.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dynamics._malloc import REUSE_ENV, _glibc, reuse_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mapped_blocks() -> int:
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblks)


BIG = 64 << 20  # bytes: far above glibc's largest mmap threshold (32 MiB)


def _mapped_by_a_big_array() -> int:
    """How many mmap regions one live 64 MiB array adds."""
    before = _mapped_blocks()
    a = np.ones(BIG, dtype=np.uint8)
    added = _mapped_blocks() - before
    del a
    return added


#: the repository root: a child process started there imports ``dynamics`` and ``tests`` from this checkout
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child_prints(code: str, timeout: float = 120) -> str:
    """What ``python -c code``, run from :data:`ROOT` with this process's environment, prints (it must succeed
    within ``timeout`` seconds)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(autouse=True)
def _setting_on(monkeypatch):
    monkeypatch.delenv(REUSE_ENV, raising=False)


def test_large_blocks_come_from_the_heap_while_held_and_are_mapped_again_after():
    assert _mapped_by_a_big_array() == 1  # glibc's default: its own mmap region
    with reuse_freed_memory() as on:
        assert on
        assert _mapped_by_a_big_array() == 0
        with reuse_freed_memory():  # re-entrant: an inner exit keeps the outer setting
            pass
        assert _mapped_by_a_big_array() == 0
    assert _mapped_by_a_big_array() == 1


def test_the_setting_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), reuse_freed_memory():
        raise RuntimeError("a failed unit")
    assert _mapped_by_a_big_array() == 1


def test_the_environment_variable_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(REUSE_ENV, "0")
    with reuse_freed_memory() as on:
        assert not on
        assert _mapped_by_a_big_array() == 1


def test_freed_memory_is_reused_inside_a_unit_without_new_page_faults():
    """The point of the setting: a temporary freed and allocated again costs no fresh zero-filled pages."""
    import resource

    _mapped_blocks()  # skips without glibc

    def faults_of_temporaries(count: int) -> int:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(count):
            np.ones(BIG, dtype=np.uint8)  # written in full, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    default = faults_of_temporaries(10)
    with reuse_freed_memory():
        # The first temporary grows the heap, and those pages fault in once. With transparent huge pages that costs
        # as many faults as several mmap'd temporaries (numpy advises huge pages for large arrays), so only the
        # temporaries after it show the reuse.
        faults_of_temporaries(1)
        held = faults_of_temporaries(10)
    pages = 10 * BIG // os.sysconf("SC_PAGE_SIZE")
    assert default > pages // 1000  # every temporary faulted in again (huge pages: 512 per 2 MiB fault)
    assert held < default / 5


def test_a_worker_process_holds_the_setting_for_life():
    _mapped_blocks()  # skips without glibc
    code = textwrap.dedent(
        """
        import numpy as np
        from dynamics._malloc import hold_for_process
        from tests.dynamics.test_malloc import _mapped_by_a_big_array
        assert _mapped_by_a_big_array() == 1
        hold_for_process()
        hold_for_process()
        assert _mapped_by_a_big_array() == 0
        print("ok")
        """
    )
    assert _child_prints(code) == "ok"  # the setting is on: the autouse fixture removed its variable


def test_child_tunables_adds_one_arena_and_keeps_what_the_user_set(monkeypatch):
    from dynamics._malloc import child_tunables

    _mapped_blocks()  # skips without glibc
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with child_tunables():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    with child_tunables():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # the user's choice stands
    with child_tunables():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
    monkeypatch.setenv(REUSE_ENV, "0")
    monkeypatch.delenv("GLIBC_TUNABLES")
    with child_tunables():
        assert "GLIBC_TUNABLES" not in os.environ


_COUNT_ARENAS = textwrap.dedent(
    """
    import ctypes, os, tempfile, threading
    libc = ctypes.CDLL("libc.so.6")
    libc.fdopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    go = threading.Barrier(5)
    def work():
        block = bytearray(1 << 20)  # malloc from this thread's arena
        go.wait()  # all four alive at once: each would need an arena of its own
        go.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    go.wait()
    with tempfile.TemporaryFile() as f:
        stream = libc.fdopen(os.dup(f.fileno()), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        print(f.read().decode().count("<heap nr="))
    go.wait()
    [t.join() for t in threads]
    """
)


def _arenas_of_a_child() -> int:
    return int(_child_prints(_COUNT_ARENAS, timeout=60))


def test_a_child_started_inside_child_tunables_has_one_malloc_arena(monkeypatch):
    from dynamics._malloc import child_tunables

    _mapped_blocks()  # skips without glibc
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert _arenas_of_a_child() > 1  # glibc's default: threads get arenas of their own
    with child_tunables():
        assert _arenas_of_a_child() == 1


def test_one_arena_makes_later_threads_share_the_main_arena(monkeypatch):
    _mapped_blocks()  # skips without glibc
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    code = "from dynamics._malloc import one_arena\nassert one_arena()\n" + _COUNT_ARENAS
    assert int(_child_prints(code)) == 1


def test_an_analysis_unit_holds_the_setting_and_gives_the_rows_it_gives_without_it(trained_pair, monkeypatch):
    """Reused memory is not zero-filled: a unit must not depend on fresh pages, so its rows are the same bit for bit
    (ReLoRA merge step: weights, updates, cycle overlaps, intruders, captures)."""
    import dynamics._malloc as malloc
    import dynamics.analyze as an

    _mapped_blocks()  # skips without glibc
    depth_seen: list[int] = []
    weight_rows = an._weight_rows

    def spy(*args, **kwargs):
        depth_seen.append(malloc._depth)
        return weight_rows(*args, **kwargs)

    monkeypatch.setattr(an, "_weight_rows", spy)
    opts = an.AnalysisOptions(keep_spectra=True)
    held = an.analyze_unit(str(trained_pair.relora), 8, opts)
    monkeypatch.setenv(REUSE_ENV, "0")
    plain = an.analyze_unit(str(trained_pair.relora), 8, opts)
    assert depth_seen == [1, 0]  # held while the unit computed; not at all when turned off
    assert len(held[0]) > 500
    assert held == plain  # rows and spectra (no NaN among them)
