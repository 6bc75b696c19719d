"""``trainer.envvars.environ_set``: variables set for a block, then exactly as they were (set, empty or unset)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.envvars import environ_set

A, B, C = "RELORA_TEST_ENV_A", "RELORA_TEST_ENV_B", "RELORA_TEST_ENV_C"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setenv(A, "user")
    monkeypatch.setenv(B, "")
    monkeypatch.delenv(C, raising=False)


def _state() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in (A, B, C)}


def test_the_block_sees_the_values_and_its_children_inherit_them():
    with environ_set({A: "1", B: None, C: "3"}):
        assert _state() == {A: "1", B: None, C: "3"}
        code = f"import os; print(os.environ.get({A!r}), os.environ.get({B!r}), os.environ.get({C!r}))"
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert child.stdout.split() == ["1", "None", "3"]
    assert _state() == {A: "user", B: "", C: None}  # set, empty and unset come back as such


def test_everything_is_restored_when_the_block_raises_and_when_blocks_nest():
    with pytest.raises(RuntimeError):
        with environ_set({A: "outer", C: "outer"}):
            with environ_set({A: "inner", B: "inner"}):
                assert _state() == {A: "inner", B: "inner", C: "outer"}
            assert _state() == {A: "outer", B: "", C: "outer"}
            raise RuntimeError("the block failed")
    assert _state() == {A: "user", B: "", C: None}
    with environ_set({}):  # nothing to set: nothing changes
        assert _state() == {A: "user", B: "", C: None}
