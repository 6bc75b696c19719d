"""Token streams and the batch order.

Three sources (see :class:`trainer.config.DataConfig`) are tokenised once into
flat binary token files under ``<run>/data/`` (``train.bin``, ``val.bin``,
uint16 or uint32, plus ``data.json`` describing them) and then read through
``numpy.memmap``, so a corpus never has to fit in memory.

A stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs
and shifted targets), which matches pre-tokenised parquet rows of
``context + 1`` tokens exactly. The batch order is a pure function of
``(seed, step)``: sample ``j = step · batch_size + i`` is window
``perm_e[j mod n]`` of epoch ``e = j div n``, where ``perm_e`` is a permutation
drawn from ``numpy.random.default_rng([seed, e])``. Resuming at any step
therefore sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from trainer.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from trainer.config import DataConfig
from trainer.errors import DataError  # defined there; importable from here as before

DATA_SCHEMA_VERSION = 1
BYTE_EOS = 256  # byte-level tokenizer: ids 0..255 are bytes, 256 ends a document


@dataclass(frozen=True)
class TokenStreams:
    """Memory-mapped train and validation token streams (1-D integer arrays) and their metadata."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    meta: dict


def _files(path: str, suffix: str) -> list[Path]:
    p = Path(path)
    files = sorted(p.rglob(f"*{suffix}")) if p.is_dir() else [p]
    if not files:
        raise DataError(f"no {suffix} files under {path!r}")
    return files


def _tokenize_text(path: str) -> np.ndarray:
    """Byte-level tokens of UTF-8 text files, each file ending with :data:`BYTE_EOS`."""
    parts = []
    for f in _files(path, ".txt"):
        parts.append(np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([BYTE_EOS], dtype=np.uint16))
    return np.concatenate(parts)


def _read_parquet(path: str) -> np.ndarray:
    """Concatenate the ``input_ids`` sequences of parquet files into one stream."""
    import pyarrow.parquet as pq

    parts = []
    for f in _files(path, ".parquet"):
        try:
            table = pq.read_table(f, columns=["input_ids"])
        except KeyError:
            raise DataError(f"{str(f)!r} has no 'input_ids' column") from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise DataError(f"cannot read parquet file {str(f)!r}: {e}") from None
        col = table.column("input_ids").combine_chunks()
        values = np.asarray(col.flatten() if hasattr(col, "flatten") else col, dtype=np.int64)
        parts.append(values)
    stream = np.concatenate(parts)
    if stream.size and (stream.min() < 0):
        raise DataError(f"parquet input_ids under {path!r} contain negative ids")
    return stream


def _grammar(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int, dict]:
    from trainer.corpus import GrammarConfig, GrammarCorpus, split_seeds

    corpus = GrammarCorpus(GrammarConfig(seed=cfg.seed))
    train_seed, val_seed = split_seeds(cfg.seed)
    train = corpus.generate_tokens(cfg.train_tokens, seed=train_seed)
    val = corpus.generate_tokens(cfg.val_tokens, seed=val_seed)
    return train, val, corpus.vocab_size, {"tokenizer": "grammar-words", "vocab": list(corpus.vocab)}


def _load_source(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int, dict]:
    if cfg.source == "grammar":
        return _grammar(cfg)
    if cfg.source == "text":
        read, extra = _tokenize_text, {"tokenizer": "bytes", "eos": BYTE_EOS}
    else:
        read, extra = _read_parquet, {"tokenizer": "pretokenized"}
    assert cfg.path is not None  # DataConfig.problems() requires a path for text and parquet
    stream = read(cfg.path)
    if cfg.val_path:
        val = read(cfg.val_path)
    else:
        cut = int(len(stream) * (1 - cfg.val_fraction))
        stream, val = stream[:cut], stream[cut:]
    vocab = BYTE_EOS + 1 if cfg.source == "text" else int(max(stream.max(initial=0), val.max(initial=0))) + 1
    return stream, val, vocab, extra


#: What :func:`prepare` asks of a corpus before writing it: ``check(vocab_size, n_train_tokens, n_val_tokens)``.
DataCheck = Callable[[int, int, int], None]


def prepare(cfg: DataConfig, data_dir: Path, *, check: DataCheck | None = None) -> TokenStreams:
    """Tokenise ``cfg``'s source into ``data_dir`` (once) and return memory-mapped streams.

    If ``data_dir/data.json`` exists and describes the same ``cfg``, the files
    are reused after their sha256 is checked; a mismatch raises :class:`DataError`.
    ``check`` (e.g. "is there one sequence of tokens", "do the ids fit the
    vocabulary") is called with ``(vocab_size, n_train, n_val)`` once the tokens
    are known and **before** ``data_dir`` is created, so a corpus it refuses
    (by raising) leaves nothing behind.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "data.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") != _cfg_dict(cfg):
            raise DataError(f"{meta_path} was prepared from a different data config; use a new run directory")
        for split in ("train", "val"):
            if sha256_file(data_dir / f"{split}.bin") != meta["sha256"][split]:
                raise DataError(f"{data_dir / f'{split}.bin'} is corrupted (sha256 mismatch)")
        if check is not None:
            check(int(meta["vocab_size"]), int(meta["n_tokens"]["train"]), int(meta["n_tokens"]["val"]))
        return _open(data_dir, meta)

    train, val, vocab_size, extra = _load_source(cfg)
    if check is not None:
        check(int(vocab_size), len(train), len(val))
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    data_dir.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for split, arr in (("train", train), ("val", val)):
        raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
        atomic_write_bytes(data_dir / f"{split}.bin", raw)
        hashes[split] = hashlib.sha256(raw).hexdigest()
    meta = {
        "schema_version": DATA_SCHEMA_VERSION,
        "config": _cfg_dict(cfg),
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "n_tokens": {"train": int(len(train)), "val": int(len(val))},
        "sha256": hashes,
        **extra,
    }
    atomic_write_json(meta_path, meta)
    return _open(data_dir, meta)


def _cfg_dict(cfg: DataConfig) -> dict:
    return json.loads(json.dumps(cfg.__dict__))


def _open(data_dir: Path, meta: dict) -> TokenStreams:
    def mm(split: str) -> np.ndarray:
        n = meta["n_tokens"][split]
        if n == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))

    return TokenStreams(train=mm("train"), val=mm("val"), vocab_size=meta["vocab_size"], meta=meta)


def n_windows(stream: np.ndarray, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len + 1`` tokens a stream holds."""
    return len(stream) // (seq_len + 1)


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def window_indices(seed: int, start: int, count: int, n: int) -> np.ndarray:
    """Window ids of global samples ``start .. start+count-1`` (epoch-wise permutations of ``n`` windows)."""
    out = np.empty(count, dtype=np.int64)
    for i, j in enumerate(range(start, start + count)):
        out[i] = _epoch_permutation(seed, j // n, n)[j % n]
    return out


def get_rows(stream: np.ndarray, windows: np.ndarray, seq_len: int) -> torch.Tensor:
    """The windows themselves, ``(len(windows), seq_len + 1)`` int64: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
    w = seq_len + 1
    rows = np.stack([np.asarray(stream[i * w : (i + 1) * w], dtype=np.int64) for i in windows])  # (N, seq_len+1)
    return torch.from_numpy(rows)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(N, seq_len)`` of windows ``(N, seq_len + 1)`` (views, no copy)."""
    return rows[:, :-1], rows[:, 1:]


def get_windows(stream: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, each ``(len(windows), seq_len)`` int64, for the given window ids."""
    return split_rows(get_rows(stream, windows, seq_len))


def train_micro_rows(
    stream: np.ndarray, *, seed: int, step: int, micro: int, batch_size: int, grad_accum: int, seq_len: int
) -> torch.Tensor:
    """Windows ``(b, seq_len + 1)`` int64 of micro-batch ``micro`` (of ``grad_accum``) of optimizer step ``step``."""
    n = n_windows(stream, seq_len)
    b = batch_size // grad_accum
    ids = window_indices(seed, step * batch_size + micro * b, b, n)
    return get_rows(stream, ids, seq_len)


def train_micro_batch(
    stream: np.ndarray, *, seed: int, step: int, micro: int, batch_size: int, grad_accum: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` (of ``grad_accum``) of optimizer step ``step``: inputs, targets ``(b, seq_len)`` int64."""
    return split_rows(
        train_micro_rows(
            stream, seed=seed, step=step, micro=micro, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len
        )
    )


def validation_batches(
    stream: np.ndarray, *, n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first ``n_batches · batch_size`` windows, in order (fewer if the stream is short)."""
    n = n_windows(stream, seq_len)
    ids = np.arange(min(n, n_batches * batch_size))
    return [get_windows(stream, ids[i : i + batch_size], seq_len) for i in range(0, len(ids), batch_size)]
