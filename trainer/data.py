"""Token streams and the batch order.

Four sources (see :class:`trainer.config.DataConfig`) are tokenised once into
flat binary token files under ``<run>/data/`` (``train.bin``, ``val.bin``,
uint16 when the vocabulary has at most 65 536 ids, else uint32, plus
``data.json`` describing them and, for a ``bpe``/``file`` tokenizer,
``tokenizer.json``) and then read through ``numpy.memmap``, so a corpus never
has to fit in memory.

The text sources (``text``: UTF-8 files; ``hf``: Hugging Face ``datasets``,
:mod:`trainer.hf_data`) stream: documents → the run's tokenizer
(:func:`trainer.tokenizer.build_tokenizer` on the training documents) → ids,
each document followed by the tokenizer's end-of-document id, encoded by
``data.workers`` processes in document order and written chunk by chunk (the
same bytes for any number of workers). A pre-tokenised ``input_ids`` column is
taken as it is: its rows are concatenated with no end-of-document id (as the
``parquet`` source), its vocabulary is ``max id + 1``, unless ``data.tokenizer``
names a ``tokenizer.json`` (then that file's ``vocab_size``, every id checked
against it, and the file is stored as the run's tokenizer).

The validation split, when neither ``data.val_path`` nor (``hf``) ``data.val_split``
gives one:

* ``text`` and ``parquet``: the last ``val_fraction`` of the tokens (the stream
  is cut after token ``floor((1 - val_fraction) · N)``), exactly as before.
  A file is one document and files are few and long, so this cut usually falls
  inside the last file. A ``bpe:N`` tokenizer learns from every file of
  ``data.path`` (the held-out tail included); give ``data.val_path`` to keep
  the validation text out of it.
* ``hf``: by document: the last ``round(val_fraction · n)`` of the split's ``n``
  rows (Python's ``round``; at least one row, and at least one row left to
  train on, so two rows are needed), in the dataset's order; a ``bpe:N``
  tokenizer learns from the training rows only.

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
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.atomic import atomic_write_bytes, atomic_write_dir, atomic_write_json, sha256_file
from trainer.config import DataConfig
from trainer.errors import DataError  # defined there; importable from here as before
from trainer.run_format import DATA_META, TOKENIZER_FILE
from trainer.tokenizer import BYTE_EOS as BYTE_EOS  # importable from here as before

DATA_SCHEMA_VERSION = 1
#: Settings that change how tokens are made, not which: left out when a stored data.json is compared.
_NOT_COMPARED = ("workers",)
_CHUNK_TOKENS = 1 << 22  # tokens per read/write when a token file is split or converted


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


def _parquet(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int, dict]:
    assert cfg.path is not None  # DataConfig.problems() requires a path for parquet
    stream = _read_parquet(cfg.path)
    if cfg.val_path:
        val = _read_parquet(cfg.val_path)
    else:
        cut = int(len(stream) * (1 - cfg.val_fraction))
        stream, val = stream[:cut], stream[cut:]
    vocab = int(max(stream.max(initial=0), val.max(initial=0))) + 1
    return stream, val, vocab, {"tokenizer": "pretokenized"}


#: What :func:`prepare` asks of a corpus before writing it: ``check(vocab_size, n_train_tokens, n_val_tokens)``.
DataCheck = Callable[[int, int, int], None]


def dtype_for(vocab_size: int) -> np.dtype:
    """The token files' dtype: uint16 for at most 65 536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def prepare(cfg: DataConfig, data_dir: Path, *, check: DataCheck | None = None, progress: bool = True) -> TokenStreams:
    """Tokenise ``cfg``'s source into ``data_dir`` (once) and return memory-mapped streams.

    If ``data_dir/data.json`` exists and describes the same ``cfg`` (settings
    added since it was written count at their defaults; ``workers`` is not
    compared), the files are reused after their sha256 is checked; a mismatch
    raises :class:`DataError`.

    Otherwise everything is written into a temporary sibling of ``data_dir``
    (``.data.XXXX.tmp``); ``check`` (e.g. "is there one sequence of tokens",
    "do the ids fit the vocabulary") is called there with ``(vocab_size,
    n_train, n_val)`` once the tokens are counted, and only then is the
    directory fsynced and renamed to ``data_dir``. A corpus ``check`` refuses (by
    raising), or any failure, leaves nothing behind; temporaries of a killed
    process are removed by the next call. ``progress``: a tqdm bar on stderr
    while text is tokenised (shown only when stderr is a terminal).
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / DATA_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if not _same_config(meta.get("config"), cfg):
            raise DataError(f"{meta_path} was prepared from a different data config; use a new run directory")
        for split in ("train", "val"):
            if sha256_file(data_dir / f"{split}.bin") != meta["sha256"][split]:
                raise DataError(f"{data_dir / f'{split}.bin'} is corrupted (sha256 mismatch)")
        if check is not None:
            check(int(meta["vocab_size"]), int(meta["n_tokens"]["train"]), int(meta["n_tokens"]["val"]))
        return _open(data_dir, meta)

    _remove_leftovers(data_dir)
    written: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        if cfg.source in ("grammar", "parquet"):
            train, val, vocab_size, extra = _grammar(cfg) if cfg.source == "grammar" else _parquet(cfg)
            if check is not None:
                check(int(vocab_size), len(train), len(val))
            meta = _write_arrays(tmp, train, val, vocab_size)
        else:
            bar = _Progress(enabled=progress)
            try:
                meta, extra = _tokenise(cfg, tmp, bar)
            finally:
                bar.close()
            if check is not None:
                check(int(meta["vocab_size"]), int(meta["n_tokens"]["train"]), int(meta["n_tokens"]["val"]))
        meta = {"schema_version": DATA_SCHEMA_VERSION, "config": _cfg_dict(cfg), **meta, **extra}
        atomic_write_json(tmp / DATA_META, meta)
        written.update(meta)

    atomic_write_dir(data_dir, fill)
    return _open(data_dir, written)


def _remove_leftovers(data_dir: Path) -> None:
    """Remove what an interrupted earlier :func:`prepare` left: its temporary siblings, a ``data_dir`` with no data.json."""
    parent = data_dir.parent
    if parent.is_dir():
        for tmp in parent.glob(f".{data_dir.name}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if data_dir.is_dir() and not (data_dir / DATA_META).exists():
        shutil.rmtree(data_dir)


class _Progress:
    """A tqdm bar on stderr, created by :meth:`start` once the total is known (after a BPE is learnt)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start(self, total: int | None, unit: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            desc="tokenising",
            total=total,
            unit=unit,
            unit_scale=unit == "B",
            dynamic_ncols=True,
            mininterval=0.5,
            leave=False,
            file=sys.stderr,
        )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _write_arrays(tmp: Path, train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """train.bin / val.bin of in-memory streams (grammar, parquet), and their metadata."""
    dtype = dtype_for(vocab_size)
    hashes = {}
    for split, arr in (("train", train), ("val", val)):
        raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
        atomic_write_bytes(tmp / f"{split}.bin", raw)
        hashes[split] = hashlib.sha256(raw).hexdigest()
    return {
        "dtype": dtype.name,
        "vocab_size": int(vocab_size),
        "n_tokens": {"train": int(len(train)), "val": int(len(val))},
        "sha256": hashes,
    }


# --------------------------------------------------------------------------- streaming text sources


class _TokenFile:
    """A token file written chunk by chunk: ids range-checked and cast to ``dtype``; count, max and sha256 kept."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self._f = open(path, "wb")  # closed by close(), also on errors
        self._hash = hashlib.sha256()
        self.n = 0
        self.max = -1
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > np.iinfo(self.dtype).max:
            raise DataError(f"token id {lo if lo < 0 else hi} does not fit {self.dtype.name} token files")
        raw = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._f.write(raw)
        self._hash.update(raw)
        self.n += int(ids.size)
        self.max = max(self.max, hi)

    def close(self) -> str:
        """Close the file; its sha256."""
        if not self._f.closed:
            self._f.close()
        return self._hash.hexdigest()


def _tokenise(cfg: DataConfig, tmp: Path, bar: _Progress) -> tuple[dict, dict]:
    """Stream a text source's documents into ``tmp/train.bin`` and ``tmp/val.bin``: (metadata, source details)."""
    if cfg.source == "text":
        return _tokenise_text_files(cfg, tmp, bar)
    return _tokenise_hf(cfg, tmp, bar)


def _counted(items: Iterator[tuple[Any, Any, bool, int]], bar: _Progress, by_size: bool) -> Iterator[Any]:
    for item in items:
        bar.update(item[3] if by_size else int(item[2]))
        yield item


def _write_encoded(cfg: DataConfig, tok: Any, tasks: Iterator[Any], files: dict[str, _TokenFile]) -> None:
    """Encode ``(split, batch)`` tasks with ``tok`` over ``cfg.workers`` processes, appending each to its split's file."""
    from trainer.hf_data import encode_in_order

    for split, ids in encode_in_order(tasks, kind=tok.kind, tokenizer_json=tok.to_json(), workers=cfg.workers):
        files[split].write(ids)


def _tokenizer_meta(tok: Any, tmp: Path) -> dict:
    """Write ``tmp/tokenizer.json`` (bpe, file) and return the tokenizer's data.json entries."""
    meta: dict[str, Any] = {"tokenizer": tok.kind, "eos": int(tok.eos_id)}
    text = tok.to_json()
    if text is not None:
        raw = text.encode("utf-8")
        atomic_write_bytes(tmp / TOKENIZER_FILE, raw)
        meta["tokenizer_sha256"] = hashlib.sha256(raw).hexdigest()
    return meta


def _tokenise_text_files(cfg: DataConfig, tmp: Path, bar: _Progress) -> tuple[dict, dict]:
    """``data.source=text``: each file one document; the split by tokens (module docstring)."""
    from trainer.hf_data import TextFiles, batched
    from trainer.tokenizer import build_tokenizer

    assert cfg.path is not None  # DataConfig.problems() requires a path for text
    train_files = TextFiles.under(cfg.path)
    val_files = TextFiles.under(cfg.val_path) if cfg.val_path else None
    tok = build_tokenizer(cfg.tokenizer, train_files.texts, seed=cfg.seed)
    dtype = dtype_for(tok.vocab_size)
    raw = tok.kind == "bytes"  # the bytes tokenizer takes raw bytes (no decoding): ids as before, any encoding
    bar.start(train_files.total_bytes() + (val_files.total_bytes() if val_files else 0), unit="B")

    def tasks() -> Iterator[tuple[str, Any]]:
        for split, files in (("train", train_files), ("val", val_files)):
            if files is not None:
                items = ((split, piece, end, n) for piece, end, n in TextFiles(files.files, raw).pieces())
                yield from batched(_counted(items, bar, by_size=True))

    files = {s: _TokenFile(tmp / f"{s}.{'bin' if val_files else 'stream'}", dtype) for s in ("train", "val")}
    try:
        _write_encoded(cfg, tok, tasks(), files)
    finally:
        hashes = {s: f.close() for s, f in files.items()}
    n = {s: files[s].n for s in files}
    if val_files is None:  # the last val_fraction of the tokens (as before), split out of one stream
        cut = int(n["train"] * (1 - cfg.val_fraction))
        hashes = _split_stream(files["train"].path, cut, dtype, tmp / "train.bin", tmp / "val.bin")
        files["val"].path.unlink()
        n = {"train": cut, "val": n["train"] - cut}
    meta = {
        "dtype": dtype.name,
        "vocab_size": int(tok.vocab_size),
        "n_tokens": n,
        "sha256": hashes,
    }
    return meta, _tokenizer_meta(tok, tmp)


def _split_stream(src: Path, cut: int, dtype: np.dtype, train: Path, val: Path) -> dict[str, str]:
    """Move tokens ``[cut:]`` of ``src`` into ``val`` and the rest into ``train`` (truncated in place): their sha256."""
    size = dtype.itemsize
    with open(src, "rb+") as f, open(val, "wb") as out:
        f.seek(cut * size)
        while chunk := f.read(_CHUNK_TOKENS * size):
            out.write(chunk)
        f.truncate(cut * size)
    os.replace(src, train)
    return {"train": sha256_file(train), "val": sha256_file(val)}


def _tokenise_hf(cfg: DataConfig, tmp: Path, bar: _Progress) -> tuple[dict, dict]:
    """``data.source=hf``: each row one document; the split by ``val_path``/``val_split`` or by document."""
    from trainer.hf_data import HFDocuments, open_dataset

    assert cfg.path is not None

    def documents(path: str, split: str, what: str) -> HFDocuments:
        return open_dataset(path, split=split, column=cfg.text_column, fmt=cfg.format, subset=cfg.subset, what=what)

    train = documents(cfg.path, cfg.split, "data.path")
    val: HFDocuments | None = None
    if cfg.val_path:
        val = documents(cfg.val_path, cfg.split, "data.val_path")
    elif cfg.val_split:
        val = documents(cfg.path, cfg.val_split, f"data.val_split={cfg.val_split!r} of data.path")
    if val is not None and val.kind != train.kind:
        raise DataError(f"{train.where} holds {train.kind} but {val.where} holds {val.kind}")
    if val is None:
        n = train.count()
        if n < 2:
            raise DataError(
                f"{train.where} has {n} row(s); holding out validation documents needs at least 2 "
                "(or set data.val_split / data.val_path)"
            )
        n_train: int | None = n - min(n - 1, max(1, round(n * cfg.val_fraction)))
    else:
        n_train = None
    if train.kind == "ids":
        meta, extra = _hf_ids(cfg, tmp, bar, train, val, n_train)
    else:
        meta, extra = _hf_text(cfg, tmp, bar, train, val, n_train)
    return meta, {"column": train.column, **extra}


def _known_docs(train: Any, val: Any) -> int | None:
    """Rows to read (a progress bar's total), ``None`` when a streamed split's length is unknown."""
    known = [d.n_docs for d in (train, val) if d is not None]
    return None if None in known else sum(known)


def _route(docs: Any, n_train: int | None, val: Any) -> Iterator[tuple[str, Any]]:
    """``(split, batch)``: ``docs``' batches (sliced at document ``n_train`` when given), then ``val``'s."""
    seen = 0
    for batch in docs:
        if n_train is None or seen + len(batch) <= n_train:
            yield "train", batch
        elif seen >= n_train:
            yield "val", batch
        else:
            yield "train", batch[: n_train - seen]
            yield "val", batch[n_train - seen :]
        seen += len(batch)
    if val is not None:
        for batch in val:
            yield "val", batch


def _hf_text(
    cfg: DataConfig, tmp: Path, bar: _Progress, train: Any, val: Any, n_train: int | None
) -> tuple[dict, dict]:
    from trainer.hf_data import batched
    from trainer.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.tokenizer, lambda: train.texts(limit=n_train), seed=cfg.seed)
    dtype = dtype_for(tok.vocab_size)
    bar.start(_known_docs(train, val), unit="doc")
    routed = _route(train.text_batches(), n_train, val.text_batches() if val is not None else None)
    items = ((split, text, True, len(text)) for split, batch in routed for text in batch)
    files = {s: _TokenFile(tmp / f"{s}.bin", dtype) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}

    def count(items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            documents[item[0]] += 1
            yield item

    try:
        _write_encoded(cfg, tok, batched(_counted(count(items), bar, by_size=False)), files)
    finally:
        hashes = {s: f.close() for s, f in files.items()}
    meta = {
        "dtype": dtype.name,
        "vocab_size": int(tok.vocab_size),
        "n_tokens": {s: files[s].n for s in files},
        "sha256": hashes,
    }
    return meta, {**_tokenizer_meta(tok, tmp), "input": "text", "documents": documents}


def _hf_ids(cfg: DataConfig, tmp: Path, bar: _Progress, train: Any, val: Any, n_train: int | None) -> tuple[dict, dict]:
    """Pre-tokenised rows: concatenated as they are (no end-of-document id); vocabulary ``max id + 1`` or a file's."""
    from trainer.tokenizer import build_tokenizer, parse_tokenizer_spec

    kind = parse_tokenizer_spec(cfg.tokenizer)[0]
    if kind == "bpe":
        raise DataError(
            f"data.tokenizer={cfg.tokenizer!r} needs text, but {train.where} holds token ids "
            f"(column {train.column!r}); leave data.tokenizer=bytes or give the ids' tokenizer.json"
        )
    tok = build_tokenizer(cfg.tokenizer, lambda: iter(()), seed=cfg.seed) if kind == "file" else None
    dtype = dtype_for(tok.vocab_size) if tok is not None else np.dtype(np.uint32)
    files = {s: _TokenFile(tmp / f"{s}.bin", dtype) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}
    bar.start(_known_docs(train, val), unit="doc")
    rows = ((values, lengths) for values, lengths in train.id_batches())
    try:
        for split, (values, lengths) in _route_ids(rows, n_train, val.id_batches() if val is not None else None):
            files[split].write(values)
            documents[split] += len(lengths)
            bar.update(len(lengths))
    finally:
        hashes = {s: f.close() for s, f in files.items()}
    top = max(files["train"].max, files["val"].max)
    if tok is not None:
        if top >= tok.vocab_size:
            raise DataError(f"{train.where} holds token id {top}, but data.tokenizer has {tok.vocab_size} ids")
        vocab = tok.vocab_size
        extra = _tokenizer_meta(tok, tmp)
        extra.pop("eos")  # rows are taken as they are: no end-of-document id was added
    else:
        vocab = top + 1
        extra = {"tokenizer": "pretokenized"}
        if dtype_for(vocab) != dtype:
            hashes = {s: _convert(files[s].path, dtype, dtype_for(vocab)) for s in files}
            dtype = dtype_for(vocab)
    meta = {
        "dtype": dtype.name,
        "vocab_size": int(vocab),
        "n_tokens": {s: files[s].n for s in files},
        "sha256": hashes,
    }
    return meta, {**extra, "input": "input_ids", "documents": documents}


def _route_ids(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], n_train: int | None, val: Iterator[Any] | None
) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray]]]:
    """Like :func:`_route` for ``(values, row lengths)`` batches: the flat ids are cut at row ``n_train``."""
    seen = 0
    for values, lengths in batches:
        k = len(lengths)
        if n_train is None or seen + k <= n_train:
            yield "train", (values, lengths)
        elif seen >= n_train:
            yield "val", (values, lengths)
        else:
            rows = n_train - seen
            at = int(lengths[:rows].sum())
            yield "train", (values[:at], lengths[:rows])
            yield "val", (values[at:], lengths[rows:])
        seen += k
    if val is not None:
        for batch in val:
            yield "val", batch


def _convert(path: Path, src: np.dtype, dst: np.dtype) -> str:
    """Rewrite a token file from dtype ``src`` to ``dst`` (values known to fit), chunk by chunk: its new sha256."""
    out = path.with_name(path.name + ".conv")
    h = hashlib.sha256()
    n = path.stat().st_size // src.itemsize
    with open(out, "wb") as f:
        if n:
            mm = np.memmap(path, dtype=src, mode="r", shape=(n,))
            for i in range(0, n, _CHUNK_TOKENS):
                raw = np.ascontiguousarray(mm[i : i + _CHUNK_TOKENS], dtype=dst).tobytes()
                f.write(raw)
                h.update(raw)
            del mm
    os.replace(out, path)
    return h.hexdigest()


def _same_config(stored: Any, cfg: DataConfig) -> bool:
    """Whether a data.json's stored config describes ``cfg`` (keys it lacks count at their defaults)."""
    if not isinstance(stored, dict):
        return False
    current = _cfg_dict(cfg)
    defaults = _cfg_dict(DataConfig())
    if not set(stored) <= set(current):
        return False
    return all(stored.get(k, defaults[k]) == v for k, v in current.items() if k not in _NOT_COMPARED)


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
