"""Evaluation: held-out loss and perplexity, and minimal-pair (BLiMP-style) accuracy.

A model *prefers* the grammatical sentence of a pair when its total
log-probability (natural log, summed over the sentence's tokens, each
conditioned on an end-of-document token and the tokens before it) is higher
than the ungrammatical one's. Accuracy is reported per phenomenon.

Minimal pairs come from the built-in grammar (:meth:`GrammarCorpus.minimal_pairs`)
or from BLiMP-format JSONL files: one object per line with ``sentence_good`` and
``sentence_bad``, and the phenomenon in ``UID`` (else ``linguistics_term``, else
the file name). Sentences are tokenised with the run's own tokenizer
(:func:`tokenizer_for`: grammar words, bytes, or the run's ``data/tokenizer.json``).
A pair is *not scored* when one of its sentences has no tokens (``n_empty``) or
holds a symbol the tokenizer cannot represent, i.e. its unknown token
(``n_unknown``); those pairs are counted and reported, never scored as failures.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.errors import EvaluationError, TrainerError  # defined there; importable from here as before
from trainer.run_format import DATA_DIR, DATA_META
from trainer.tokenizer import BYTE_EOS, run_tokenizer

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Tokenizer:
    """Text → token ids for a run's data, with the id that starts a context and the unknown token's id.

    ``kind``: ``grammar-words``, ``bytes``, ``bpe`` or ``file``; ``unk_id``:
    the id unrepresentable symbols encode to (``None``: every string is representable).
    """

    kind: str
    bos_id: int
    encode: Callable[[str], list[int]]
    unk_id: int | None = None


def tokenizer_for(data_meta: dict, data_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer a run was trained with, from its ``data/data.json`` (``data_meta``).

    ``bpe`` and ``file`` runs read ``data_dir/tokenizer.json`` (``data_dir``: the
    run's ``data/`` directory), checked against ``tokenizer_sha256`` when the
    metadata records it. The context-start id is the metadata's ``eos`` when given.
    """
    kind = data_meta.get("tokenizer")
    if kind == "grammar-words":
        vocab = {w: i for i, w in enumerate(data_meta["vocab"])}
        unk = vocab.get("<unk>", 1)
        return Tokenizer(kind, vocab.get("<eos>", 0), lambda s: [vocab.get(w, unk) for w in s.split()], unk)
    if kind == "bytes":
        return Tokenizer(kind, int(data_meta.get("eos", BYTE_EOS)), lambda s: list(s.encode("utf-8")))
    if kind in ("bpe", "file"):
        if data_dir is None:
            raise EvaluationError(f"a {kind!r} run's tokenizer is read from its data directory; none was given")
        try:
            tok = run_tokenizer(data_meta, data_dir)
        except TrainerError as e:
            raise EvaluationError(str(e)) from None
        assert tok is not None  # a text kind
        return Tokenizer(kind, int(data_meta.get("eos", tok.eos_id)), tok.encode, tok.unk_id)
    raise EvaluationError(
        f"runs trained on {kind!r} data have no text tokenizer here, so minimal pairs cannot be scored; "
        "use a run trained on the grammar or text source"
    )


def load_minimal_pairs(path: str | Path) -> list[dict]:
    """Read a BLiMP-style JSONL file. Errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read minimal pairs from {str(path)!r}: {e}") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise EvaluationError(f"{path}:{n}: not valid JSON") from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("sentence_good"), str)
            or not isinstance(rec.get("sentence_bad"), str)
        ):
            raise EvaluationError(f"{path}:{n}: expected an object with string fields sentence_good and sentence_bad")
        phenomenon = rec.get("UID") or rec.get("linguistics_term") or path.stem
        pairs.append(
            {"sentence_good": rec["sentence_good"], "sentence_bad": rec["sentence_bad"], "phenomenon": str(phenomenon)}
        )
    if not pairs:
        raise EvaluationError(f"{path} holds no minimal pairs")
    return pairs


@torch.no_grad()
def sentence_logprobs(
    model: torch.nn.Module,
    sentences: Sequence[list[int]],
    *,
    bos_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> list[float]:
    """Total log-probability (nats) of each token sequence under ``model``, each prefixed with ``bos_id``.

    Sequences are right-padded within a batch; padding never influences the
    scored positions because attention is causal.
    """
    out: list[float] = []
    was_training = model.training
    model.eval()
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    for i in range(0, len(sentences), batch_size):
        chunk = [[bos_id] + list(s) for s in sentences[i : i + batch_size]]
        length = max(len(s) for s in chunk)
        if max_len is not None and length > max_len:
            raise EvaluationError(f"a sentence of {length - 1} tokens exceeds the model's context ({max_len})")
        ids = torch.full((len(chunk), length), bos_id, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
        ids = ids.to(device)
        logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)  # (N, L-1, V)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (N, L-1)
        for j, s in enumerate(chunk):
            out.append(float(token_logp[j, : len(s) - 1].sum()))
    model.train(was_training)
    return out


@dataclass(frozen=True)
class PairScores:
    """Minimal-pair results per phenomenon (keys include ``"overall"``).

    ``accuracy``: fraction of *scored* pairs whose good sentence has the higher
    log-probability (NaN where no pair could be scored); ``n_pairs``: pairs in
    the set; ``n_empty``: pairs not scored because a sentence has no tokens;
    ``n_unknown``: pairs not scored because a sentence holds the tokenizer's
    unknown token (an empty sentence counts as empty only).
    """

    accuracy: dict[str, float]
    n_pairs: dict[str, int]
    n_empty: dict[str, int]
    n_unknown: dict[str, int]

    def not_scored(self, key: str = "overall") -> int:
        """Pairs of ``key`` that were counted but not scored (empty or unknown)."""
        return self.n_empty.get(key, 0) + self.n_unknown.get(key, 0)


def score_minimal_pairs(
    model: torch.nn.Module, pairs: Iterable[dict], tokenizer: Tokenizer, *, device: torch.device | str = "cpu"
) -> PairScores:
    """Score minimal pairs per phenomenon, counting (not scoring) pairs with empty or unrepresentable sentences."""
    pairs = list(pairs)
    counts: dict[str, dict[str, int]] = {k: defaultdict(int) for k in ("pairs", "empty", "unknown")}
    scored: list[tuple[str, list[int], list[int]]] = []
    for p in pairs:
        good, bad = tokenizer.encode(p["sentence_good"]), tokenizer.encode(p["sentence_bad"])
        if not good or not bad:
            status = "empty"
        elif tokenizer.unk_id is not None and (tokenizer.unk_id in good or tokenizer.unk_id in bad):
            status = "unknown"
        else:
            status = "scored"
            scored.append((p["phenomenon"], good, bad))
        for key in (p["phenomenon"], "overall"):
            counts["pairs"][key] += 1
            if status != "scored":
                counts[status][key] += 1
    lg = sentence_logprobs(model, [g for _, g, _ in scored], bos_id=tokenizer.bos_id, device=device)
    lb = sentence_logprobs(model, [b for _, _, b in scored], bos_id=tokenizer.bos_id, device=device)
    hits: dict[str, list[bool]] = defaultdict(list)
    for (phenomenon, _, _), a, b in zip(scored, lg, lb):
        hits[phenomenon].append(a > b)
        hits["overall"].append(a > b)
    keys = sorted(counts["pairs"])
    return PairScores(
        accuracy={k: sum(hits[k]) / len(hits[k]) if hits[k] else math.nan for k in keys},
        n_pairs={k: counts["pairs"][k] for k in keys},
        n_empty={k: counts["empty"][k] for k in keys},
        n_unknown={k: counts["unknown"][k] for k in keys},
    )


def minimal_pair_accuracy(
    model: torch.nn.Module, pairs: Iterable[dict], tokenizer: Tokenizer, *, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Fraction of scored pairs where the good sentence scores higher, per phenomenon, plus ``"overall"``.

    See :func:`score_minimal_pairs` for the pairs left out (and their counts).
    """
    return score_minimal_pairs(model, pairs, tokenizer, device=device).accuracy


def builtin_pairs(data_meta: dict, n: int = 400, seed: int = 12345) -> list[dict] | None:
    """A fixed set of the built-in grammar's minimal pairs for a run on that corpus (``None`` for other sources)."""
    if data_meta.get("tokenizer") != "grammar-words":
        return None
    from trainer.corpus import GrammarConfig, GrammarCorpus

    corpus = GrammarCorpus(GrammarConfig(seed=data_meta["config"]["seed"]))
    return corpus.minimal_pairs(n, seed=seed)


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a loss in nats/token (``inf`` on overflow)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_run(
    run_dir: str | Path,
    *,
    blimp: Sequence[str | Path] = (),
    steps: Sequence[int] | None = None,
    n_builtin_pairs: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Evaluate every checkpoint (or ``steps``) of a run.

    Returns a long table with columns :data:`EVAL_COLUMNS`: ``val_loss``
    (nats/token) and ``val_ppl`` on the run's fixed validation batches, and
    ``pair_acc`` per phenomenon (and ``overall``) for the built-in grammar's
    pairs (``source=builtin``, grammar runs only) and each BLiMP file, over the
    pairs that could be scored. ``pair_acc`` rows also carry ``n_pairs``,
    ``n_empty`` and ``n_unknown`` (:class:`PairScores`; empty for the
    validation rows); a source with pairs left out is reported once through
    ``warn`` (default :func:`warnings.warn`), naming how many and why.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from trainer.checkpoint import load_model, read_manifest
    from trainer.config import config_from_dict
    from trainer.data import prepare, validation_batches

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    cfg = config_from_dict({**manifest["config"], "init_from": None})
    meta = json.loads((run_dir / DATA_DIR / DATA_META).read_text())
    streams = prepare(cfg.data, run_dir / DATA_DIR)
    val = validation_batches(
        streams.val, n_batches=cfg.eval_batches, batch_size=cfg.micro_batch_size, seq_len=cfg.context
    )
    pair_sets: dict[str, list[dict]] = {}
    builtin = builtin_pairs(meta, n=n_builtin_pairs)
    if builtin is not None:
        pair_sets["builtin"] = builtin
    for path in blimp:
        pair_sets[Path(path).stem] = load_minimal_pairs(path)
    tokenizer = tokenizer_for(meta, run_dir / DATA_DIR) if pair_sets else None
    warned: set[str] = set()
    entries = (
        manifest["checkpoints"] if steps is None else [c for c in manifest["checkpoints"] if c["step"] in set(steps)]
    )
    if steps is not None and len(entries) != len(set(steps)):
        have = [c["step"] for c in manifest["checkpoints"]]
        raise EvaluationError(
            f"{run_dir} has no checkpoint at step(s) {sorted(set(steps) - set(have))}; available: {have}"
        )
    rows = []
    for entry in tqdm(entries, desc=f"evaluate {run_dir.name}", disable=not progress, unit="ckpt"):
        model = load_model(run_dir, entry["step"], device=device)
        with torch.no_grad():
            total = sum(float(model.loss(x.to(device), y.to(device))) * x.numel() for x, y in val)
        loss = total / sum(x.numel() for x, _ in val)
        base = {"step": entry["step"], "tokens_seen": entry["tokens_seen"]}
        rows += [
            {**base, "metric": "val_loss", "phenomenon": None, "source": "validation", "value": loss},
            {**base, "metric": "val_ppl", "phenomenon": None, "source": "validation", "value": perplexity(loss)},
        ]
        for source, pairs in pair_sets.items():
            assert tokenizer is not None  # made whenever there are pairs
            scores = score_minimal_pairs(model, pairs, tokenizer, device=device)
            for phenomenon, acc in scores.accuracy.items():
                counts = {f"n_{k}": getattr(scores, f"n_{k}")[phenomenon] for k in ("pairs", "empty", "unknown")}
                rows.append(
                    {**base, "metric": "pair_acc", "phenomenon": phenomenon, "source": source, "value": acc, **counts}
                )
            if scores.not_scored() and source not in warned:
                warned.add(source)
                (warn or _warn)(
                    f"{source}: {scores.not_scored()} of {scores.n_pairs['overall']} minimal pairs not scored "
                    f"({scores.n_empty['overall']} with a sentence of no tokens, {scores.n_unknown['overall']} "
                    f"with symbols the {tokenizer.kind} tokenizer cannot represent)"
                )
    table = pd.DataFrame(rows, columns=list(EVAL_COLUMNS))
    return table.astype({c: "Int64" for c in EVAL_COUNT_COLUMNS})


#: counts of minimal pairs in ``pair_acc`` rows (see :class:`PairScores`)
EVAL_COUNT_COLUMNS = ("n_pairs", "n_empty", "n_unknown")
#: the columns of :func:`evaluate_run`'s table
EVAL_COLUMNS = ("step", "tokens_seen", "metric", "source", "phenomenon", "value", *EVAL_COUNT_COLUMNS)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
