"""The background batch prefetcher returns exactly the synchronous batches, restarts on jumps and surfaces errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from trainer.data import split_rows, train_micro_batch, train_micro_rows
from trainer.prefetch import Prefetcher


def _succ(key):
    return key + 1


def test_items_are_those_of_the_synchronous_path_in_order():
    made = []

    def make(k):
        made.append(k)
        return k * k

    p = Prefetcher(make, _succ, depth=3)
    try:
        assert [p.get(k) for k in range(10)] == [k * k for k in range(10)]
        time.sleep(0.2)
        assert max(made) <= 9 + 3 + 1  # never more than `depth` ahead (plus the one being made)
    finally:
        p.close()


def test_work_happens_ahead_of_the_request():
    gate = threading.Event()
    started = []

    def make(k):
        started.append(k)
        if k >= 1:
            gate.wait(5)
        return k

    p = Prefetcher(make, _succ, depth=2)
    try:
        assert p.get(0) == 0
        deadline = time.time() + 5
        while 1 not in started and time.time() < deadline:
            time.sleep(0.01)
        assert 1 in started  # key 1 is being made before anyone asked for it
        gate.set()
        assert p.get(1) == 1
    finally:
        p.close()


def test_a_jump_restarts_from_the_requested_key():
    p = Prefetcher(lambda k: k * 10, _succ, depth=2)
    try:
        assert p.get(0) == 0
        assert p.get(1) == 10
        assert p.get(7) == 70  # e.g. a resume at another step
        assert p.get(8) == 80
        assert p.get(2) == 20  # backwards too
    finally:
        p.close()


def test_an_error_in_the_worker_is_raised_by_get_for_its_key():
    def make(k):
        if k == 3:
            raise OSError("disk went away")
        return k

    p = Prefetcher(make, _succ, depth=2)
    try:
        assert [p.get(k) for k in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="disk went away"):
            p.get(3)
        assert p.get(4) == 4  # a later request starts a fresh worker
    finally:
        p.close()


def test_close_stops_the_thread_even_when_its_queue_is_full():
    p = Prefetcher(lambda k: k, _succ, depth=1, name="test-prefetch-close")
    p.get(0)
    time.sleep(0.1)  # the worker fills the queue and blocks on put
    p.close()
    assert not any(t.name == "test-prefetch-close" for t in threading.enumerate())


def test_depth_zero_runs_inline():
    p = Prefetcher(lambda k: threading.current_thread().name, _succ, depth=0)
    assert p.get(0) == threading.current_thread().name
    with pytest.raises(ValueError):
        Prefetcher(lambda k: k, _succ, depth=-1)


def test_micro_rows_split_into_the_micro_batch():
    stream = np.arange(5000, dtype=np.uint16)
    kw = dict(seed=3, step=4, micro=1, batch_size=8, grad_accum=2, seq_len=15)
    x, y = train_micro_batch(stream, **kw)
    rx, ry = split_rows(train_micro_rows(stream, **kw))
    assert x.shape == (4, 15) and x.dtype == torch.int64
    assert torch.equal(x, rx) and torch.equal(y, ry)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
