"""Token streams: sources, memory mapping, and a batch order that is a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import DataError, prepare, train_micro_batch, validation_batches, window_indices


def test_text_source_is_byte_level_and_memmapped(tmp_path, text_corpus):
    s = prepare(DataConfig(source="text", path=str(text_corpus)), tmp_path / "d")
    assert isinstance(s.train, np.memmap) and s.vocab_size == 257
    raw = (text_corpus / "corpus.txt").read_bytes()
    assert bytes(np.asarray(s.train[:50], dtype=np.uint8)) == raw[:50]
    assert len(s.train) + len(s.val) == len(raw) + 1  # + one end-of-document token


def test_prepare_reuses_and_detects_corruption(tmp_path, text_corpus):
    cfg = DataConfig(source="text", path=str(text_corpus))
    a = prepare(cfg, tmp_path / "d")
    b = prepare(cfg, tmp_path / "d")
    assert np.array_equal(a.train, b.train)
    with open(tmp_path / "d" / "train.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="train.bin is corrupted"):
        prepare(cfg, tmp_path / "d")


def test_parquet_rows_become_windows(tmp_path):
    rows = [list(range(i * 9, i * 9 + 9)) for i in range(40)]  # context 8 + 1
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "t.parquet")
    s = prepare(DataConfig(source="parquet", path=str(tmp_path / "t.parquet"), val_fraction=0.1), tmp_path / "d")
    x, y = train_micro_batch(s.train, seed=0, step=0, micro=0, batch_size=4, grad_accum=1, seq_len=8)
    for xi, yi in zip(x, y):  # every window is exactly one parquet row
        assert int(xi[0]) % 9 == 0 and torch.equal(xi[1:], yi[:-1]) and int(yi[-1]) == int(xi[0]) + 8


def test_parquet_without_input_ids(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="input_ids"):
        prepare(DataConfig(source="parquet", path=str(tmp_path / "t.parquet")), tmp_path / "d")


def test_order_is_a_pure_function_of_seed_and_step(tmp_path, text_corpus):
    s = prepare(DataConfig(source="text", path=str(text_corpus)), tmp_path / "d")
    kw = dict(batch_size=8, grad_accum=2, seq_len=16)
    a = train_micro_batch(s.train, seed=3, step=7, micro=1, **kw)
    train_micro_batch(s.train, seed=3, step=2, micro=0, **kw)  # other calls in between change nothing
    b = train_micro_batch(s.train, seed=3, step=7, micro=1, **kw)
    assert torch.equal(a[0], b[0])
    c = train_micro_batch(s.train, seed=4, step=7, micro=1, **kw)
    assert not torch.equal(a[0], c[0])


def test_each_epoch_visits_every_window_once():
    n = 37
    ids = window_indices(5, 0, 2 * n, n)
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n:])


def test_validation_batches_are_fixed(tmp_path, text_corpus):
    s = prepare(DataConfig(source="text", path=str(text_corpus)), tmp_path / "d")
    a = validation_batches(s.val, n_batches=2, batch_size=4, seq_len=16)
    b = validation_batches(s.val, n_batches=2, batch_size=4, seq_len=16)
    assert len(a) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
