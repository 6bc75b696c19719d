"""Evaluation: sentence scoring, BLiMP loading, per-checkpoint tables, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from dynamics.cli import main
from trainer.config import MODEL_PRESETS, build_config
from trainer.evaluate import (
    EvaluationError,
    Tokenizer,
    evaluate_run,
    load_minimal_pairs,
    minimal_pair_accuracy,
    sentence_logprobs,
    tokenizer_for,
)
from trainer.model import Decoder
from trainer.train import train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(MODEL_PRESETS["micro"]).eval()


def test_sentence_logprob_is_the_sum_of_next_token_logprobs(model):
    s = [5, 9, 11, 3]
    got = sentence_logprobs(model, [s], bos_id=0)[0]
    ids = torch.tensor([[0] + s])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]), -1)
    expected = sum(float(logp[0, i, ids[0, i + 1]]) for i in range(len(s)))
    assert got == pytest.approx(expected, abs=1e-4)


def test_padding_does_not_change_scores(model):
    short, long = [5, 9], [7, 1, 2, 3, 4, 8, 9]
    alone = sentence_logprobs(model, [short], bos_id=0)[0]
    batched = sentence_logprobs(model, [long, short], bos_id=0)[1]
    assert alone == pytest.approx(batched, abs=1e-4)


def test_minimal_pair_accuracy_counts_per_phenomenon(model):
    vocab = {"x": 5, "y": 9}
    tok = Tokenizer("test", 0, lambda s: [vocab[w] for w in s.split()])
    lp = {w: sentence_logprobs(model, [[i]], bos_id=0)[0] for w, i in vocab.items()}
    better, worse = sorted(vocab, key=lambda w: -lp[w])
    pairs = [
        {"sentence_good": better, "sentence_bad": worse, "phenomenon": "a"},
        {"sentence_good": worse, "sentence_bad": better, "phenomenon": "b"},
    ]
    assert minimal_pair_accuracy(model, pairs, tok) == {"a": 1.0, "b": 0.0, "overall": 0.5}


def test_blimp_loader(tmp_path):
    f = tmp_path / "agr.jsonl"
    f.write_text(
        json.dumps({"sentence_good": "a b", "sentence_bad": "b a", "UID": "u1"})
        + "\n\n"
        + json.dumps({"sentence_good": "c", "sentence_bad": "d"})
        + "\n"
    )
    pairs = load_minimal_pairs(f)
    assert [p["phenomenon"] for p in pairs] == ["u1", "agr"]
    f.write_text('{"sentence_good": "a"}\n')
    with pytest.raises(EvaluationError, match="agr.jsonl:1"):
        load_minimal_pairs(f)
    f.write_text("{not json\n")
    with pytest.raises(EvaluationError, match="not valid JSON"):
        load_minimal_pairs(f)


def test_pretokenized_runs_have_no_text_tokenizer():
    with pytest.raises(EvaluationError, match="pretokenized"):
        tokenizer_for({"tokenizer": "pretokenized"})
    assert tokenizer_for({"tokenizer": "bytes"}).encode("hé") == [104, 195, 169]


def test_evaluate_run_table_and_cli(tmp_path, fast_overrides, capsys):
    overrides = [o for o in fast_overrides if not o.startswith("data.")] + [
        "steps=5",
        "data.train_tokens=50000",
        "data.val_tokens=5000",
    ]
    run = train(build_config(overrides=overrides), tmp_path / "g", progress=False)
    blimp = tmp_path / "b.jsonl"
    blimp.write_text(
        json.dumps({"sentence_good": "the cherry sees .", "sentence_bad": "the cherry see .", "UID": "sv"}) + "\n"
    )
    table = evaluate_run(run, blimp=[blimp], n_builtin_pairs=40, progress=False)
    assert set(table["step"]) == {0, 5}
    assert set(table["metric"]) == {"val_loss", "val_ppl", "pair_acc"}
    assert {"builtin", "b"} <= set(table["source"])
    first_loss = table[(table.step == 0) & (table.metric == "val_loss")]["value"].item()
    assert first_loss == pytest.approx(
        json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val_loss"], abs=1e-5
    )
    assert main(["evaluate", str(run), "--steps", "5", "--out", str(tmp_path / "e.csv")]) == 0
    assert "builtin:subject_verb_agreement" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--steps", "3"]) == 2
    assert "no checkpoint at step(s) [3]" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
