"""A built-in, generated text corpus: a small probabilistic grammar of English-like sentences.

Used to pretrain tiny LLaMA-style models on CPU in minutes (a stand-in for real
pretraining data) and to evaluate them with BLiMP-style minimal pairs. Only
numpy and the standard library are needed.

The grammar
-----------
Word-level tokens; every rule is sampled top-down::

    Doc       → S{k} <eos>                    k ~ Uniform{doc_min_sentences..doc_max_sentences}
    S         → NP_subj VP '.'
    NP        → Det Adj{0..max_adjs} Noun (PP | RelClause)?   (modifier only below max_depth)
    PP        → Prep NP
    RelClause → Comp VP                       (subject gap: "the dog that chases the cats")
              | Comp NP Verb                  (object gap:  "the dog that the cats chase")
    VP        → Verb NP_obj?
    Comp      → 'that' | 'who'                ('who' only after a person or an animal)

Structure to learn:

* **Number agreement.** Every NP draws a number (singular w.p. ``1 - p_plural``).
  The determiner agrees with its noun (``a``/``this``/``every`` singular,
  ``some``/``these``/``many`` plural, ``the`` either) and every verb agrees with
  its subject: the main verb with the head of the subject NP, *across* any
  PP or relative clause in between (whose nouns draw their own number, so they
  often act as attractors), the verb of a subject-gap relative clause with the
  noun the clause modifies, the verb of an object-gap relative clause with the
  clause's own subject.
* **Zipfian words.** Within each category, word ``r`` (0-based rank, ranks
  fixed by ``seed``) has probability ∝ ``(r + 1) ** -zipf_exponent``.
* **Lexical selection.** Nouns fall into 8 semantic classes (people, animals,
  food, artefacts, places, vehicles, nature, documents). Each verb prefers
  subjects from half of the classes and objects from two classes, and is either
  transitive-leaning (takes an object w.p. 0.9) or intransitive-leaning (0.1),
  all drawn from ``seed``; ``selection_strength`` is the probability mass
  on the preferred words (the rest follows the plain Zipf distribution), so
  every sentence the grammar can produce keeps a non-zero probability.
* **Bounded recursion.** The subject and main-clause object are at depth 0;
  nouns inside a modifier of a depth-``d`` NP are at depth ``d + 1``; only NPs
  at depth ``< max_depth`` take a modifier.

The grammar is unambiguous (each NP has at most one modifier, right after its
noun, and an NP is only ever followed by a verb or ``.``), so
:meth:`GrammarCorpus.sentence_logprob` scores a sentence exactly, and
:meth:`GrammarCorpus.entropy_rate` estimates the best cross-entropy any model
can reach on the token stream.

Example (default config)::

    >>> corpus = GrammarCorpus()
    >>> corpus.vocab_size
    482
    >>> corpus.decode(corpus.generate_tokens(23, seed=0))
    'this cherry finds the markets near this market behind the blue writers . the poor picture that some lucky cherries find greets .'
    >>> " ".join(corpus.sample_sentence(np.random.default_rng(2)))
    'many nervous cherries under the cherry of some busy poets see .'
    >>> corpus.minimal_pairs(8, seed=0)[6]
    {'sentence_good': 'the parrots that find the lucky market greet .', 'sentence_bad': 'the parrots that find the lucky market greets .', 'phenomenon': 'agreement_across_relative_clause', 'pair_id': 6}

Speed and baselines (default config, one CPU core): ``generate_tokens``
makes about 2M tokens/s; on 1M tokens the unigram entropy is 4.39 nats/token,
the bigram conditional entropy 3.08 and the entropy rate (the floor) 2.71.

Seeding
-------
``GrammarConfig.seed`` fixes the grammar (which words, their ranks, the
selection preferences). Token streams are drawn from
``np.random.default_rng([config.seed, stream, seed])`` with a different
``stream`` constant for token streams and for minimal pairs, so different
``seed`` values give independent streams. :func:`split_seeds` maps one run seed
to a (train, validation) pair: train seeds are even, validation seeds odd, so
no train stream of any run shares its RNG stream with any validation stream.
(Short, frequent sentences do recur across streams; that is the distribution,
not leakage.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EOS",
    "UNK",
    "EOS_ID",
    "UNK_ID",
    "PHENOMENA",
    "MAX_NOUNS",
    "MAX_VERBS",
    "MAX_ADJS",
    "GrammarConfig",
    "GrammarCorpus",
    "split_seeds",
    "unigram_entropy",
    "bigram_entropy",
]

EOS = "<eos>"
UNK = "<unk>"
EOS_ID = 0
UNK_ID = 1
DOT = "."

#: Minimal-pair phenomena, in the order :meth:`GrammarCorpus.minimal_pairs` cycles through them.
PHENOMENA: tuple[str, ...] = (
    "subject_verb_agreement",
    "agreement_across_pp",
    "agreement_across_relative_clause",
    "determiner_noun_agreement",
)

# RNG stream ids: the first entry after config.seed in every SeedSequence.
_STREAM_GRAMMAR = 0
_STREAM_TOKENS = 1
_STREAM_PAIRS = 2

# Fixed (not configurable) parts of the grammar.
_P_WHO = 0.5  # P('who' | animate head); inanimate heads always take 'that'
_P_OBJ_TRANSITIVE = 0.9
_P_OBJ_INTRANSITIVE = 0.1
_SUBJECT_CLASS_FRACTION = 0.5  # each verb prefers subjects from this fraction of noun classes
_N_OBJECT_CLASSES = 2  # each verb prefers objects from this many noun classes

# Determiners: (word, number) with number 'sg', 'pl' or None (both), and P(det | number).
_DETS: tuple[tuple[str, str | None], ...] = (
    ("the", None),
    ("a", "sg"),
    ("this", "sg"),
    ("every", "sg"),
    ("some", "pl"),
    ("these", "pl"),
    ("many", "pl"),
)
_DET_P_SG = {"the": 0.45, "a": 0.35, "this": 0.12, "every": 0.08}
_DET_P_PL = {"the": 0.45, "some": 0.25, "these": 0.15, "many": 0.15}
#: Number flip used for determiner minimal pairs.
_DET_FLIP = {"a": "some", "this": "these", "every": "many", "some": "a", "these": "this", "many": "every"}
_COMPS = ("that", "who")
_PREPS = ("of", "near", "with", "behind", "under", "beside", "above", "from", "for", "without")

# ---------------------------------------------------------------------------------------------
# Word lists. No noun or adjective starts with a vowel (so 'a' never needs to be 'an'), and no
# word form belongs to two categories (checked at import).

_NOUN_CLASSES: dict[str, str] = {
    "person": "teacher doctor farmer baker pilot sailor singer painter writer student child king "
    "queen nurse lawyer judge soldier driver dancer boy girl man woman friend neighbor poet guard "
    "hunter clerk miner tailor banker priest scholar wizard knight merchant thief captain chef "
    "barber butcher gardener baby lady",
    "animal": "dog cat horse cow bird mouse wolf fox rabbit goat pig duck goose frog snake bear lion "
    "tiger monkey donkey parrot spider bee whale shark turtle pony camel rat crow hen puppy kitten "
    "dolphin penguin",
    "food": "bread cake cookie pie soup cheese carrot potato tomato banana cherry lemon melon peach "
    "pear grape sandwich pizza biscuit noodle pepper berry nut candy muffin pancake sausage cucumber",
    "artefact": "hammer knife spoon fork cup bottle box basket book pen pencil lamp candle clock key "
    "chair table bed mirror blanket bucket brush rope bag ladder needle coin ring shoe hat coat "
    "glove sword shield drum",
    "place": "house garden city village forest river mountain church school castle tower bridge "
    "market shop farm library museum palace cave beach hill lake road street park kitchen harbor bank",
    "vehicle": "car bus truck boat ship bicycle wagon cart plane rocket tractor sled canoe taxi van",
    "nature": "tree flower rose leaf bush stone rock cloud star moon seed branch mushroom feather shell",
    "document": "letter story song poem picture map message secret lesson question game puzzle "
    "riddle rumor gift prize ticket photo diary",
}
_ANIMATE_CLASSES = frozenset({"person", "animal"})
_IRREGULAR_PLURALS = {
    "child": "children", "man": "men", "woman": "women", "mouse": "mice", "goose": "geese",
    "thief": "thieves", "wolf": "wolves", "knife": "knives", "leaf": "leaves",
    "potato": "potatoes", "tomato": "tomatoes",
}  # fmt: skip

_VERBS = (
    "see like chase find carry watch hold want need love hate take bring follow visit help call "
    "know remember forget build break fix clean wash paint draw buy sell steal hide push pull throw "
    "catch kick touch move open close eat cook bake drop lift read write sing tell hear notice admire "
    "ignore praise blame greet protect attack feed sleep run walk jump laugh cry smile dance arrive "
    "wait swim fall shout whisper climb rest play travel return worry listen study work hunt wander "
    "search borrow lend share keep miss meet teach"
).split()

_ADJS = (
    "big small tall short red blue green yellow black white brown happy sad quiet loud fast slow "
    "young new clever brave lazy busy calm cold warm hot dark bright heavy soft hard rich poor pretty "
    "strange famous gentle hungry sleepy tiny huge wild shiny dirty round sharp sweet sour fresh "
    "funny proud shy kind nervous lucky wise silly noisy dusty rusty wooden golden silver purple pink "
    "narrow wide deep strong weak thin gray curious polite rude tired"
).split()


def _add_s(word: str) -> str:
    """English -s suffix (noun plural / verb 3rd person singular) for regular words."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


#: (singular, plural, class) for every noun the grammar can use, in a fixed order.
_NOUN_POOL: tuple[tuple[str, str, str], ...] = tuple(
    (w, _IRREGULAR_PLURALS.get(w, _add_s(w)), cls) for cls, words in _NOUN_CLASSES.items() for w in words.split()
)
#: (singular '3rd person -s' form, plural form) for every verb.
_VERB_POOL: tuple[tuple[str, str], ...] = tuple((_add_s(v), v) for v in _VERBS)
_CLASS_NAMES: tuple[str, ...] = tuple(_NOUN_CLASSES)

MAX_NOUNS = len(_NOUN_POOL)
MAX_VERBS = len(_VERB_POOL)
MAX_ADJS = len(_ADJS)


def _check_word_lists() -> None:
    forms = [EOS, UNK, DOT, *(d for d, _ in _DETS), *_COMPS, *_PREPS, *_ADJS]
    forms += [f for sg, pl, _ in _NOUN_POOL for f in (sg, pl)] + [f for pair in _VERB_POOL for f in pair]
    dup = sorted({f for f in forms if forms.count(f) > 1})
    if dup:  # pragma: no cover - guards edits to the word lists
        raise AssertionError(f"corpus word lists: forms used twice: {dup}")
    vowel = [w for w in (*_ADJS, *(sg for sg, _, _ in _NOUN_POOL)) if w[0] in "aeiou"]
    if vowel:  # pragma: no cover
        raise AssertionError(f"corpus word lists: vowel-initial nouns/adjectives: {vowel}")


_check_word_lists()


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrammarConfig:
    """Parameters of the grammar (see the module docstring). The defaults give 482 word types.

    ``seed`` fixes which words are used, their Zipf ranks and the selection
    preferences; the other fields are the rule probabilities. ``n_nouns``,
    ``n_verbs`` and ``n_adjs`` count lemmas (each noun and verb has two forms);
    at most ``MAX_NOUNS`` (220), ``MAX_VERBS`` (92) and ``MAX_ADJS`` (77).
    """

    seed: int = 0
    n_nouns: int = 150
    n_verbs: int = 60
    n_adjs: int = 40
    zipf_exponent: float = 1.1
    max_depth: int = 2
    p_pp: float = 0.2
    p_rel: float = 0.15
    p_object_relative: float = 0.4
    p_adj: float = 0.3
    max_adjs: int = 3
    p_plural: float = 0.5
    selection_strength: float = 0.9
    transitive_fraction: float = 0.6
    doc_min_sentences: int = 1
    doc_max_sentences: int = 5

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"GrammarConfig: {msg}")

        ints = ("seed", "n_nouns", "n_verbs", "n_adjs", "max_depth", "max_adjs",
                "doc_min_sentences", "doc_max_sentences")  # fmt: skip
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                fail(f"{name} must be an int, got {v!r}")
        for name in ("zipf_exponent", "p_pp", "p_rel", "p_object_relative", "p_adj", "p_plural",
                     "selection_strength", "transitive_fraction"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                fail(f"{name} must be a finite number, got {v!r}")
        if self.seed < 0:
            fail(f"seed must be >= 0, got {self.seed}")
        for name, lo, hi in (("n_nouns", 2, MAX_NOUNS), ("n_verbs", 2, MAX_VERBS), ("n_adjs", 1, MAX_ADJS)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                fail(f"{name} must be in [{lo}, {hi}] (size of the built-in word list), got {v}")
        if self.zipf_exponent < 0:
            fail(f"zipf_exponent must be >= 0 (0 = uniform), got {self.zipf_exponent}")
        if not 0 <= self.max_depth <= 8:
            fail(f"max_depth must be in [0, 8], got {self.max_depth}")
        if not 0 <= self.max_adjs <= 8:
            fail(f"max_adjs must be in [0, 8], got {self.max_adjs}")
        for name in ("p_pp", "p_rel", "p_object_relative", "selection_strength", "transitive_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                fail(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.p_adj < 1:
            fail(f"p_adj must be in [0, 1), got {self.p_adj}")
        if not 0 < self.p_plural < 1:
            fail(f"p_plural must be in (0, 1) so both numbers occur, got {self.p_plural}")
        if self.p_pp + self.p_rel > 1:
            fail(f"p_pp + p_rel must be <= 1, got {self.p_pp} + {self.p_rel}")
        if not 1 <= self.doc_min_sentences <= self.doc_max_sentences:
            fail(
                "need 1 <= doc_min_sentences <= doc_max_sentences, got "
                f"{self.doc_min_sentences} and {self.doc_max_sentences}"
            )


def split_seeds(seed: int) -> tuple[int, int]:
    """(train_seed, val_seed) for :meth:`GrammarCorpus.generate_tokens`: ``(2*seed, 2*seed + 1)``.

    Token streams are drawn from ``default_rng([config.seed, stream, seed])``;
    train seeds are even and validation seeds odd, so the training stream of
    any run and the validation stream of any run never share a SeedSequence.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split_seeds: seed must be an int >= 0, got {seed!r}")
    return 2 * int(seed), 2 * int(seed) + 1


def unigram_entropy(tokens: Iterable[int] | np.ndarray) -> float:
    """Plug-in entropy (nats per token) of the token frequencies: the loss of the best unigram model."""
    t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens)).ravel()
    if t.size == 0:
        raise ValueError("unigram_entropy: no tokens")
    if t.min() < 0:
        raise ValueError("unigram_entropy: token ids must be >= 0")
    counts = np.bincount(t.astype(np.int64))
    p = counts[counts > 0] / t.size
    return float(-(p * np.log(p)).sum())


def bigram_entropy(tokens: Iterable[int] | np.ndarray) -> float:
    """Plug-in conditional entropy H(x_t | x_{t-1}) in nats: the loss of the best bigram model.

    Biased low when there are few tokens per distinct bigram; fine for ~1M
    tokens of this corpus.
    """
    t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens)).ravel().astype(np.int64)
    if t.size < 2:
        raise ValueError("bigram_entropy: need at least 2 tokens")
    if t.min() < 0:
        raise ValueError("bigram_entropy: token ids must be >= 0")
    prev, nxt = t[:-1], t[1:]
    _, pair_counts = np.unique(prev * (int(t.max()) + 1) + nxt, return_counts=True)
    prev_counts = np.bincount(prev)
    prev_counts = prev_counts[prev_counts > 0]
    n = prev.size

    def h(c: np.ndarray) -> float:
        p = c / n
        return float(-(p * np.log(p)).sum())

    return h(pair_counts) - h(prev_counts)


def _zipf(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def _mix(base: np.ndarray, preferred: np.ndarray, strength: float) -> np.ndarray:
    """``strength`` of the mass on ``base`` restricted to ``preferred`` (a mask), the rest on ``base``."""
    restricted = np.where(preferred, base, 0.0)
    if restricted.sum() <= 0:
        return base.copy()
    return strength * restricted / restricted.sum() + (1 - strength) * base


class _Dist:
    """A categorical distribution over ``values`` (ints) with cumulative and log probabilities."""

    __slots__ = ("values", "cdf", "logp")

    def __init__(self, values: np.ndarray, p: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.int64)
        self.cdf = np.cumsum(p / p.sum())
        self.cdf[-1] = 1.0
        with np.errstate(divide="ignore"):
            self.logp = np.log(p / p.sum())


def _uniform_stream(rng: np.random.Generator, block: int) -> Iterator[float]:
    while True:
        yield from rng.random(block).tolist()


def _categorical_stream(rng: np.random.Generator, d: _Dist, block: int) -> Iterator[int]:
    while True:
        yield from d.values[np.searchsorted(d.cdf, rng.random(block), side="right")].tolist()


# Token categories (``GrammarCorpus._cat``).
_C_SPECIAL, _C_PUNCT, _C_DET, _C_COMP, _C_PREP, _C_ADJ, _C_NOUN, _C_VERB = range(8)
_CAT_NAMES = ("special", "punct", "det", "comp", "prep", "adj", "noun", "verb")


class GrammarCorpus:
    """The grammar of a :class:`GrammarConfig`: vocabulary, sampler, scorer and minimal pairs.

    ``vocab[i]`` is the word of token id ``i``: ``<eos>`` (0), ``<unk>`` (1),
    ``.``, the determiners, complementisers, prepositions, adjectives, then each
    noun's singular and plural and each verb's singular and plural form
    (adjectives, nouns and verbs in Zipf-rank order, most frequent first).
    """

    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    def __init__(self, config: GrammarConfig | None = None) -> None:
        cfg = GrammarConfig() if config is None else config
        if not isinstance(cfg, GrammarConfig):
            raise TypeError(f"GrammarCorpus: config must be a GrammarConfig, got {type(cfg).__name__}")
        self.config = cfg
        g = np.random.default_rng([cfg.seed, _STREAM_GRAMMAR])

        nouns = [_NOUN_POOL[i] for i in g.permutation(MAX_NOUNS)[: cfg.n_nouns]]
        verbs = [_VERB_POOL[i] for i in g.permutation(MAX_VERBS)[: cfg.n_verbs]]
        adjs = [_ADJS[i] for i in g.permutation(MAX_ADJS)[: cfg.n_adjs]]
        preps = [_PREPS[i] for i in g.permutation(len(_PREPS))]

        vocab = [EOS, UNK, DOT]
        cat, num, idx = [_C_SPECIAL, _C_SPECIAL, _C_PUNCT], [-1, -1, -1], [-1, -1, -1]

        def add(word: str, c: int, n: int, i: int) -> int:
            vocab.append(word)
            cat.append(c)
            num.append(n)
            idx.append(i)
            return len(vocab) - 1

        det_ids = {d: add(d, _C_DET, {None: -1, "sg": 0, "pl": 1}[n], i) for i, (d, n) in enumerate(_DETS)}
        comp_ids = {c: add(c, _C_COMP, -1, i) for i, c in enumerate(_COMPS)}
        prep_ids = [add(p, _C_PREP, -1, r) for r, p in enumerate(preps)]
        adj_ids = [add(a, _C_ADJ, -1, r) for r, a in enumerate(adjs)]
        noun_sg, noun_pl = [], []
        for r, (sg, pl, _) in enumerate(nouns):
            noun_sg.append(add(sg, _C_NOUN, 0, r))
            noun_pl.append(add(pl, _C_NOUN, 1, r))
        verb_sg, verb_pl = [], []
        for r, (sg, pl) in enumerate(verbs):
            verb_sg.append(add(sg, _C_VERB, 0, r))
            verb_pl.append(add(pl, _C_VERB, 1, r))

        self.vocab: list[str] = vocab
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(vocab)}
        self._cat, self._num, self._idx = cat, num, idx
        nums = {0: "sg", 1: "pl", -1: None}
        #: ``word -> (category, number)``: category one of ``special punct det comp prep adj noun
        #: verb``; number ``'sg'``, ``'pl'`` or ``None`` (``the`` and words without number).
        self.lexicon: dict[str, tuple[str, str | None]] = {
            w: (_CAT_NAMES[cat[i]], nums[num[i]]) for i, w in enumerate(vocab)
        }
        self._dot_id = self.word_to_id[DOT]
        self._that_id, self._who_id = comp_ids["that"], comp_ids["who"]
        self._noun_sg, self._noun_pl = noun_sg, noun_pl
        self._verb_sg, self._verb_pl = verb_sg, verb_pl
        #: (singular, plural) of each noun / verb, most frequent first.
        self.noun_forms: list[tuple[str, str]] = [(sg, pl) for sg, pl, _ in nouns]
        self.verb_forms: list[tuple[str, str]] = list(verbs)
        self.adjectives: list[str] = adjs
        self.prepositions: list[str] = preps
        #: Semantic class name of each noun (same order as ``noun_forms``).
        self.noun_classes: list[str] = [c for _, _, c in nouns]
        self._noun_class = [_CLASS_NAMES.index(c) for c in self.noun_classes]
        self._animate = [c in _ANIMATE_CLASSES for c in self.noun_classes]
        self._flip = {verb_sg[v]: verb_pl[v] for v in range(len(verbs))}
        self._flip.update({verb_pl[v]: verb_sg[v] for v in range(len(verbs))})
        self._flip.update({det_ids[a]: det_ids[b] for a, b in _DET_FLIP.items()})

        # Lexical selection, drawn from the grammar seed.
        nv, nn, nc = len(verbs), len(nouns), len(_CLASS_NAMES)
        n_subj = max(1, round(_SUBJECT_CLASS_FRACTION * nc))
        self.verb_subject_classes: list[frozenset[str]] = []
        self.verb_object_classes: list[frozenset[str]] = []
        for _ in range(nv):
            self.verb_subject_classes.append(frozenset(_CLASS_NAMES[c] for c in g.choice(nc, n_subj, replace=False)))
            self.verb_object_classes.append(
                frozenset(_CLASS_NAMES[c] for c in g.choice(nc, _N_OBJECT_CLASSES, replace=False))
            )
        transitive = np.zeros(nv, dtype=bool)
        transitive[g.permutation(nv)[: round(cfg.transitive_fraction * nv)]] = True
        self.verb_transitive: list[bool] = transitive.tolist()
        self._p_obj = [_P_OBJ_TRANSITIVE if t else _P_OBJ_INTRANSITIVE for t in self.verb_transitive]

        # Distributions.
        s = cfg.selection_strength
        noun_z, verb_z = _zipf(nn, cfg.zipf_exponent), _zipf(nv, cfg.zipf_exponent)
        noun_cls = np.array(self._noun_class)
        self._d_noun = _Dist(np.arange(nn), noun_z)
        self._d_adj = _Dist(np.array(adj_ids), _zipf(len(adjs), cfg.zipf_exponent))
        self._d_prep = _Dist(np.array(prep_ids), _zipf(len(preps), cfg.zipf_exponent))
        self._d_det_sg = _Dist(np.array([det_ids[d] for d in _DET_P_SG]), np.array(list(_DET_P_SG.values())))
        self._d_det_pl = _Dist(np.array([det_ids[d] for d in _DET_P_PL]), np.array(list(_DET_P_PL.values())))

        # Number-marked determiners only (the determiner minimal pairs need one).
        def marked(table: dict[str, float]) -> _Dist:
            dets = [d for d in table if d != "the"]
            return _Dist(np.array([det_ids[d] for d in dets]), np.array([table[d] for d in dets]))

        self._d_det_sg_marked, self._d_det_pl_marked = marked(_DET_P_SG), marked(_DET_P_PL)
        self._d_verb_by_class = []
        self._d_tverb_by_class = []
        for c in range(nc):
            likes = np.array([_CLASS_NAMES[c] in sc for sc in self.verb_subject_classes])
            self._d_verb_by_class.append(_Dist(np.arange(nv), _mix(verb_z, likes, s)))
            tv = _mix(verb_z, likes, s) * transitive if transitive.any() else _mix(verb_z, likes, s)
            self._d_tverb_by_class.append(_Dist(np.arange(nv), tv))
        self._d_obj_by_verb = []
        for v in range(nv):
            pref = np.isin(noun_cls, [_CLASS_NAMES.index(c) for c in self.verb_object_classes[v]])
            self._d_obj_by_verb.append(_Dist(np.arange(nn), _mix(noun_z, pref, s)))
        self._det_logp = {0: self._det_logp_table(self._d_det_sg), 1: self._det_logp_table(self._d_det_pl)}

    @staticmethod
    def _det_logp_table(d: _Dist) -> dict[int, float]:
        return {int(i): float(lp) for i, lp in zip(d.values, d.logp)}

    # ---- vocabulary ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``len(vocab)``); 482 for the default config."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of a whitespace-separated string; unknown words map to ``<unk>`` (id 1)."""
        get = self.word_to_id.get
        return [get(w, UNK_ID) for w in text.split()]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Words of ``ids`` joined by single spaces (``<eos>`` is written out)."""
        vocab, n = self.vocab, len(self.vocab)
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"decode: ids out of range [0, {n}): {bad[:5]}")
        return " ".join(vocab[i] for i in ids)

    # ---- sampling --------------------------------------------------------------------------

    def sample_sentence(self, rng: np.random.Generator) -> list[str]:
        """One sentence (words, ending with ``.``) drawn with ``rng``.

        Not the fast path: use :meth:`generate_tokens` for corpora.
        """
        out: list[int] = []
        _Sampler(self, rng, block=16).sentence(out)
        return [self.vocab[i] for i in out]

    def generate_tokens(self, n_tokens: int, *, seed: int) -> np.ndarray:
        """``n_tokens`` token ids (uint16): documents of sentences, each document followed by ``<eos>``.

        Deterministic in ``(config, seed)``, and a prefix of the same infinite
        stream for every ``n_tokens`` (the last document is cut off at
        ``n_tokens``). Pure Python over pre-drawn random blocks: about
        2M tokens/s on one core (default config).
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
            raise ValueError(f"generate_tokens: n_tokens must be an int >= 0, got {n_tokens!r}")
        _check_seed("generate_tokens", seed)
        n_tokens = int(n_tokens)
        rng = np.random.default_rng([self.config.seed, _STREAM_TOKENS, int(seed)])
        s = _Sampler(self, rng, block=4096)
        out: list[int] = []
        sentence, n_sentences = s.sentence, s.n_sentences
        while len(out) < n_tokens:
            for _ in range(n_sentences()):
                sentence(out)
            out.append(EOS_ID)
        return np.array(out[:n_tokens], dtype=np.uint16)

    # ---- scoring ---------------------------------------------------------------------------

    def sentence_logprob(self, sentence: str | Sequence[str] | Sequence[int]) -> float:
        """Exact natural-log probability of one sentence (ending with ``.``) under the grammar.

        ``sentence`` is a string, a list of words or a list of token ids.
        ``-inf`` for anything the grammar cannot produce (agreement errors,
        unknown words, a missing ``.``, too deep nesting ...). The grammar is
        unambiguous, so this is one derivation's probability.
        """
        if isinstance(sentence, str):
            ids = self.encode(sentence)
        else:
            seq: list[Any] = list(sentence)  # words or token ids
            ids = [self.word_to_id.get(w, UNK_ID) for w in seq] if seq and isinstance(seq[0], str) else seq
            bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
            if bad:
                raise ValueError(f"sentence_logprob: ids out of range [0, {self.vocab_size}): {bad[:5]}")
            ids = [int(i) for i in ids]
        try:
            return _Scorer(self, ids).sentence()
        except _Reject:
            return -math.inf

    def entropy_rate(self, n_documents: int = 2000, *, seed: int = 0) -> float:
        """Monte-Carlo estimate of the corpus entropy rate (nats per token, ``<eos>`` included).

        This is the cross-entropy of the true generating process on the token
        stream, i.e. the lowest loss a model can reach. It is estimated from
        ``n_documents`` documents of the ``seed`` stream as
        ``sum(-log p(doc)) / sum(len(doc))``.
        """
        if n_documents < 1:
            raise ValueError(f"entropy_rate: n_documents must be >= 1, got {n_documents}")
        _check_seed("entropy_rate", seed)
        rng = np.random.default_rng([self.config.seed, _STREAM_TOKENS, int(seed)])
        s = _Sampler(self, rng, block=4096)
        cfg = self.config
        log_k = math.log(cfg.doc_max_sentences - cfg.doc_min_sentences + 1)
        nll, n_tok = 0.0, 0
        for _ in range(n_documents):
            nll += log_k
            for _ in range(s.n_sentences()):
                out: list[int] = []
                s.sentence(out)
                nll -= _Scorer(self, out).sentence()
                n_tok += len(out)
            n_tok += 1  # <eos>
        return nll / n_tok

    # ---- minimal pairs ---------------------------------------------------------------------

    def minimal_pairs(self, n: int, *, seed: int, phenomena: Sequence[str] = PHENOMENA) -> list[dict]:
        """``n`` BLiMP-style records ``{sentence_good, sentence_bad, phenomenon, pair_id}``.

        Pair ``i`` tests ``phenomena[i % len(phenomena)]``; ``pair_id`` is ``i``.
        ``sentence_good`` is drawn from the grammar with the structure the
        phenomenon needs; ``sentence_bad`` is the same sentence with one word
        changed to the other number, which breaks exactly one agreement:

        * ``subject_verb_agreement``: subject without modifier; main verb flipped.
        * ``agreement_across_pp``: subject ``Det Adj* Noun Prep Det Adj* Noun``
          whose PP noun has the other number (attractor); main verb flipped.
        * ``agreement_across_relative_clause``: the subject carries a relative
          clause whose noun has the other number, half of them object-gap
          ("the dog that the cats chase runs"), half subject-gap ("the dog that
          chases the cats runs"); main verb flipped.
        * ``determiner_noun_agreement``: the subject's determiner is
          number-marked (not ``the``) and is flipped (``this``↔``these``,
          ``a``↔``some``, ``every``↔``many``).

        Deterministic in ``(config, seed, phenomena)``. Raises ``ValueError``
        for an unknown phenomenon or one the config makes impossible (e.g.
        ``agreement_across_pp`` with ``p_pp == 0`` or ``max_depth == 0``).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"minimal_pairs: n must be an int >= 0, got {n!r}")
        _check_seed("minimal_pairs", seed)
        phenomena = tuple(phenomena)
        if not phenomena:
            raise ValueError("minimal_pairs: phenomena must not be empty")
        cfg = self.config
        for ph in phenomena:
            if ph not in PHENOMENA:
                raise ValueError(f"minimal_pairs: unknown phenomenon {ph!r}; known: {PHENOMENA}")
            why = None
            if ph == "subject_verb_agreement" and cfg.max_depth > 0 and cfg.p_pp + cfg.p_rel >= 1:
                why = "a subject without modifier needs p_pp + p_rel < 1"
            elif ph == "agreement_across_pp" and (cfg.p_pp == 0 or cfg.max_depth == 0):
                why = "needs p_pp > 0 and max_depth >= 1"
            elif ph == "agreement_across_relative_clause" and (cfg.p_rel == 0 or cfg.max_depth == 0):
                why = "needs p_rel > 0 and max_depth >= 1"
            if why:
                raise ValueError(f"minimal_pairs: {ph} is impossible under this config: {why}")
        rng = np.random.default_rng([cfg.seed, _STREAM_PAIRS, int(seed)])
        s = _Sampler(self, rng, block=256)
        records = []
        for i in range(int(n)):
            ph = phenomena[i % len(phenomena)]
            good, pos = s.pair(ph)
            bad = list(good)
            bad[pos] = self._flip[bad[pos]]
            records.append(
                {"sentence_good": self.decode(good), "sentence_bad": self.decode(bad), "phenomenon": ph, "pair_id": i}
            )
        return records

    def __repr__(self) -> str:
        return f"GrammarCorpus(vocab_size={self.vocab_size}, config={self.config})"


def _check_seed(where: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{where}: seed must be an int >= 0, got {seed!r}")


class _Sampler:
    """Draws sentences as token ids, from blocks of random numbers pre-drawn from one generator.

    Every draw comes from a lazily refilled per-distribution buffer, so the
    output is a deterministic function of the generator's state (and
    ``block``), independent of how many tokens are requested.
    """

    def __init__(self, c: GrammarCorpus, rng: np.random.Generator, block: int) -> None:
        cfg = c.config

        def mk(d: _Dist) -> Callable[[], int]:
            return _categorical_stream(rng, d, block).__next__

        self.u: Callable[[], float] = _uniform_stream(rng, block).__next__
        self.noun = mk(c._d_noun)
        self.adj = mk(c._d_adj)
        self.prep = mk(c._d_prep)
        self.det = (mk(c._d_det_sg), mk(c._d_det_pl))
        self.det_marked = (mk(c._d_det_sg_marked), mk(c._d_det_pl_marked))
        self.verb_by_class = [mk(d) for d in c._d_verb_by_class]
        self.tverb_by_class = [mk(d) for d in c._d_tverb_by_class]
        self.obj_by_verb = [mk(d) for d in c._d_obj_by_verb]
        self.noun_form = (c._noun_sg, c._noun_pl)
        self.verb_form = (c._verb_sg, c._verb_pl)
        self.ncls, self.animate, self.p_obj = c._noun_class, c._animate, c._p_obj
        self.that_id, self.who_id, self.dot_id = c._that_id, c._who_id, c._dot_id
        self.p_plural, self.p_adj, self.max_adjs = cfg.p_plural, cfg.p_adj, cfg.max_adjs
        self.p_pp, self.p_mod, self.max_depth = cfg.p_pp, cfg.p_pp + cfg.p_rel, cfg.max_depth
        self.p_objrel = cfg.p_object_relative
        self.doc_min, self.doc_span = cfg.doc_min_sentences, cfg.doc_max_sentences - cfg.doc_min_sentences + 1

    def n_sentences(self) -> int:
        return self.doc_min + int(self.u() * self.doc_span)

    def sentence(self, out: list[int]) -> None:
        n, pl = self.np_(out, 0, self.noun)
        self.vp(out, n, pl, 0)
        out.append(self.dot_id)

    def head(self, out: list[int], draw_noun: Callable[[], int], pl: int, det: Callable[[], int] | None = None) -> int:
        """Det Adj* Noun with number ``pl`` (0/1); returns the noun's rank."""
        out.append((det or self.det[pl])())
        u, k, p_adj = self.u, 0, self.p_adj
        while k < self.max_adjs and u() < p_adj:
            out.append(self.adj())
            k += 1
        n = draw_noun()
        out.append(self.noun_form[pl][n])
        return n

    def np_(
        self,
        out: list[int],
        depth: int,
        draw_noun: Callable[[], int],
        pl: int | None = None,
        det: Callable[[], int] | None = None,
    ) -> tuple[int, int]:
        if pl is None:
            pl = int(self.u() < self.p_plural)
        n = self.head(out, draw_noun, pl, det)
        if depth < self.max_depth:
            r = self.u()
            if r < self.p_pp:
                out.append(self.prep())
                self.np_(out, depth + 1, self.noun)
            elif r < self.p_mod:
                self.rc(out, n, pl, depth + 1)
        return n, pl

    def rc(self, out: list[int], head: int, pl: int, depth: int) -> None:
        u = self.u
        out.append(self.who_id if self.animate[head] and u() < _P_WHO else self.that_id)
        if u() < self.p_objrel:  # object gap: Comp NP Verb, the verb agrees with the clause's subject
            s, spl = self.np_(out, depth, self.noun)
            out.append(self.verb_form[spl][self.tverb_by_class[self.ncls[s]]()])
        else:  # subject gap: Comp VP, the verb agrees with the head noun
            self.vp(out, head, pl, depth)

    def vp(self, out: list[int], subj: int, pl: int, depth: int) -> int:
        v = self.verb_by_class[self.ncls[subj]]()
        out.append(self.verb_form[pl][v])
        if self.u() < self.p_obj[v]:
            self.np_(out, depth, self.obj_by_verb[v])
        return v

    def pair(self, phenomenon: str) -> tuple[list[int], int]:
        """A grammatical sentence for ``phenomenon`` and the position of the word to flip."""
        out: list[int] = []
        u = self.u
        pl = int(u() < self.p_plural)
        if phenomenon == "determiner_noun_agreement":
            n, _ = self.np_(out, 0, self.noun, pl, det=self.det_marked[pl])
            pos = 0
        else:
            n = self.head(out, self.noun, pl)
            if phenomenon == "agreement_across_pp":
                out.append(self.prep())
                self.head(out, self.noun, 1 - pl)
            elif phenomenon == "agreement_across_relative_clause":
                out.append(self.who_id if self.animate[n] and u() < _P_WHO else self.that_id)
                obj_gap = u() < 0.5 if 0 < self.p_objrel < 1 else self.p_objrel == 1
                if obj_gap:
                    s = self.head(out, self.noun, 1 - pl)
                    out.append(self.verb_form[1 - pl][self.tverb_by_class[self.ncls[s]]()])
                else:
                    v = self.verb_by_class[self.ncls[n]]()
                    out.append(self.verb_form[pl][v])
                    self.head(out, self.obj_by_verb[v], 1 - pl)
            pos = len(out)
        self.vp(out, n, pl, 0)
        out.append(self.dot_id)
        return out, pos


class _Reject(Exception):
    """The sentence is not in the grammar."""


class _Scorer:
    """Recursive-descent parser computing a sentence's log probability (mirrors :class:`_Sampler`)."""

    def __init__(self, c: GrammarCorpus, ids: Sequence[int]) -> None:
        self.c, self.ids, self.i = c, list(ids), 0
        cfg = c.config
        self.cfg = cfg
        self.lp_num = (math.log(1 - cfg.p_plural), math.log(cfg.p_plural))
        self.lp_adj_go = math.log(cfg.p_adj) if cfg.p_adj > 0 else -math.inf
        self.lp_adj_stop = math.log(1 - cfg.p_adj)

    def peek(self) -> int:
        return self.c._cat[self.ids[self.i]] if self.i < len(self.ids) else -1

    def take(self, cat: int) -> int:
        if self.i >= len(self.ids) or self.c._cat[self.ids[self.i]] != cat:
            raise _Reject
        t = self.ids[self.i]
        self.i += 1
        return t

    @staticmethod
    def _log(p: float) -> float:
        if p <= 0:
            raise _Reject
        return math.log(p)

    def sentence(self) -> float:
        c = self.c
        lp, n, pl = self.np_(0, c._d_noun)
        lp += self.vp(n, pl, 0)
        if self.take(_C_PUNCT) != c._dot_id or self.i != len(self.ids):
            raise _Reject
        return lp

    def head(self, noun_dist: _Dist) -> tuple[float, int, int]:
        c = self.c
        det = self.take(_C_DET)
        adjs = []
        while self.peek() == _C_ADJ:
            adjs.append(self.take(_C_ADJ))
        noun = self.take(_C_NOUN)
        pl, n = c._num[noun], c._idx[noun]
        lp = self.lp_num[pl]
        if det not in c._det_logp[pl]:
            raise _Reject
        lp += c._det_logp[pl][det]
        k = len(adjs)
        if k > self.cfg.max_adjs:
            raise _Reject
        if k:
            lp += k * self.lp_adj_go + sum(float(c._d_adj.logp[c._idx[a]]) for a in adjs)
        if k < self.cfg.max_adjs:
            lp += self.lp_adj_stop
        lp += float(noun_dist.logp[n])
        if lp == -math.inf:
            raise _Reject
        return lp, n, pl

    def np_(self, depth: int, noun_dist: _Dist) -> tuple[float, int, int]:
        c, cfg = self.c, self.cfg
        lp, n, pl = self.head(noun_dist)
        nxt = self.peek()
        if depth >= cfg.max_depth:
            if nxt in (_C_PREP, _C_COMP):
                raise _Reject
            return lp, n, pl
        if nxt == _C_PREP:
            prep = self.take(_C_PREP)
            lp += self._log(cfg.p_pp) + float(c._d_prep.logp[c._idx[prep]])
            lp += self.np_(depth + 1, c._d_noun)[0]
        elif nxt == _C_COMP:
            lp += self._log(cfg.p_rel) + self.rc(n, pl, depth + 1)
        else:
            lp += self._log(1 - cfg.p_pp - cfg.p_rel)
        return lp, n, pl

    def rc(self, head: int, pl: int, depth: int) -> float:
        c, cfg = self.c, self.cfg
        comp = self.take(_C_COMP)
        if c._animate[head]:
            lp = math.log(_P_WHO) if comp == c._who_id else math.log(1 - _P_WHO)
        elif comp == c._who_id:
            raise _Reject
        else:
            lp = 0.0
        if self.peek() == _C_DET:  # object gap
            lp += self._log(cfg.p_object_relative)
            slp, s, spl = self.np_(depth, c._d_noun)
            verb = self.take(_C_VERB)
            if c._num[verb] != spl:
                raise _Reject
            vlp = float(c._d_tverb_by_class[c._noun_class[s]].logp[c._idx[verb]])
            if vlp == -math.inf:
                raise _Reject
            return lp + slp + vlp
        lp += self._log(1 - cfg.p_object_relative)
        return lp + self.vp(head, pl, depth)

    def vp(self, subj: int, pl: int, depth: int) -> float:
        c = self.c
        verb = self.take(_C_VERB)
        if c._num[verb] != pl:
            raise _Reject
        v = c._idx[verb]
        lp = float(c._d_verb_by_class[c._noun_class[subj]].logp[v])
        if self.peek() == _C_DET:
            lp += math.log(c._p_obj[v]) + self.np_(depth, c._d_obj_by_verb[v])[0]
        else:
            lp += math.log(1 - c._p_obj[v])
        return lp
