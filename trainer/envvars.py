"""Environment variables set for the length of a block, then put back as they were.

Standard library only, so any module can use it before torch, numpy or pandas is imported (``dynamics._malloc``
sets glibc's tunables for the worker processes it starts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["environ_set"]


@contextmanager
def environ_set(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set each variable of ``values`` in ``os.environ`` for the block (``None``: remove it); processes started
    inside inherit them. Afterwards every one of them is as it was before the block (removed again when it was
    unset), also when the block raises. Not thread-safe: the environment is the process's."""
    before = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(before)


def _apply(values: Mapping[str, str | None]) -> None:
    """Set each variable of ``values`` in ``os.environ``, removing those given as ``None``."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
