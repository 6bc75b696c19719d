"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the directory.

A reader therefore sees either the old file or the complete new one, never a
partial file, whatever moment a process is killed at.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
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


#: How libraries say "disk full" in the text of exceptions that are not ``OSError`` (or carry no errno):
#: safetensors' ``SafetensorError`` ("No space left on device (os error 28)"), h5py ("errno = 28"),
#: pyarrow ("[errno 28] No space left on device").
_NO_SPACE_TEXT = ("no space left on device", "errno = 28", "errno 28", "os error 28", "enospc")
_NEARLY_FULL = 1 << 20
#: Disk errors whose message is reduced to the standard one, naming the file being written.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
#: torch.save's messages on a failed write, which name no cause: then the file system's free space decides.
_WRITE_FAILED_TEXT = ("write failed", "writing", "inline_container", "iostream error")
_QUOTA_TEXT = ("disk quota exceeded", "errno = 122", "errno 122", "os error 122", "edquot")


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s file system (``None`` when unknown)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def disk_error(error: BaseException, path: str | Path) -> OSError | None:
    """``error``, raised while writing ``path``, as an ``OSError`` with an errno when it is a disk error; else ``None``.

    Libraries report a full disk in their own types: safetensors raises
    ``SafetensorError("... No space left on device (os error 28)")``, torch.save a
    ``RuntimeError("[enforce fail at inline_container.cc:...] . PytorchStreamWriter
    failed writing file data/0: file write failed")`` or ``("... unexpected pos N vs M")``
    on top of ``"basic_ios::clear: iostream error"``, naming no cause, h5py
    and pyarrow ``OSError`` instances without ``errno``. These become
    ``OSError(ENOSPC | EDQUOT, strerror, path)`` (torch's message only when the
    file system has less than 1 MiB left at that moment), so callers report one
    line (``error: No space left on device: <path>``, exit status 1). An
    ``OSError`` with a disk errno but a library's message or no file name
    (pyarrow's ``OSError(28, "Error writing bytes to file. Detail: ...")``) gets
    the standard message and ``path``. Any other error gives ``None``.
    """
    if isinstance(error, OSError) and error.errno is not None:
        # pyarrow: OSError(28, "Error writing bytes to file. Detail: [errno 28] ..."), no file name; open(): no name
        standard = error.strerror == os.strerror(error.errno) and error.filename is not None
        if error.errno in _DISK_ERRNOS and not standard:
            return OSError(error.errno, os.strerror(error.errno), str(path))
        return None
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return None
    chain: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 4:  # torch chains "basic_ios::clear: iostream error" under its own
        chain.append(str(seen).lower())
        seen = seen.__cause__ or seen.__context__
    text = " | ".join(chain)
    code: int | None = None
    if any(t in text for t in _NO_SPACE_TEXT):
        code = errno.ENOSPC
    elif any(t in text for t in _QUOTA_TEXT):
        code = errno.EDQUOT
    elif any(t in text for t in _WRITE_FAILED_TEXT):
        free = _free_bytes(Path(path).parent)
        if free is not None and free < _NEARLY_FULL:
            code = errno.ENOSPC
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


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
    except BaseException as e:
        mapped = disk_error(e, path)  # before the partial file is removed: the disk is still full
        tmp_path.unlink(missing_ok=True)
        if mapped is not None:
            raise mapped from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented strict JSON (non-finite floats as ``null``)."""
    atomic_write_bytes(path, (json.dumps(finite_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


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
    except BaseException as e:
        mapped = disk_error(e, path)  # before the partial files are removed: the disk is still full
        shutil.rmtree(tmp, ignore_errors=True)
        if mapped is not None:
            raise mapped from e
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by ``None``, recursively (dicts, lists, tuples).

    Strict JSON has no NaN: ``json.dumps`` would write a bare ``NaN`` that other
    readers refuse. Writers map values first, then dump with ``allow_nan=False``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


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
