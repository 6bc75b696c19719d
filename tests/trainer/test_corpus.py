"""Tests for trainer.corpus: the generated grammar corpus and its minimal pairs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.corpus import (
    EOS_ID,
    MAX_ADJS,
    MAX_NOUNS,
    MAX_VERBS,
    PHENOMENA,
    UNK_ID,
    GrammarConfig,
    GrammarCorpus,
    bigram_entropy,
    split_seeds,
    unigram_entropy,
)


@pytest.fixture(scope="module")
def corpus() -> GrammarCorpus:
    return GrammarCorpus()


@pytest.fixture(scope="module")
def tokens(corpus: GrammarCorpus) -> np.ndarray:
    return corpus.generate_tokens(200_000, seed=0)


# ---- an independent checker -------------------------------------------------------------------


class Unparsable(Exception):
    pass


def check(words: list[str], corpus: GrammarCorpus) -> tuple[list[str], dict]:
    """Parse one sentence with the grammar's rules; return (agreement violations, info).

    Written independently of the corpus sampler and scorer: it only uses the
    vocabulary's number tables (``lexicon``) and the noun classes. Raises
    ``Unparsable`` if the word sequence does not fit the phrase structure.
    ``info``: ``main_verb`` (position), ``depth`` (deepest modifier nesting),
    ``subject_number``.
    """
    lex = corpus.lexicon
    animate = {f for pair, c in zip(corpus.noun_forms, corpus.noun_classes) if c in ("person", "animal") for f in pair}
    violations: list[str] = []
    info = {"depth": 0}
    pos = 0

    def cat(i: int) -> str | None:
        return lex.get(words[i], ("unk", None))[0] if i < len(words) else None

    def take(c: str) -> str:
        nonlocal pos
        if cat(pos) != c:
            raise Unparsable(f"expected {c} at {pos} in {' '.join(words)!r}")
        pos += 1
        return words[pos - 1]

    def np_(depth: int) -> str:
        nonlocal pos
        info["depth"] = max(info["depth"], depth)
        det = take("det")
        while cat(pos) == "adj":
            pos += 1
        noun = take("noun")
        number = lex[noun][1]
        if lex[det][1] not in (None, number):
            violations.append(f"det-noun: {det} {noun}")
        if cat(pos) == "prep":
            pos += 1
            np_(depth + 1)
        elif cat(pos) == "comp":
            if take("comp") == "who" and noun not in animate:
                violations.append(f"who after inanimate {noun}")
            if cat(pos) == "det":  # object gap
                sub = np_(depth + 1)
                verb = take("verb")
                if lex[verb][1] != sub:
                    violations.append(f"subject-verb (object relative): {verb}")
            else:
                vp(number, depth + 1)
        return number

    def vp(number: str, depth: int) -> int:
        at = pos
        verb = take("verb")
        if lex[verb][1] != number:
            violations.append(f"subject-verb: {verb}")
        if cat(pos) == "det":
            np_(depth)
        return at

    subject = np_(0)
    info["subject_number"] = subject
    info["main_verb"] = vp(subject, 0)
    take("punct")
    if pos != len(words) or words[-1] != ".":
        raise Unparsable(f"trailing words in {' '.join(words)!r}")
    return violations, info


def sentences_of(corpus: GrammarCorpus, toks: np.ndarray) -> list[list[str]]:
    words = corpus.decode(toks).split()
    out, cur = [], []
    for w in words:
        if w == "<eos>":
            assert not cur, "a document must end with '.' before <eos>"
            continue
        cur.append(w)
        if w == ".":
            out.append(cur)
            cur = []
    return out  # the last (cut) sentence is dropped


# ---- vocabulary -------------------------------------------------------------------------------


def test_vocab_layout(corpus: GrammarCorpus) -> None:
    assert corpus.vocab_size == len(corpus.vocab) <= 512
    assert len(set(corpus.vocab)) == corpus.vocab_size
    assert corpus.vocab[EOS_ID] == "<eos>" and corpus.vocab[UNK_ID] == "<unk>"
    assert (EOS_ID, UNK_ID) == (0, 1) == (corpus.eos_id, corpus.unk_id)
    assert len(corpus.noun_forms) == 150 and len(corpus.verb_forms) == 60
    for sg, pl in corpus.noun_forms:
        assert sg != pl and corpus.lexicon[sg] == ("noun", "sg") and corpus.lexicon[pl] == ("noun", "pl")
    for sg, pl in corpus.verb_forms:  # English 3rd person singular: +s / +es / y->ies
        assert sg in (pl + "s", pl + "es", pl[:-1] + "ies")
        assert corpus.lexicon[sg] == ("verb", "sg") and corpus.lexicon[pl] == ("verb", "pl")
    dets = {w: n for w, (c, n) in corpus.lexicon.items() if c == "det"}
    assert dets == {"a": "sg", "this": "sg", "every": "sg", "some": "pl", "these": "pl", "many": "pl", "the": None}
    big = GrammarCorpus(GrammarConfig(n_nouns=MAX_NOUNS, n_verbs=MAX_VERBS, n_adjs=MAX_ADJS))
    assert big.vocab_size < 1000


def test_vocab_depends_on_seed_only_through_choice(corpus: GrammarCorpus) -> None:
    again = GrammarCorpus(GrammarConfig(seed=0))
    assert again.vocab == corpus.vocab
    other = GrammarCorpus(GrammarConfig(seed=1))
    assert other.vocab != corpus.vocab and other.vocab_size == corpus.vocab_size


def test_encode_decode(corpus: GrammarCorpus) -> None:
    (_, dogs), (cat, _), (_, chase) = corpus.noun_forms[0], corpus.noun_forms[1], corpus.verb_forms[0]
    text = f"the {dogs} near a {cat} {chase} some {dogs} . <eos>"
    ids = corpus.encode(text)
    assert corpus.decode(ids) == text
    assert corpus.encode("the florbs xyzzy")[1:] == [UNK_ID, UNK_ID]
    assert corpus.encode("") == []
    with pytest.raises(ValueError, match="out of range"):
        corpus.decode([corpus.vocab_size])


_DEFAULT = GrammarCorpus()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=_DEFAULT.vocab_size - 1), max_size=40))
def test_decode_encode_roundtrip(ids: list[int]) -> None:
    assert _DEFAULT.encode(_DEFAULT.decode(ids)) == ids


# ---- token streams ----------------------------------------------------------------------------


def test_generate_tokens_shape_and_range(corpus: GrammarCorpus, tokens: np.ndarray) -> None:
    assert tokens.dtype == np.uint16 and tokens.shape == (200_000,)
    assert int(tokens.max()) < corpus.vocab_size
    assert not (tokens == UNK_ID).any()
    assert corpus.generate_tokens(0, seed=0).shape == (0,)
    assert corpus.generate_tokens(7, seed=3).shape == (7,)
    # Documents: 1..5 sentences, each ending in '.', each followed by <eos>.
    eos = np.flatnonzero(tokens == EOS_ID)
    assert len(eos) > 1000
    dot = corpus.word_to_id["."]
    assert (tokens[eos - 1] == dot).all()
    n_sent = np.diff(np.cumsum(tokens == dot)[eos])
    assert n_sent.min() >= 1 and n_sent.max() <= 5


def test_generate_tokens_deterministic(corpus: GrammarCorpus, tokens: np.ndarray) -> None:
    np.testing.assert_array_equal(corpus.generate_tokens(200_000, seed=0), tokens)
    np.testing.assert_array_equal(GrammarCorpus().generate_tokens(50_000, seed=0), tokens[:50_000])  # prefix
    assert not np.array_equal(corpus.generate_tokens(50_000, seed=1), tokens[:50_000])
    other = GrammarCorpus(GrammarConfig(seed=1)).generate_tokens(50_000, seed=0)
    assert not np.array_equal(other, tokens[:50_000])


def test_split_seeds() -> None:
    train = {split_seeds(s)[0] for s in range(100)}
    val = {split_seeds(s)[1] for s in range(100)}
    assert len(train) == len(val) == 100 and not train & val
    t, v = split_seeds(5)
    c = GrammarCorpus()
    assert not np.array_equal(c.generate_tokens(1000, seed=t), c.generate_tokens(1000, seed=v))
    with pytest.raises(ValueError):
        split_seeds(-1)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_generate_tokens_rejects_bad_args(corpus: GrammarCorpus, bad: object) -> None:
    with pytest.raises(ValueError):
        corpus.generate_tokens(bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        corpus.generate_tokens(10, seed=bad)  # type: ignore[arg-type]


def test_every_generated_sentence_agrees(corpus: GrammarCorpus, tokens: np.ndarray) -> None:
    sents = sentences_of(corpus, tokens)
    assert len(sents) > 10_000
    depths, attracted, relatives = Counter(), 0, 0
    for words in sents:
        violations, info = check(words, corpus)
        assert not violations, (violations, " ".join(words))
        depths[info["depth"]] += 1
        # An attractor: some noun of the other number between the subject's head and the main verb.
        between = words[: info["main_verb"]]
        other = "pl" if info["subject_number"] == "sg" else "sg"
        attracted += any(corpus.lexicon[w] == ("noun", other) for w in between)
        relatives += "that" in between or "who" in between
    assert max(depths) == corpus.config.max_depth  # recursion is used, and bounded
    assert attracted > 0.05 * len(sents) and relatives > 0.05 * len(sents)


def test_sample_sentence(corpus: GrammarCorpus) -> None:
    rng = np.random.default_rng(0)
    sents = [corpus.sample_sentence(rng) for _ in range(300)]
    for words in sents:
        assert check(words, corpus)[0] == []
        assert math.isfinite(corpus.sentence_logprob(words))
    rng2 = np.random.default_rng(0)
    assert [corpus.sample_sentence(rng2) for _ in range(300)] == sents


def test_config_changes_structure() -> None:
    flat = GrammarCorpus(GrammarConfig(max_depth=0, p_adj=0.0))
    for words in sentences_of(flat, flat.generate_tokens(5000, seed=0)):
        violations, info = check(words, flat)
        assert not violations and info["depth"] == 0
        assert not any(flat.lexicon[w][0] in ("adj", "prep", "comp") for w in words)


def test_zipf(corpus: GrammarCorpus, tokens: np.ndarray) -> None:
    lemma = {f: i for i, pair in enumerate(corpus.noun_forms) for f in pair}
    counts = Counter(lemma[w] for w in corpus.decode(tokens).split() if w in lemma)
    freq = np.array(sorted((counts.get(i, 0) for i in range(len(corpus.noun_forms))), reverse=True))
    assert freq[0] > 20 * np.median(freq)
    assert counts.most_common(1)[0][0] in range(5)  # noun ids are in Zipf-rank order


# ---- scoring ----------------------------------------------------------------------------------


def test_logprob_matches_sampling_frequencies() -> None:
    """On a tiny grammar, exp(sentence_logprob) equals the observed frequency of each sentence."""
    c = GrammarCorpus(GrammarConfig(n_nouns=3, n_verbs=2, n_adjs=1, max_depth=1, p_adj=0.2, max_adjs=1))
    sents = [" ".join(s) for s in sentences_of(c, c.generate_tokens(150_000, seed=0))]
    n = len(sents)
    counts = Counter(sents)
    total = 0.0
    for s, k in counts.items():
        p = math.exp(c.sentence_logprob(s))
        total += p
        if k >= 100:
            assert abs(k / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (s, k / n, p)
    assert 0.5 < total <= 1.0 + 1e-9


def _words(corpus: GrammarCorpus) -> dict[str, str]:
    """Some words of the corpus: an animate and an inanimate noun, a verb, in both numbers."""
    animate = corpus.noun_classes.index("person")
    thing = next(i for i, c in enumerate(corpus.noun_classes) if c in ("food", "artefact"))
    (dog, dogs), (cheese, cheeses) = corpus.noun_forms[animate], corpus.noun_forms[thing]
    (runs, run), (chases, chase) = corpus.verb_forms[0], corpus.verb_forms[1]
    return dict(dog=dog, dogs=dogs, cheese=cheese, cheeses=cheeses, runs=runs, run=run, chases=chases, chase=chase)


def test_logprob_rejects(corpus: GrammarCorpus) -> None:
    w = _words(corpus)
    ok = "the {dog} {runs} .".format(**w)
    assert math.isfinite(corpus.sentence_logprob(ok))
    assert corpus.sentence_logprob(corpus.encode(ok)) == corpus.sentence_logprob(ok)
    assert corpus.sentence_logprob(ok.split()) == corpus.sentence_logprob(ok)
    for good in ("the {dogs} near the {cheese} {run} .", "the {dog} who the {cheeses} {chase} {runs} .",
                 "a {dog} that {chases} these {cheeses} {runs} ."):  # fmt: skip
        assert math.isfinite(corpus.sentence_logprob(good.format(**w))), good
    agreement_errors = ("the {dog} {run} .", "these {dog} {runs} .", "the {dogs} near the {cheese} {runs} .",
                        "the {dog} who the {cheeses} {chases} {runs} .",
                        "the {cheese} who the {dogs} {chase} {runs} .")  # fmt: skip
    other_errors = (
        "the {dog} {runs}",
        "the {dog} {runs} . .",
        "{dog} {runs} .",
        "the xyzzy {runs} .",
        "the {dog} near the {dog} near the {dog} near the {dog} {runs} .",
    )  # fmt: skip  (depth 3 > 2)
    for bad in agreement_errors + other_errors:
        assert corpus.sentence_logprob(bad.format(**w)) == -math.inf, bad
    for bad in agreement_errors:  # the independent checker agrees
        assert check(bad.format(**w).split(), corpus)[0], bad
    with pytest.raises(ValueError):
        corpus.sentence_logprob([corpus.vocab_size])


def test_entropies(corpus: GrammarCorpus, tokens: np.ndarray) -> None:
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert unigram_entropy(np.array([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert bigram_entropy([0, 1, 0, 1, 0]) == pytest.approx(0.0)
    h1, h2 = unigram_entropy(tokens), bigram_entropy(tokens)
    h = corpus.entropy_rate(300, seed=0)
    assert 0 < h < h2 < h1 < math.log(corpus.vocab_size)
    with pytest.raises(ValueError):
        unigram_entropy([])


# ---- minimal pairs ----------------------------------------------------------------------------


def test_minimal_pairs(corpus: GrammarCorpus) -> None:
    pairs = corpus.minimal_pairs(400, seed=0)
    assert len(pairs) == 400 and [p["pair_id"] for p in pairs] == list(range(400))
    assert Counter(p["phenomenon"] for p in pairs) == {ph: 100 for ph in PHENOMENA}
    for p in pairs:
        assert set(p) == {"sentence_good", "sentence_bad", "phenomenon", "pair_id"}
        good, bad = p["sentence_good"].split(), p["sentence_bad"].split()
        assert len(good) == len(bad)
        diff = [i for i, (a, b) in enumerate(zip(good, bad)) if a != b]
        assert len(diff) == 1, p
        g_viol, info = check(good, corpus)
        b_viol, _ = check(bad, corpus)
        assert g_viol == [] and len(b_viol) == 1, p
        assert math.isfinite(corpus.sentence_logprob(good)) and corpus.sentence_logprob(bad) == -math.inf
        if p["phenomenon"] == "determiner_noun_agreement":
            assert diff == [0] and b_viol[0].startswith("det-noun")
        else:
            assert diff == [info["main_verb"]] and b_viol[0].startswith("subject-verb")
        if p["phenomenon"] in ("agreement_across_pp", "agreement_across_relative_clause"):
            other = "pl" if info["subject_number"] == "sg" else "sg"
            assert any(corpus.lexicon[w] == ("noun", other) for w in good[1 : diff[0]]), p  # an attractor
            marker = "prep" if p["phenomenon"] == "agreement_across_pp" else "comp"
            assert any(corpus.lexicon[w][0] == marker for w in good[: diff[0]])
        if p["phenomenon"] == "subject_verb_agreement":
            assert all(corpus.lexicon[w][0] in ("det", "adj", "noun") for w in good[: diff[0]])
    rc = [p["sentence_good"].split() for p in pairs if p["phenomenon"] == "agreement_across_relative_clause"]
    object_gap = sum(corpus.lexicon[s[s.index(c) + 1]][0] == "det" for s in rc for c in ("that", "who") if c in s)
    assert 20 < object_gap < 80  # both kinds of relative clause


def test_minimal_pairs_deterministic(corpus: GrammarCorpus) -> None:
    a = corpus.minimal_pairs(40, seed=3)
    assert a == GrammarCorpus().minimal_pairs(40, seed=3)
    assert a != corpus.minimal_pairs(40, seed=4)
    only = corpus.minimal_pairs(5, seed=0, phenomena=["agreement_across_pp"])
    assert {p["phenomenon"] for p in only} == {"agreement_across_pp"}


def test_minimal_pairs_errors(corpus: GrammarCorpus) -> None:
    flat = GrammarCorpus(GrammarConfig(max_depth=0))
    with pytest.raises(ValueError, match="unknown phenomenon"):
        corpus.minimal_pairs(4, seed=0, phenomena=["binding"])
    with pytest.raises(ValueError, match="impossible"):
        GrammarCorpus(GrammarConfig(p_pp=0.0)).minimal_pairs(4, seed=0)
    with pytest.raises(ValueError, match="impossible"):
        flat.minimal_pairs(4, seed=0, phenomena=["agreement_across_relative_clause"])
    assert len(flat.minimal_pairs(4, seed=0, phenomena=PHENOMENA[::3])) == 4


# ---- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed must be an int"),
        ({"n_nouns": 1}, "n_nouns"),
        ({"n_nouns": MAX_NOUNS + 1}, "n_nouns"),
        ({"n_verbs": 1000}, "n_verbs"),
        ({"n_adjs": 0}, "n_adjs"),
        ({"zipf_exponent": -0.5}, "zipf_exponent"),
        ({"zipf_exponent": float("nan")}, "zipf_exponent"),
        ({"max_depth": -1}, "max_depth"),
        ({"p_pp": 1.5}, "p_pp"),
        ({"p_pp": 0.6, "p_rel": 0.6}, "p_pp \\+ p_rel"),
        ({"p_adj": 1.0}, "p_adj"),
        ({"p_plural": 0.0}, "p_plural"),
        ({"selection_strength": -0.1}, "selection_strength"),
        ({"doc_min_sentences": 0}, "doc_min_sentences"),
        ({"doc_min_sentences": 4, "doc_max_sentences": 2}, "doc_min_sentences"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GrammarConfig(**kwargs)


def test_config_extremes_still_generate() -> None:
    for cfg in (
        GrammarConfig(n_nouns=2, n_verbs=2, n_adjs=1, zipf_exponent=0.0),
        GrammarConfig(selection_strength=1.0, transitive_fraction=0.0, p_object_relative=1.0),
        GrammarConfig(p_pp=0.5, p_rel=0.5, max_depth=3, max_adjs=0),
    ):
        c = GrammarCorpus(cfg)
        for words in sentences_of(c, c.generate_tokens(3000, seed=0)):
            assert check(words, c)[0] == []
            assert math.isfinite(c.sentence_logprob(words))
