"""Documents in: local text files and Hugging Face ``datasets``, and their tokenisation, in parallel and in order.

Readers yield documents in a fixed order, a batch at a time, and never hold a
corpus in memory:

* :class:`TextFiles` (``data.source=text``): each file is one document, read
  in pieces of about :data:`PIECE_BYTES`. For the byte tokenizer a piece is
  any run of bytes; for other tokenizers a piece ends at a newline between two
  printable ASCII characters (``"x\\ny"``), where the byte-level pre-tokenizer
  (GPT-2's split pattern, :mod:`trainer.tokenizer`) always ends a pre-token, so
  the ids equal those of the whole file encoded at once (tested). The same holds
  for tokenizers that split at white space; a ``tokenizer.json`` that marks the
  start of its input (SentencePiece's ``Metaspace`` prefix) may encode the first
  word of a piece differently. A file with no such newline within
  :data:`MAX_PIECE_BYTES` is cut at a UTF-8 character boundary.
* :class:`HFDocuments` (``data.source=hf``): one row of a ``datasets`` dataset
  is one document: a ``save_to_disk`` directory (:func:`datasets.load_from_disk`,
  memory-mapped Arrow), local data files streamed by ``datasets.load_dataset``
  (``json``/``jsonl``, ``parquet``, ``txt`` (one row per line), ``csv``), or a
  hub dataset name streamed from the network. Rows are read as Arrow batches
  of :data:`ROW_BATCH` rows. The column is either text (strings; a missing
  value is an empty document) or pre-tokenised ids (a list of integers per row,
  as pico's ``input_ids`` corpora).

:func:`encode_in_order` tokenises batches of text in ``workers`` processes
(forked where the platform can, else spawned; each runs ``tokenizers``
single-threaded) with at most ``2 · workers`` batches in flight, and returns the
results in input order, so the token stream is the same for any number of
workers; ``workers=1`` (and the byte tokenizer) encodes in this process, also
single-threaded. Memory is bounded by the batches in flight: a task holds about
:data:`BATCH_CHARS` of text, except that one dataset row is never split (a row
of a whole book is encoded at once).

``datasets`` is imported lazily: a missing package is a one-line error naming
``pip install relora-dynamics[text]``. This module imports only
:mod:`trainer.errors` and :mod:`trainer.tokenizer` of the trainer.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from trainer.envvars import environ_set
from trainer.errors import ConfigError, DataError

__all__ = [
    "PIECE_BYTES",
    "MAX_PIECE_BYTES",
    "ROW_BATCH",
    "BATCH_CHARS",
    "TextBatch",
    "TextFiles",
    "HFDocuments",
    "hub_name",
    "open_dataset",
    "encode_in_order",
    "batched",
    "serial_tokenizers",
    "Encoder",
]

PIECE_BYTES = 1 << 18  #: a text file is read this many bytes at a time
MAX_PIECE_BYTES = 16 << 20  #: longest piece searched for a safe newline before cutting at a character boundary
ROW_BATCH = 1024  #: rows of a dataset read per Arrow batch
BATCH_CHARS = 1 << 18  #: a tokenisation task holds about this many characters (or bytes) of text
_INSTALL = "pip install relora-dynamics[text]"
#: file extensions (after an optional compression suffix) → ``datasets`` builder, for ``data.format=auto``
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

#: A tokenisation task: pieces of text (``str``, or ``bytes`` for the byte tokenizer) and, for each,
#: whether it ends its document (then the end-of-document id follows its ids).
TextBatch = tuple[list[Any], list[bool]]
T = TypeVar("T")


def _datasets() -> Any:
    """The ``datasets`` module, or a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.source=hf needs the 'datasets' package: {_INSTALL}") from None
    return datasets


def _builder_of(path: Path) -> str | None:
    """The ``datasets`` builder a data file's extension implies (``None`` for an unknown extension)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def hub_name(value: str) -> bool:
    """Whether ``value`` names a hub dataset (``name`` or ``owner/name``) rather than a local path.

    A value that exists on disk, starts with ``/``, ``.`` or ``~``, or ends in a
    data file extension is a local path.
    """
    if not isinstance(value, str) or Path(value).expanduser().exists() or not _HUB_NAME.match(value):
        return False
    return _builder_of(Path(value)) is None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- text files


@dataclass(frozen=True)
class TextFiles:
    """UTF-8 text files, one document each, in sorted path order (``path`` a file or a directory of ``*.txt``).

    ``raw``: yield pieces as ``bytes`` (for the byte tokenizer: the ids are the
    bytes themselves, whatever the encoding); else as ``str`` (strict UTF-8).
    """

    files: tuple[Path, ...]
    raw: bool = False

    @classmethod
    def under(cls, path: str, *, raw: bool = False) -> TextFiles:
        p = Path(path).expanduser()
        files = tuple(sorted(p.rglob("*.txt"))) if p.is_dir() else (p,)
        if not files:
            raise DataError(f"no .txt files under {path!r}")
        return cls(files, raw)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def pieces(self) -> Iterator[tuple[Any, bool, int]]:
        """``(piece, ends_document, n_bytes)`` for every piece of every file, in order (an empty file: one empty piece)."""
        for f in self.files:
            it = self._file_pieces(f)
            previous = next(it, None)
            if previous is None:  # an empty file: an empty document
                yield (b"" if self.raw else ""), True, 0
                continue
            for current in it:
                yield previous[0], False, previous[1]
                previous = current
            yield previous[0], True, previous[1]

    def texts(self) -> Iterator[str]:
        """The pieces as text (what a BPE learns from; a file's pieces join to its text)."""
        for piece, _, _ in TextFiles(self.files, raw=False).pieces():
            yield piece

    def _file_pieces(self, path: Path) -> Iterator[tuple[Any, int]]:
        try:
            with open(path, "rb") as f:
                if self.raw:
                    while chunk := f.read(PIECE_BYTES):
                        yield chunk, len(chunk)
                    return
                carry, offset = b"", 0
                while chunk := f.read(PIECE_BYTES):
                    buf = carry + chunk
                    cut = _safe_cut(buf)
                    if cut is None and len(buf) >= MAX_PIECE_BYTES:
                        cut = _char_cut(buf)
                    if cut is None:
                        carry = buf
                        continue
                    yield _decode(buf[:cut], path, offset), cut
                    offset += cut
                    carry = buf[cut:]
                if carry:
                    yield _decode(carry, path, offset), len(carry)
        except OSError as e:
            raise DataError(f"cannot read {str(path)!r}: {e.strerror or e}") from None


_PRINTABLE = range(0x21, 0x7F)


def _safe_cut(buf: bytes) -> int | None:
    """Index just after the last ``\\n`` of ``buf`` with a printable ASCII byte on each side (``None``: none)."""
    end = len(buf) - 1
    while True:
        i = buf.rfind(b"\n", 1, end)
        if i < 0:
            return None
        if buf[i - 1] in _PRINTABLE and buf[i + 1] in _PRINTABLE:
            return i + 1
        end = i


def _char_cut(buf: bytes) -> int:
    """The largest index ``<= len(buf)`` that does not split a UTF-8 character."""
    i = len(buf)
    while i > 0 and (buf[i - 1] & 0xC0) == 0x80:
        i -= 1
    if i > 0 and buf[i - 1] >= 0xC0:  # a lead byte whose continuation bytes are not all in buf
        i -= 1
    return i or len(buf)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (byte {offset + e.start}); use data.tokenizer=bytes or re-encode it"
        ) from None


# --------------------------------------------------------------------------- Hugging Face datasets


def _is_saved(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _data_files(path: Path, fmt: str) -> tuple[list[str], str]:
    """Local data files under ``path`` (sorted) and their builder (``fmt``, or inferred from the extension)."""
    files = (
        sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")) if path.is_dir() else [path]
    )
    if fmt != "auto":
        if path.is_dir():
            files = [f for f in files if _builder_of(f) in (fmt, None)]
        if not files:
            raise DataError(f"no data files under {str(path)!r}")
        return [str(f) for f in files], fmt
    builders = {f: _builder_of(f) for f in files}
    if path.is_dir():
        files = [f for f in files if builders[f] is not None]
    if not files:
        raise DataError(f"no json/jsonl/parquet/txt/csv files under {str(path)!r}")
    kinds = sorted({str(builders[f]) for f in files})
    if kinds == ["None"]:
        raise DataError(f"cannot tell the format of {str(path)!r} from its extension; set data.format")
    if len(kinds) > 1:
        raise DataError(f"{str(path)!r} mixes data formats ({', '.join(kinds)}); point data.path at one kind")
    return [str(f) for f in files], kinds[0]


class HFDocuments:
    """One split of a ``datasets`` dataset, read as documents: the rows' ``column`` (text or token ids).

    ``kind`` is ``"text"`` or ``"ids"``; ``n_docs`` the number of rows when the
    dataset knows it without reading (a ``save_to_disk`` dataset), else ``None``
    (:meth:`count` reads the column once).
    """

    def __init__(self, dataset: Any, column: str, kind: str, where: str, n_docs: int | None) -> None:
        self._ds = dataset.select_columns([column])
        self.column, self.kind, self.where, self.n_docs = column, kind, where, n_docs

    def tables(self) -> Iterator[Any]:
        """Arrow tables of :data:`ROW_BATCH` rows (one column), in order; read errors become one-line DataErrors."""
        try:
            yield from self._ds.with_format("arrow").iter(batch_size=ROW_BATCH)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for unreadable files
            raise DataError(f"cannot read {self.where}: {_first_line(e)}") from None

    def count(self) -> int:
        """Rows in the split (reads the column once unless already known)."""
        if self.n_docs is None:
            self.n_docs = sum(t.num_rows for t in self.tables())
        return self.n_docs

    def texts(self, limit: int | None = None) -> Iterator[str]:
        """The first ``limit`` (all) documents' text; a missing value is an empty document."""
        seen = 0
        for table in self.tables():
            for text in table.column(0).to_pylist():
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield text or ""

    def text_batches(self) -> Iterator[list[str]]:
        """Every document's text, in batches of up to :data:`ROW_BATCH` rows."""
        for table in self.tables():
            yield [t or "" for t in table.column(0).to_pylist()]

    def id_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per Arrow batch: the rows' ids concatenated (int64) and each row's length (int64, 0 for a missing row)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        for table in self.tables():
            col = table.column(0).combine_chunks()
            if isinstance(col, pa.ChunkedArray):  # an empty table
                col = col.chunk(0) if col.num_chunks else pa.array([], type=col.type)
            lengths = np.asarray(pc.fill_null(pc.list_value_length(col), 0), dtype=np.int64)
            values = np.asarray(col.flatten(), dtype=np.int64) if len(col) else np.zeros(0, np.int64)
            yield values, lengths


def _column_kind(arrow_type: Any, where: str, column: str) -> str:
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and pa.types.is_integer(
        arrow_type.value_type
    ):
        return "ids"
    if pa.types.is_null(arrow_type):
        return "text"
    raise DataError(f"{where}: column {column!r} holds {arrow_type}, neither text nor a list of token ids")


def open_dataset(
    path: str, *, split: str, column: str, fmt: str = "auto", subset: str | None = None, what: str = "data.path"
) -> HFDocuments:
    """Documents of ``path``'s ``split`` (a ``save_to_disk`` directory, local data files, or a hub name).

    ``subset``: a hub dataset's configuration name (``data.subset``; hub names only).

    ``column`` names the text column; when it is the default ``text`` and the
    dataset has none but has ``input_ids``, the ids are used. Local files form
    the single split ``train``. Every failure is a one-line :class:`DataError`.
    """
    datasets = _datasets()
    p = Path(path).expanduser()
    where = f"{what}={path!r}"
    n_docs: int | None = None
    if subset is not None and p.exists():
        raise DataError(f"data.subset={subset!r} names a hub dataset's configuration; {where} is a local path")
    if p.exists() and _is_saved(p):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types for damaged directories
            raise DataError(f"cannot load the saved dataset {where}: {_first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{where} has no split {split!r} (splits: {', '.join(ds)}); set data.split")
            ds = ds[split]
        n_docs = len(ds)
    elif p.exists():
        if split != "train":
            raise DataError(f"local data files form one split, 'train'; data.split={split!r} applies to saved datasets")
        files, builder = _data_files(p, fmt)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read {where} as {builder}: {_first_line(e)}") from None
    else:
        offline = any(
            os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        )
        try:
            ds = datasets.load_dataset(path, subset, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError ...
            hint = " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if offline else ""
            raise DataError(f"cannot load hub dataset {where}{hint}: {_first_line(e)}") from None
    return _documents(ds, column, where, n_docs)


def _documents(ds: Any, column: str, where: str, n_docs: int | None) -> HFDocuments:
    """Pick the column (text, or ``input_ids`` in place of a missing default ``text``) and its kind."""
    first = None
    columns = ds.column_names
    if columns is None:  # a streamed dataset whose features are only known once read
        try:
            first = next(iter(ds.with_format("arrow").iter(batch_size=1)), None)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read {where}: {_first_line(e)}") from None
        if first is None:
            raise DataError(f"{where} has no rows")
        columns = first.column_names
    if column not in columns:
        if column == "text" and "input_ids" in columns:
            column = "input_ids"
        else:
            raise DataError(f"{where} has no column {column!r} (columns: {', '.join(columns)}); set data.text_column")
    features = getattr(ds, "features", None)
    if first is None and features is not None and column in features:
        try:
            arrow_type = features.arrow_schema.field(column).type
        except Exception:  # noqa: BLE001 - older datasets: read one row instead
            arrow_type = None
    else:
        arrow_type = None
    if arrow_type is None:
        if first is None:
            try:
                first = next(iter(ds.select_columns([column]).with_format("arrow").iter(batch_size=1)), None)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot read {where}: {_first_line(e)}") from None
            if first is None:
                raise DataError(f"{where} has no rows")
        arrow_type = first.schema.field(column).type
    return HFDocuments(ds, column, _column_kind(arrow_type, where, column), where, n_docs)


# --------------------------------------------------------------------------- tokenisation, in order, in parallel


@contextmanager
def serial_tokenizers() -> Iterator[None]:
    """``tokenizers`` single-threaded inside the block (``TOKENIZERS_PARALLELISM=false``), the setting restored after."""
    with environ_set({"TOKENIZERS_PARALLELISM": "false"}):
        yield


class Encoder:
    """Encodes :data:`TextBatch` es with one tokenizer: each piece's ids, then ``eos_id`` after a document's last piece.

    Built from ``(kind, tokenizer_json)`` (``None`` for the byte tokenizer), so
    a worker process rebuilds exactly the parent's tokenizer. Output: one
    uint32 array per batch.
    """

    def __init__(self, kind: str, tokenizer_json: str | None) -> None:
        from trainer.tokenizer import TextTokenizer

        self.kind = kind
        self.tok = (
            TextTokenizer.byte_level() if tokenizer_json is None else TextTokenizer.from_json(tokenizer_json, kind=kind)
        )
        self.eos_id = self.tok.eos_id

    def __call__(self, batch: TextBatch) -> np.ndarray:
        pieces, ends = batch
        if self.kind == "bytes":
            encoded: list[Any] = [
                np.frombuffer(p if isinstance(p, bytes) else p.encode("utf-8"), dtype=np.uint8) for p in pieces
            ]
        else:
            encoded = self.tok.encode_batch(pieces)
        total = sum(len(e) for e in encoded) + sum(ends)
        out = np.empty(total, dtype=np.uint32)
        pos = 0
        for ids, end in zip(encoded, ends):
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
            if end:
                out[pos] = self.eos_id
                pos += 1
        return out


_WORKER_ENCODER: Encoder | None = None


def _init_worker(kind: str, tokenizer_json: str | None) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _WORKER_ENCODER = Encoder(kind, tokenizer_json)


def _encode_in_worker(batch: TextBatch) -> np.ndarray:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(batch)


def encode_in_order(
    tasks: Iterable[tuple[T, TextBatch]], *, kind: str, tokenizer_json: str | None, workers: int
) -> Iterator[tuple[T, np.ndarray]]:
    """``(tag, ids)`` for each ``(tag, batch)`` of ``tasks``, in order, encoded by ``workers`` processes.

    At most ``2 · workers`` batches are queued or being encoded at any time
    (bounded memory; the task iterator is read lazily). Tags stay in this
    process (e.g. which split a batch belongs to). The ids are the same for any
    ``workers``; ``workers == 1`` encodes here, single-threaded, and so does the
    byte tokenizer for any ``workers`` (its "encoding" is a copy, cheaper than
    sending the batch to a process).
    """
    if workers <= 1 or kind == "bytes":  # bytes are copied, not encoded: worker processes would only add transfers
        encoder = Encoder(kind, tokenizer_json)
        with serial_tokenizers():
            for tag, batch in tasks:
                yield tag, encoder(batch)
        return
    import multiprocessing
    import warnings
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork where there is one: the workers need neither torch nor the main module (spawn would re-run an
    # unguarded main script, and cannot start from stdin); the children use no thread of this process
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(method),
            initializer=_init_worker,
            initargs=(kind, tokenizer_json),
        )
    try:
        pending: deque[tuple[T, Future[np.ndarray]]] = deque()
        for tag, batch in tasks:
            with warnings.catch_warnings():  # workers are started lazily, on submit
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                pending.append((tag, pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 2 * workers:
                done_tag, result = pending.popleft()
                yield done_tag, result.result()
        while pending:
            done_tag, result = pending.popleft()
            yield done_tag, result.result()
    except BrokenProcessPool:
        raise DataError(f"a tokenisation worker process died (data.workers={workers}); try data.workers=1") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items: Iterable[tuple[T, Any, bool, int]]) -> Iterator[tuple[T, TextBatch]]:
    """Group ``(tag, piece, ends_document, size)`` items into ``(tag, batch)`` tasks, in order.

    A batch holds about :data:`BATCH_CHARS` of text (``size`` summed) and at most
    :data:`ROW_BATCH` pieces, all with the same tag.
    """
    tag: Any = None
    pieces: list[Any] = []
    ends: list[bool] = []
    size = 0
    for item_tag, piece, end, n in items:
        if pieces and item_tag != tag:
            yield tag, (pieces, ends)
            pieces, ends, size = [], [], 0
        tag = item_tag
        pieces.append(piece)
        ends.append(end)
        size += n
        if size >= BATCH_CHARS or len(pieces) >= ROW_BATCH:
            yield tag, (pieces, ends)
            pieces, ends, size = [], [], 0
    if pieces:
        yield tag, (pieces, ends)
