"""A thread-safe, size-bounded least-recently-used cache (no public API; stdlib only).

One mechanism for the process-wide caches of the analysis (decoded activations, CCA bases, ``W_0``'s reference
vectors): an analysis unit runs its parts on several threads, so lookups and evictions take a lock, while the
value itself is computed outside it by the caller.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedLRU"]

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    """``{key: value}`` holding at most ``budget()`` units of ``size(value)`` (the newest entry is always kept).

    ``budget`` is called at each :meth:`put`, so a module constant it reads can be changed (e.g. by a test);
    the least recently used entries are dropped first.
    """

    def __init__(self, budget: Callable[[], int], size: Callable[[V], int]) -> None:
        self._budget, self._size = budget, size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        """Remember ``value``, then drop the least recently used entries while over the budget."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            held = sum(self._size(v) for v in self._items.values())
            while held > self._budget() and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                held -= self._size(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
