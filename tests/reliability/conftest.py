"""Fixtures of the fault campaign: one uninterrupted reference run per session, the forkserver launcher."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the campaign's helpers (_reliability.py), also for forked children

import _reliability as R


@pytest.fixture
def one_thread(monkeypatch):
    """Compute like the reference's child processes (one thread; threads_hint left alone), with no fault armed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRAINER_FAULT", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def launcher():
    return R.Launcher()


@pytest.fixture(scope="session")
def campaign_scale(pytestconfig) -> int:
    return R.scale(pytestconfig)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, text_corpus, launcher) -> Path:
    """The uninterrupted reference: a micro run of 10 steps with checkpoints and captures at 0, 3, 6, 9, 10."""
    d = tmp_path_factory.mktemp("reference")
    launcher.warm(d / "warm.txt")
    code, seconds = launcher.run(R.train_argv(d / "run", text_corpus), d / "log.txt")
    assert code == 0, (d / "log.txt").read_text()
    (d / "seconds").write_text(f"{seconds}")
    return d / "run"


@pytest.fixture(scope="session")
def reference_seconds(reference_run) -> float:
    return float((reference_run.parent / "seconds").read_text())


@pytest.fixture
def run_copy(reference_run, tmp_path):
    """A fresh copy of the reference run directory, to damage."""

    def make(name: str = "run") -> Path:
        dst = tmp_path / name
        shutil.copytree(reference_run, dst)
        return dst

    return make
