"""Subword tokenizers (trainer.tokenizer): specs, bytes, deterministic byte-level BPE, tokenizer files, the
model vocabulary that follows the tokenizer, minimal-pair counts, and a bpe run that trains, evaluates and
exports a pair transformers loads with the trained model's logits."""

from __future__ import annotations

import json
import math
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamics.cli import main
from trainer.config import MODEL_PRESETS, build_config
from trainer.errors import CheckpointError, ConfigError, DataError
from trainer.evaluate import Tokenizer, score_minimal_pairs, tokenizer_for
from trainer.model import Decoder
from trainer.tokenizer import (
    BYTE_EOS,
    EOS_TOKEN,
    TextTokenizer,
    build_tokenizer,
    bytes_tokenizer_json,
    padded_vocab_size,
    parse_tokenizer_spec,
    run_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the a cat dog bird sees chases likes runs sleeps big small red quick and then naïve café".split()
#: characters from many scripts, none of them in the training text below: a byte-level BPE must still encode them
UNSEEN = "Ωμέγα 日本語の文章 한국어 עברית العربية 🙂🚀 \x00\x07 \t\n Ā ﬁ 𝔘𝔫𝔦"


def documents(n: int = 300, seed: int = 0, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + " ." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory of three small UTF-8 text files (documents of random words), written here."""
    d = tmp_path_factory.mktemp("tok_text")
    for i in range(3):
        (d / f"part{i}.txt").write_text("\n".join(documents(700, seed=i)), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def bpe300() -> TextTokenizer:
    return build_tokenizer("bpe:300", lambda: iter(documents()), seed=0)


# --------------------------------------------------------------------------- specs


def test_spec_parsing(tmp_path):
    assert parse_tokenizer_spec("bytes") == ("bytes", None, None)
    assert parse_tokenizer_spec("bpe:8192") == ("bpe", 8192, None)
    f = tmp_path / "tokenizer.json"
    f.write_text(bytes_tokenizer_json())
    assert parse_tokenizer_spec(str(f)) == ("file", None, str(f))
    assert parse_tokenizer_spec(str(tmp_path)) == ("file", None, str(f))  # a directory holding tokenizer.json
    for bad, message in [
        ("", "must be 'bytes', 'bpe:N'"),
        ("bpe:lots", "must be an integer"),
        ("bpe", "must be an integer"),
        ("bpe:100", r"N must be in \[257,"),
        ("bpe:99999999", r"N must be in \[257,"),
        (str(tmp_path / "missing.json"), "neither 'bytes', 'bpe:N' nor an existing"),
        (str(tmp_path / "sub"), "neither"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            parse_tokenizer_spec(bad)
        assert "\n" not in str(e.value)


def test_config_validates_the_tokenizer(corpus):
    base = ["data.source=text", f"data.path={corpus}"]
    assert build_config(overrides=base).data.tokenizer == "bytes"
    assert build_config(overrides=[*base, "data.tokenizer=bpe:512"]).data.tokenizer == "bpe:512"
    with pytest.raises(ConfigError, match="data.tokenizer='bpe:12'"):
        build_config(overrides=[*base, "data.tokenizer=bpe:12"])
    with pytest.raises(ConfigError, match="applies to text sources only"):
        build_config(overrides=["data.tokenizer=bpe:512"])  # the grammar brings its own words


# --------------------------------------------------------------------------- bytes


def test_bytes_tokenizer_is_todays_byte_ids():
    tok = build_tokenizer("bytes", lambda: pytest.fail("bytes needs no training text"), seed=0)
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.unk_id, tok.to_json()) == ("bytes", 257, BYTE_EOS, None, None)
    text = "héllo " + UNSEEN
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode_batch([text, ""]) == [list(text.encode("utf-8")), []]
    assert tok.decode(tok.encode(text)) == text
    # the same ids from its tokenizers form (what an export writes), and the end-of-text token at 256
    as_json = TextTokenizer.from_json(bytes_tokenizer_json())
    assert as_json.encode(text) == list(text.encode("utf-8"))
    assert (as_json.vocab_size, as_json.eos_id, as_json.eos_token) == (257, BYTE_EOS, EOS_TOKEN)


# --------------------------------------------------------------------------- BPE


def test_bpe_layout_and_unicode_without_unknowns(bpe300):
    tok = bpe300
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.unk_id) == ("bpe", 300, 0, None)
    vocab = json.loads(tok.to_json())["model"]["vocab"]
    assert len(vocab) == 300 and sorted(vocab.values()) == list(range(300))
    for text in [UNSEEN, "the quick cat " + UNSEEN, " ", "\n\n"]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids) and tok.eos_id not in ids
        assert tok.decode(ids) == text  # lossless: every byte is representable
    assert len(tok.encode("the cat sees the dog")) < len(b"the cat sees the dog")  # merges were learned
    assert tok.encode(EOS_TOKEN) != [tok.eos_id]  # the special token's text inside a document is text
    assert tok.encode_batch(["the cat", UNSEEN]) == [tok.encode("the cat"), tok.encode(UNSEEN)]
    again = pickle.loads(pickle.dumps(tok))  # worker processes get the same tokenizer
    assert again.to_json() == tok.to_json() and again.encode(UNSEEN + EOS_TOKEN) == tok.encode(UNSEEN + EOS_TOKEN)


_TRAIN_IN_A_PROCESS = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from trainer.tokenizer import build_tokenizer
docs = json.loads(sys.stdin.read())
tok = build_tokenizer("bpe:320", lambda: iter(docs), seed=int(sys.argv[2]))
print(hashlib.sha256(tok.to_json().encode()).hexdigest())
"""


def test_bpe_training_is_deterministic(bpe300):
    import hashlib

    docs = documents(400, seed=3) + [UNSEEN]
    first = build_tokenizer("bpe:320", lambda: iter(docs), seed=0).to_json()
    assert build_tokenizer("bpe:320", lambda: iter(docs), seed=0).to_json() == first
    # other processes: another hash seed, threads on and off, another run seed; the same bytes
    digests = set()
    for hash_seed, parallel, seed in [("1", "true", 0), ("2", "false", 0), ("3", "true", 7)]:
        env = {"PYTHONHASHSEED": hash_seed, "TOKENIZERS_PARALLELISM": parallel, "RAYON_NUM_THREADS": "2"}
        out = subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_A_PROCESS, str(ROOT), str(seed)],
            input=json.dumps(docs),
            capture_output=True,
            text=True,
            check=True,
            env={**_base_env(), **env},
        )
        digests.add(out.stdout.strip())
    assert digests == {hashlib.sha256(first.encode()).hexdigest()}
    # and the tokenizer does depend on the text
    other = documents(400, seed=3, words=[w[::-1] for w in WORDS]) + [UNSEEN]
    assert build_tokenizer("bpe:320", lambda: iter(other), seed=0).to_json() != first


def sets(*items: str) -> list[str]:
    """``--set`` arguments for ``dynamics train`` (one item each)."""
    return [a for item in items for a in ("--set", item)]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "TOKENIZERS_PARALLELISM")}


def test_bpe_refuses_no_text_and_warns_on_a_small_vocabulary():
    with pytest.raises(DataError, match="no training text"):
        build_tokenizer("bpe:300", lambda: iter(()), seed=0)
    with pytest.warns(UserWarning, match="gave only"):
        tok = build_tokenizer("bpe:5000", lambda: iter(["ab ab ab"]), seed=0)
    assert 257 < tok.vocab_size < 5000


def test_a_missing_tokenizers_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install relora-dynamics\[text\]") as e:
        build_tokenizer("bpe:300", lambda: iter(documents()), seed=0)
    assert "\n" not in str(e.value)
    assert build_tokenizer("bytes", lambda: iter(()), seed=0).encode("ok") == [111, 107]  # bytes need no package


# --------------------------------------------------------------------------- tokenizer files


def _word_level(path: Path, *, eos: str | None = "</s>") -> Path:
    """A word-level tokenizer.json with an unknown token (and optionally an end-of-text token), written here."""
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sees": 3, "dog": 4}
    special = ["[UNK]"]
    if eos is not None:
        vocab[eos] = 5
        special.append(eos)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    backend.save(str(path))
    return path


def test_a_tokenizer_file_with_an_unknown_token(tmp_path):
    tok = build_tokenizer(str(_word_level(tmp_path / "tokenizer.json")), lambda: iter(()), seed=0)
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.unk_id) == ("file", 6, 5, 0)
    assert tok.encode("the cat sees a dog") == [1, 2, 3, 0, 4]
    with pytest.raises(DataError, match="no end-of-text token"):
        build_tokenizer(str(_word_level(tmp_path / "no_eos.json", eos=None)), lambda: iter(()), seed=0)
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match="broken.json.*not a tokenizers tokenizer.json") as e:
        build_tokenizer(str(tmp_path / "broken.json"), lambda: iter(()), seed=0)
    assert "\n" not in str(e.value)


def test_run_tokenizer_checks_the_stored_file(tmp_path, bpe300):
    (tmp_path / "tokenizer.json").write_text(bpe300.to_json())
    import hashlib

    meta = {"tokenizer": "bpe", "eos": 0, "tokenizer_sha256": hashlib.sha256(bpe300.to_json().encode()).hexdigest()}
    assert run_tokenizer(meta, tmp_path).encode(UNSEEN) == bpe300.encode(UNSEEN)  # type: ignore[union-attr]
    assert tokenizer_for(meta, tmp_path).encode("the cat") == bpe300.encode("the cat")
    assert run_tokenizer({"tokenizer": "grammar-words"}, tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(bpe300.to_json().replace('"the"', '"teh"', 1))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        run_tokenizer(meta, tmp_path)


def test_the_grammar_tokenizer_reports_unknown_words():
    tok = tokenizer_for({"tokenizer": "grammar-words", "vocab": ["<eos>", "<unk>", "cat", "sees"]})
    assert (tok.bos_id, tok.unk_id, tok.encode("cat sees dog")) == (0, 1, [2, 3, 1])


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_exported_tokenizer_files_load_in_transformers_and_encode_as_the_run(tmp_path, kind, bpe300):
    transformers = pytest.importorskip("transformers")
    from trainer.hf import hf_tokenizer_files

    tok = TextTokenizer.byte_level() if kind == "bytes" else bpe300
    for name, text in hf_tokenizer_files(tok, MODEL_PRESETS["micro"]).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["the cat sees the dog .", UNSEEN, f"a {EOS_TOKEN} b", ""]:
        assert auto(text)["input_ids"] == tok.encode(text), text
    assert (auto.eos_token, auto.eos_token_id, auto.bos_token_id) == (EOS_TOKEN, tok.eos_id, tok.eos_id)
    assert auto.decode(tok.encode(UNSEEN)) == UNSEEN


# --------------------------------------------------------------------------- vocabulary


def test_padded_vocab_size():
    assert [padded_vocab_size(n) for n in (1, 64, 65, 257, 300, 320, 321, 50257)] == [
        64,
        64,
        128,
        320,
        320,
        320,
        384,
        50304,
    ]


def test_a_tokenizer_larger_than_an_explicit_vocab_is_refused_before_anything_is_written(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--out",
            str(out),
            "--no-progress",
            *sets("data.source=text", f"data.path={corpus}", "data.tokenizer=bpe:300", "model.vocab_size=256"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "300 token ids but model.vocab_size=256" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_the_model_vocabulary_follows_the_tokenizer_unless_given(tmp_path, corpus):
    from trainer.train import Trainer

    overrides = ["data.source=text", f"data.path={corpus}", "seq_len=32", "batch_size=4", "eval_batches=1"]
    overrides += ["capture.enabled=false"]
    for name, given, extra, want in [
        ("follows", frozenset(), [], 320),  # bytes: 257 ids, padded to a multiple of 64
        ("explicit", frozenset({"model.vocab_size"}), ["model.vocab_size=512"], 512),
        ("warm", frozenset({"init_from"}), [f"init_from={tmp_path / 'follows'}@0"], 320),  # the source run's
    ]:
        trainer = Trainer(
            build_config(overrides=overrides + extra), tmp_path / name, progress=False, echo=lambda s: None, given=given
        )
        try:
            trainer.setup()
        finally:
            trainer.cleanup()
        assert trainer.cfg.model.vocab_size == want and trainer.model.embed.weight.shape[0] == want
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["config"]["model"]["vocab_size"] == want  # what a resume continues with
        assert (manifest["data"]["tokenizer"], manifest["data"]["eos"]) == ("bytes", BYTE_EOS)


# --------------------------------------------------------------------------- minimal pairs


def test_minimal_pairs_with_no_tokens_or_unknown_symbols_are_counted_not_scored():
    torch.manual_seed(0)
    model = Decoder(MODEL_PRESETS["micro"])
    vocab = {"a": 2, "b": 3, "c": 4}
    tok = Tokenizer("test", 0, lambda s: [vocab.get(w, 1) for w in s.split()], unk_id=1)
    pairs = [
        {"sentence_good": "a b", "sentence_bad": "b a", "phenomenon": "p"},
        {"sentence_good": "", "sentence_bad": "a", "phenomenon": "p"},  # no tokens
        {"sentence_good": "a zz", "sentence_bad": "a b", "phenomenon": "p"},  # an unknown word
        {"sentence_good": "   ", "sentence_bad": "qq", "phenomenon": "q"},  # no tokens (and unknown): empty
    ]
    scores = score_minimal_pairs(model, pairs, tok)
    assert scores.n_pairs == {"overall": 4, "p": 3, "q": 1}
    assert scores.n_empty == {"overall": 2, "p": 1, "q": 1}
    assert scores.n_unknown == {"overall": 1, "p": 1, "q": 0}
    assert scores.not_scored() == 3
    assert math.isnan(scores.accuracy["q"])  # nothing to score, not a failure
    alone = score_minimal_pairs(model, pairs[:1], tok).accuracy["p"]
    assert scores.accuracy["p"] == scores.accuracy["overall"] == alone  # the one scored pair decides


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_bpe_run_trains_evaluates_and_exports_a_pair_transformers_loads(tmp_path, corpus, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from trainer.checkpoint import load_model
    from trainer.evaluate import evaluate_run

    run, hf = tmp_path / "run", tmp_path / "hf"
    args = ["data.source=text", f"data.path={corpus}", "data.tokenizer=bpe:300", "seq_len=32", "batch_size=8"]
    steps = ["--steps", "6", *sets(*args, "eval_interval=3", "eval_batches=2", "checkpoint_interval=3")]
    assert main(["train", "--out", str(run), "--no-progress", *steps]) == 0
    meta = json.loads((run / "data" / "data.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos"]) == ("bpe", 300, 0)
    assert manifest["data"]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert manifest["config"]["model"]["vocab_size"] == 320
    tok = TextTokenizer.from_file(run / "data" / "tokenizer.json", kind="bpe")

    blimp = tmp_path / "pairs.jsonl"
    rows = [
        {"sentence_good": "the cat sees the dog .", "sentence_bad": "the cat the sees dog .", "UID": "order"},
        {"sentence_good": "", "sentence_bad": "the cat .", "UID": "order"},  # tokenizes to nothing: reported
        {"sentence_good": "a big naïve bird .", "sentence_bad": "a bird big naïve .", "UID": "adjective"},
    ]
    blimp.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    warnings: list[str] = []
    table = evaluate_run(run, blimp=[blimp], steps=[6], progress=False, warn=warnings.append)
    overall = table[(table.metric == "pair_acc") & (table.phenomenon == "overall")].iloc[0]
    assert (overall.n_pairs, overall.n_empty, overall.n_unknown) == (3, 1, 0)
    assert overall.value in (0.0, 0.5, 1.0)  # over the two scored pairs
    assert len(warnings) == 1 and "1 of 3 minimal pairs not scored (1 with a sentence of no tokens" in warnings[0]

    assert main(["export", str(run), str(hf)]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in hf.iterdir()
    }
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    sentence = "the quick cat sees a naïve bird 🙂 " + EOS_TOKEN
    ids = auto(sentence)["input_ids"]
    assert ids == tok.encode(sentence) and auto.eos_token_id == tok.eos_id == theirs.config.eos_token_id
    assert auto.decode(ids) == sentence
    ours = load_model(run, 6).eval()
    x = torch.tensor([[tok.eos_id, *ids]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-4, atol=1e-4)

    # a resume keeps the resolved vocabulary (stored in the manifest) and the run's tokenizer
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--steps", "7"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["model"]["vocab_size"] == 320 and manifest["checkpoints"][-1]["step"] == 7
