"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the directory.

A reader therefore sees either the old file or the complete new one, never a
partial file, whatever moment a process is killed at.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename) to disk. No-op where directories cannot be opened or synced.

    A full disk or an I/O error (``ENOSPC``, ``EDQUOT``, ``EIO``) is raised: the
    rename may not be durable, and the caller must not report success.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    ``write`` must create the file at ``tmp_path``. On any exception the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Create directory ``path`` atomically: ``fill(tmp_dir)`` writes into a temporary sibling, which is renamed.

    Every file inside is fsynced before the rename. Fails if ``path`` already
    exists (a stale one must be removed by the caller first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_checksum(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no whitespace): the ``checksum`` of a manifest.

    Canonical, so re-indenting a file does not change it; any change of a key,
    a value or the structure does.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def inside(root: str | Path, rel: Any, *, what: str = "path") -> Path:
    """``root / rel`` for a relative path that stays inside ``root``; ``ValueError`` otherwise.

    For paths read from files (a manifest's checkpoint paths and file names):
    absolute paths, ``..`` components and non-strings are refused, so a crafted
    manifest can make no reader or writer touch anything outside the run directory.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise ValueError(f"{what} {rel!r} is not a plain relative path")
    p = Path(rel)
    if p.is_absolute() or any(part in ("..", "") for part in rel.split("/")) or p.parts[:1] == ("~",):
        raise ValueError(f"{what} {rel!r} leaves the run directory (absolute or with '..')")
    return Path(root) / p


def fault_point(point: str, step: int) -> None:
    """Test hook: ``TRAINER_FAULT=<point>@<step>`` makes the process SIGKILL itself here (a real crash, no cleanup).

    Points (all at checkpoint step ``step``): ``checkpoint-write`` (inside the
    temporary checkpoint directory, after the weights are written),
    ``before-manifest`` (after the directory rename, before the manifest lists
    it), ``manifest-write`` (the new manifest is in its temporary file, not yet
    renamed), ``capture-write`` (half-way through writing the HDF5 temporary
    file), ``before-capture-manifest`` (capture file renamed, not yet listed) and
    ``capture-manifest-write`` (the manifest listing the capture is in its
    temporary file). Used by ``tests/reliability``.
    """
    fault = os.environ.get("TRAINER_FAULT")
    if fault and fault == f"{point}@{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
