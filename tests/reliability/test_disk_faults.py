"""Disk full and unwritable directories: a write that fails part-way keeps every earlier checkpoint intact.

The trainer is run in-process through the CLI with a fault injected into the
write path: ``os.fsync`` raising ``ENOSPC`` at its k-th call (where a full disk
shows up with delayed allocation), ``torch.save`` writing half the optimizer
state and then raising ``ENOSPC``, HDF5 dataset creation raising ``ENOSPC``
part-way through a capture file, and a read-only ``checkpoints/`` directory.
Each must end with one ``error:`` line (no traceback) and a non-zero status,
leave every listed checkpoint and capture file verifiable, and a later
``--resume`` must finish bit-identical to the uninterrupted reference.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import tempfile
from pathlib import Path

import _reliability as R
import pytest
import torch

from dynamics.cli import main

pytestmark = pytest.mark.reliability


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def _finish_and_compare(run, text_corpus, reference_run, capsys) -> None:
    R.check_readers(run)
    started = (run / "manifest.json").exists()  # else the failed start left nothing: the same command again
    assert main(R.train_argv(run, text_corpus, resume=started)) == 0, capsys.readouterr().err
    R.assert_same_run(reference_run, run)
    assert not [p for p in run.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def _expect_clean_failure(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("error: ") and any(n in err for n in needles), err
    return err


def _failing_writes(k: int, real_fsync, real_save, real_create):
    """``(calls, fsync, save, create_dataset)``: stand-ins whose ``k``-th write (counted in ``calls["n"]``) fails with ENOSPC."""
    calls = {"n": 0}

    def countdown(what: str) -> None:
        calls["n"] += 1
        if calls["n"] == k:
            raise _enospc(what)

    def fsync(fd):
        countdown(f"fd {fd}")
        return real_fsync(fd)

    def save(obj, f, *a, **kw):
        if calls["n"] + 1 == k and isinstance(f, (str, os.PathLike)):
            calls["n"] += 1
            with open(f, "wb") as fh:
                fh.write(b"\x80\x02half a pickle")  # part of the file reached the disk
            raise _enospc(str(f))
        calls["n"] += 1
        return real_save(obj, f, *a, **kw)

    def create_dataset(self, name, *a, **kw):
        countdown(f"{self.file.filename}:{name}")
        return real_create(self, name, *a, **kw)

    return calls, fsync, save, create_dataset


def test_disk_full_part_way(tmp_path, text_corpus, reference_run, monkeypatch, capsys, one_thread, campaign_scale):
    import h5py

    rng = random.Random(5 + campaign_scale)
    real_fsync, real_save, real_create = os.fsync, torch.save, h5py.Group.create_dataset
    lines = []
    cases = [(mode, rng.randrange(2, 60)) for _ in range(campaign_scale) for mode in ("fsync", "torch.save", "h5")]
    for n, (mode, k) in enumerate(cases):
        run = tmp_path / f"run{n}"
        if mode == "torch.save":
            k = rng.randrange(1, 10)  # torch.save runs twice per checkpoint
        calls, fsync, save, create_dataset = _failing_writes(k, real_fsync, real_save, real_create)

        with monkeypatch.context() as m:
            if mode == "fsync":
                m.setattr(os, "fsync", fsync)
            elif mode == "torch.save":
                m.setattr(torch, "save", save)
            else:
                m.setattr(h5py.Group, "create_dataset", create_dataset)
            code = main(R.train_argv(run, text_corpus))
        if calls["n"] < k:  # the run ended before the k-th write: nothing to check but success
            assert code == 0
            lines.append(f"{mode:10s} fault at write #{k}: not reached")
            continue
        assert code == 1, f"{mode} fault at write #{k} was not reported (exit {code})"
        _expect_clean_failure(code, capsys, "No space left on device")
        done = R.check_readers(run)
        _finish_and_compare(run, text_corpus, reference_run, capsys)
        lines.append(f"{mode:10s} fault at write #{k}: clean error, {done} checkpoints intact, resumed bit-identical")
    R.report("disk full", [f"cases: {len(cases)}", *lines])


def test_read_only_checkpoint_directory(tmp_path, text_corpus, reference_run, monkeypatch, capsys, one_thread):
    run = tmp_path / "run"  # checkpoints 0 and 3 are written, then checkpoints/ becomes read-only
    ckdir = run / "checkpoints"
    real_mkdtemp = tempfile.mkdtemp
    calls = {"n": 0}

    def mkdtemp(*a, dir=None, **kw):
        if dir is None or Path(dir) != ckdir:  # the data directory is written through a temporary one too
            return real_mkdtemp(*a, dir=dir, **kw)
        calls["n"] += 1
        if calls["n"] == 3 and os.geteuid() == 0:  # root ignores permissions: simulate the read-only directory
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        if calls["n"] == 3:
            os.chmod(ckdir, stat.S_IRUSR | stat.S_IXUSR)
        return real_mkdtemp(*a, dir=dir, **kw)

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", mkdtemp)
        code = main(R.train_argv(run, text_corpus))
    os.chmod(ckdir, 0o755)
    _expect_clean_failure(code, capsys, "Permission denied")
    assert R.check_readers(run) == 2  # steps 0 and 3, intact
    _finish_and_compare(run, text_corpus, reference_run, capsys)
