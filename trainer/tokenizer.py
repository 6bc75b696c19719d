"""Text tokenizers of a run: raw bytes, a trained byte-level BPE, or a ``tokenizer.json`` file.

``data.tokenizer`` (:class:`trainer.config.DataConfig`) names one of three kinds
(:func:`parse_tokenizer_spec`):

``bytes``
    Today's byte-level tokens: the UTF-8 bytes of the text are the ids
    ``0..255`` and ``256`` ends a document (257 ids). Needs no extra package.
``bpe:N``
    A byte-level BPE (Sennrich et al. 2016, "Neural machine translation of rare
    words with subword units", over bytes as in GPT-2) with at most ``N`` ids,
    trained on the run's training text with Hugging Face ``tokenizers``: the
    GPT-2 byte-to-character map and split pattern (``ByteLevel`` pre-tokenizer
    and decoder, no normaliser), an end-of-text special token
    (:data:`EOS_TOKEN`, id 0), and all 256 bytes in the initial alphabet, so any
    text encodes without unknown tokens and decodes back to itself.
``<path>``
    A ``tokenizer.json`` written by Hugging Face ``tokenizers`` (or a directory
    holding one, such as an exported model). Its end-of-text id is the first of
    :data:`EOS_CANDIDATES` it defines, else its only special token other than
    its unknown token; a string holding that unknown token's id has symbols the
    tokenizer cannot represent (``unk_id``).

The ``tokenizers`` package is imported lazily, only for ``bpe:N`` and files; a
missing package is a one-line error naming ``pip install relora-dynamics[text]``.
This module imports only torch-free modules (errors, atomic, run_format), so
:mod:`trainer.config` can validate specs with it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from trainer.atomic import sha256_file
from trainer.errors import CheckpointError, ConfigError, DataError
from trainer.run_format import TOKENIZER_FILE

__all__ = [
    "BYTE_VOCAB",
    "BYTE_EOS",
    "EOS_TOKEN",
    "EOS_CANDIDATES",
    "MAX_BPE_VOCAB",
    "TextTokenizer",
    "parse_tokenizer_spec",
    "build_tokenizer",
    "bytes_tokenizer_json",
    "padded_vocab_size",
    "run_tokenizer",
]

BYTE_EOS = 256  #: the bytes tokenizer's end-of-document id (ids 0..255 are the bytes themselves)
BYTE_VOCAB = 257  #: ids the bytes tokenizer can emit
EOS_TOKEN = "<|endoftext|>"  #: the end-of-text special token of a trained BPE (and of an exported bytes tokenizer)
#: special tokens taken as end-of-text in a ``tokenizer.json`` file, in this order of preference
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[EOS]", "[SEP]")
MAX_BPE_VOCAB = 1 << 20  #: the largest ``bpe:N`` accepted (token files hold uint32 beyond 65 536 ids)
VOCAB_MULTIPLE = 64  #: a model's vocabulary is padded up to a multiple of this (tensor-core friendly shapes)
KINDS = ("bytes", "bpe", "file")
_INSTALL = "pip install relora-dynamics[text]"


def _tokenizers() -> Any:
    """The ``tokenizers`` module, or a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"subword tokenizers need the 'tokenizers' package: {_INSTALL}") from None
    return tokenizers


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (the model's embedding rows for a tokenizer of ``n`` ids)."""
    return -(-int(n) // multiple) * multiple


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None, str | None]:
    """Validate a ``data.tokenizer`` value: ``("bytes", None, None)``, ``("bpe", N, None)`` or ``("file", None, path)``.

    A directory is accepted when it holds a ``tokenizer.json`` (the returned
    path is that file). Raises a one-line :class:`ConfigError` otherwise.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data.tokenizer must be 'bytes', 'bpe:N' or a tokenizer.json path; got {spec!r}")
    spec = spec.strip()
    if spec == "bytes":
        return "bytes", None, None
    if spec.startswith("bpe:") or spec == "bpe":
        text = spec[4:]
        try:
            n = int(text)
        except ValueError:
            raise ConfigError(f"data.tokenizer={spec!r}: N in 'bpe:N' must be an integer (e.g. bpe:8192)") from None
        if not BYTE_VOCAB <= n <= MAX_BPE_VOCAB:
            raise ConfigError(
                f"data.tokenizer={spec!r}: N must be in [{BYTE_VOCAB}, {MAX_BPE_VOCAB}] "
                f"(256 byte tokens and the end-of-text token come first)"
            )
        return "bpe", n, None
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer={spec!r} is neither 'bytes', 'bpe:N' nor an existing tokenizer.json file or directory"
        )
    return "file", None, str(path)


class TextTokenizer:
    """One run's text tokenizer: ``kind`` (``bytes`` | ``bpe`` | ``file``), ``vocab_size``, ``eos_id``.

    ``vocab_size`` is the number of ids the tokenizer can emit (one more than
    its largest id: 257 for bytes), ``eos_id`` the id appended after each
    document, which scoring also uses as the context that starts a sentence.
    ``unk_id`` is the id of the tokenizer's unknown token, ``None`` when it has
    none (bytes and byte-level BPE represent every string). Encoding never adds
    special tokens, and a special token's text inside a string is encoded as
    ordinary text (only the trainer puts ``eos_id`` between documents). Construct with :func:`build_tokenizer`, :meth:`byte_level` or
    :meth:`from_json`.
    """

    kind: str
    vocab_size: int
    eos_id: int
    unk_id: int | None

    def __init__(self, kind: str, backend: Any | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"tokenizer kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind = kind
        self._backend = backend
        if backend is None:
            if kind != "bytes":
                raise ConfigError(f"a {kind!r} tokenizer needs a tokenizers.Tokenizer")
            self.vocab_size, self.eos_id, self.unk_id = BYTE_VOCAB, BYTE_EOS, None
            return
        # text is text: a literal "<|endoftext|>" in a document is encoded as characters, never as the special id
        backend.encode_special_tokens = True
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError("the tokenizer has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = _eos_id(backend, vocab)
        unk = getattr(backend.model, "unk_token", None)
        self.unk_id = vocab.get(unk) if isinstance(unk, str) else None

    @classmethod
    def byte_level(cls) -> TextTokenizer:
        """The byte-level tokenizer: ids 0..255 are UTF-8 bytes, :data:`BYTE_EOS` ends a document."""
        return cls("bytes")

    def encode(self, text: str) -> list[int]:
        """Token ids of one string (no special tokens added)."""
        if self._backend is None:
            return list(text.encode("utf-8"))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each string (no special tokens added); ``tokenizers`` encodes a batch in parallel."""
        if self._backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens dropped; bytes that are not valid UTF-8 become U+FFFD)."""
        if self._backend is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return str(self._backend.decode(list(ids), skip_special_tokens=True))

    def to_json(self) -> str | None:
        """The ``tokenizer.json`` text (``None`` for bytes, which need no file; see :func:`bytes_tokenizer_json`)."""
        return None if self._backend is None else str(self._backend.to_str(pretty=True))

    def hf_json(self) -> str:
        """A ``tokenizer.json`` for every kind, bytes included (the export writes this beside the model)."""
        text = self.to_json()
        return bytes_tokenizer_json() if text is None else text

    @property
    def eos_token(self) -> str:
        """The end-of-text token's string (:data:`EOS_TOKEN` for bytes and trained BPE)."""
        if self._backend is None:
            return EOS_TOKEN
        return str(self._backend.id_to_token(self.eos_id))

    @classmethod
    def from_json(cls, text: str, *, kind: str = "file") -> TextTokenizer:
        """A tokenizer from ``tokenizer.json`` text (``kind`` records how it was made: ``bpe`` or ``file``)."""
        tk = _tokenizers()
        try:
            backend = tk.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed JSON
            raise DataError(f"not a tokenizers tokenizer.json: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return cls(kind, backend)

    @classmethod
    def from_file(cls, path: str | Path, *, kind: str = "file") -> TextTokenizer:
        """A tokenizer read from a ``tokenizer.json`` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read tokenizer file {str(path)!r}: {e}") from None
        try:
            return cls.from_json(text, kind=kind)
        except DataError as e:
            raise DataError(f"{str(path)!r}: {e}") from None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as ``(kind, tokenizer.json)`` (worker processes rebuild the same tokenizer)."""
        return {"kind": self.kind, "json": self.to_json()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        text = state["json"]
        backend = None if text is None else _tokenizers().Tokenizer.from_str(text)
        self.__init__(state["kind"], backend)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _eos_id(backend: Any, vocab: dict[str, int]) -> int:
    """The end-of-text id of a ``tokenizers`` tokenizer: a known name, else its only special token (not unknown)."""
    for name in EOS_CANDIDATES:
        if name in vocab:
            return vocab[name]
    unk = getattr(backend.model, "unk_token", None)
    special = [t for t in backend.get_added_tokens_decoder().values() if t.special and t.content != unk]
    if len(special) == 1:
        return vocab[special[0].content]
    raise DataError(
        f"the tokenizer has no end-of-text token: add one of {', '.join(EOS_CANDIDATES)} as a special token"
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``texts`` (documents), deterministically.

    Ids: 0 is :data:`EOS_TOKEN`, 1..256 the 256 byte symbols (sorted), then one
    id per merge in the order learned. ``tokenizers``' trainer is deterministic
    as it stands, threads included: the alphabet is sorted, word counts are
    sums (the same in any order), and each step merges the most frequent
    adjacent pair with ties broken by the smaller pair of ids, so the result is
    a function of the text alone (tests/trainer/test_tokenizer.py checks this
    across processes, hash seeds and ``TOKENIZERS_PARALLELISM``). A text too
    small to learn ``vocab_size - 257`` merges gives a smaller vocabulary (with
    a warning).
    """
    tk = _tokenizers()
    backend = tk.Tokenizer(tk.models.BPE())
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_checked_texts(texts), trainer=trainer)
    tok = TextTokenizer("bpe", backend)
    if tok.vocab_size < vocab_size:
        warnings.warn(
            f"data.tokenizer=bpe:{vocab_size}: the training text gave only {tok.vocab_size} tokens",
            stacklevel=2,
        )
    return tok


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    n = 0
    for t in texts:
        if not isinstance(t, str):
            raise DataError(f"BPE training text must be strings, got {type(t).__name__}")
        n += 1
        yield t
    if n == 0:
        raise DataError("no training text to learn a BPE tokenizer from")


def build_tokenizer(spec: str, training_texts: Callable[[], Iterable[str]], *, seed: int) -> TextTokenizer:
    """The tokenizer ``spec`` names (:func:`parse_tokenizer_spec`).

    ``training_texts()`` returns an iterator of documents; it is called (once)
    only for ``bpe:N``. ``seed`` is accepted so a run's tokenizer is a function of
    (text, seed); BPE training itself has no random choices, so the same text
    gives a byte-identical ``tokenizer.json`` for any seed.
    """
    del seed  # BPE training is deterministic (see train_bpe); nothing to seed
    kind, n, path = parse_tokenizer_spec(spec)
    if kind == "bytes":
        return TextTokenizer.byte_level()
    if kind == "bpe":
        assert n is not None
        return train_bpe(training_texts(), n)
    assert path is not None
    return TextTokenizer.from_file(path)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (the ``ByteLevel`` pre-tokenizer's alphabet).

    Printable Latin-1 bytes stand for themselves; the other 68 map, in byte
    order, to U+0100, U+0101, ... (Radford et al. 2019, GPT-2's byte encoder).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    out: list[str] = []
    extra = 0
    for b in range(256):
        if b in kept:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def bytes_tokenizer_json() -> str:
    """The bytes tokenizer as a ``tokenizer.json``: ids 0..255 the bytes, 256 :data:`EOS_TOKEN`.

    A ``tokenizers`` BPE with no merges over GPT-2's byte alphabet, a
    ``ByteLevel`` pre-tokenizer that does not split (``use_regex=False``) and the
    matching decoder, so ``encode(text).ids == list(text.encode("utf-8"))``.
    """
    vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
    doc: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": BYTE_EOS,
                "content": EOS_TOKEN,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    return json.dumps(doc, ensure_ascii=False, indent=2)


def run_tokenizer(data_meta: dict[str, Any], data_dir: str | Path) -> TextTokenizer | None:
    """The tokenizer a text run was trained with, from its ``data/data.json`` (``data_meta``) and ``data/`` directory.

    ``bytes`` runs need no file; ``bpe`` and ``file`` runs read
    ``data_dir/tokenizer.json``, checked against the recorded
    ``tokenizer_sha256`` (when present). ``None`` for runs without a text
    tokenizer (the grammar's words, pre-tokenised parquet). A missing or
    altered file is a :class:`CheckpointError` (a damaged run directory).
    """
    kind = data_meta.get("tokenizer")
    if kind == "bytes":
        return TextTokenizer.byte_level()
    if kind not in ("bpe", "file"):
        return None
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's {kind!r} tokenizer cannot be read")
    want = data_meta.get("tokenizer_sha256")
    if want is not None and sha256_file(path) != want:
        raise CheckpointError(f"{path} does not match the sha256 recorded in its data.json (altered or replaced)")
    return TextTokenizer.from_file(path, kind=kind)
