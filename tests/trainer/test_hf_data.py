"""Real text in: Hugging Face datasets and local files streamed through the run's tokenizer into token files.

Every dataset here is written by the test; nothing reaches a hub (``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

datasets = pytest.importorskip("datasets")

from dynamics.cli import main  # noqa: E402 - after the offline switches, which datasets reads on import
from trainer import hf_data  # noqa: E402
from trainer.checkpoint import read_manifest  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import DataError, prepare  # noqa: E402
from trainer.tokenizer import TextTokenizer, build_tokenizer  # noqa: E402

WORDS = "the a cat dog bird sees chases likes runs sleeps big small red quick and then".split()


def _sentences(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _micro(path, *extra: str) -> list[str]:
    """``--set`` items of a 4-step micro run on ``data.source=hf``."""
    settings = [
        "data.source=hf",
        f"data.path={path}",
        "seq_len=32",
        "batch_size=8",
        "steps=4",
        "eval_interval=2",
        "eval_batches=1",
        "checkpoint_interval=2",
        "warmup_steps=1",
        "capture.enabled=false",
        *extra,
    ]
    return [a for s in settings for a in ("--set", s)]


def _train(out, path, *extra: str) -> dict:
    assert main(["train", "--out", str(out), "--no-progress", *_micro(path, *extra)]) == 0
    assert [c["step"] for c in read_manifest(out)["checkpoints"]] == [0, 2, 4]
    return json.loads((out / "data" / "data.json").read_text())


def _stream(s) -> np.ndarray:
    return np.concatenate([np.asarray(s.train), np.asarray(s.val)])


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_saved_dataset_trains(tmp_path):
    datasets.Dataset.from_dict({"text": _sentences(300), "n": list(range(300))}).save_to_disk(str(tmp_path / "ds"))
    meta = _train(tmp_path / "run", tmp_path / "ds")
    assert meta["tokenizer"] == "bytes" and meta["column"] == "text" and meta["input"] == "text"
    assert meta["documents"] == {"train": 285, "val": 15}  # the last round(0.05 · 300) rows


@pytest.mark.slow
def test_a_saved_dataset_dict_trains_on_its_splits(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": _sentences(200, seed=1)}),
            "validation": datasets.Dataset.from_dict({"text": _sentences(30, seed=2)}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    meta = _train(tmp_path / "run", tmp_path / "dd", "data.split=train", "data.val_split=validation")
    assert meta["documents"] == {"train": 200, "val": 30}
    val_bytes = sum(len(s.encode()) + 1 for s in _sentences(30, seed=2))  # bytes + one end-of-document id each
    assert meta["n_tokens"]["val"] == val_bytes


@pytest.mark.slow
def test_local_jsonl_files_train_with_a_bpe_tokenizer(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    for k in range(3):
        rows = [json.dumps({"body": s, "id": i}) for i, s in enumerate(_sentences(100, seed=k))]
        (d / f"part-{k}.jsonl").write_text("\n".join(rows) + "\n")
    meta = _train(tmp_path / "run", d, "data.text_column=body", "data.tokenizer=bpe:300")
    assert meta["tokenizer"] == "bpe" and meta["documents"] == {"train": 285, "val": 15}
    tok = TextTokenizer.from_file(tmp_path / "run" / "data" / "tokenizer.json", kind="bpe")
    assert meta["vocab_size"] == tok.vocab_size and meta["eos"] == tok.eos_id
    first = tok.encode(_sentences(100, seed=0)[0]) + [tok.eos_id]
    assert list(np.fromfile(tmp_path / "run" / "data" / "train.bin", dtype=meta["dtype"])[: len(first)]) == first


# -- sources --------------------------------------------------------------------------------------


def test_input_ids_rows_are_used_as_they_are(tmp_path):
    rows = [[i % 50, (i + 1) % 50, 700 + i % 3] for i in range(40)]
    datasets.Dataset.from_dict({"input_ids": rows, "meta": ["x"] * 40}).save_to_disk(str(tmp_path / "ids"))
    s = prepare(DataConfig(source="hf", path=str(tmp_path / "ids"), val_fraction=0.1), tmp_path / "d")
    assert s.meta["tokenizer"] == "pretokenized" and s.meta["input"] == "input_ids" and "eos" not in s.meta
    assert s.vocab_size == 703 and s.meta["dtype"] == "uint16"  # max id + 1
    assert list(_stream(s)) == [t for r in rows for t in r]  # no end-of-document id between rows
    assert len(s.val) == 4 * 3 and s.meta["documents"] == {"train": 36, "val": 4}  # the last 10 % of the rows


def test_input_ids_beyond_a_given_tokenizer_are_refused(tmp_path):
    datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 400]]}).save_to_disk(str(tmp_path / "ids"))
    tok = build_tokenizer("bpe:300", lambda: _sentences(50), seed=0)
    (tmp_path / "tok.json").write_text(tok.to_json())
    cfg = DataConfig(source="hf", path=str(tmp_path / "ids"), tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=f"token id 400, but data.tokenizer has {tok.vocab_size} ids"):
        prepare(cfg, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_missing_column_lists_the_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": s, "lang": "en"}) for s in _sentences(5)))
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="hf", path=str(tmp_path / "a.jsonl")), tmp_path / "d")
    assert "no column 'text' (columns: body, lang); set data.text_column" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_missing_split_lists_the_splits(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train\)"):
        prepare(DataConfig(source="hf", path=str(tmp_path / "dd"), split="test"), tmp_path / "d")


@pytest.mark.parametrize("ext, write", [("txt", "lines"), ("csv", "csv"), ("parquet", "parquet")])
def test_local_files_of_each_format(tmp_path, ext, write):
    docs = _sentences(20)
    path = tmp_path / f"data.{ext}"
    if write == "lines":
        path.write_text("\n".join(docs) + "\n")
    elif write == "csv":
        datasets.Dataset.from_dict({"text": docs}).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    s = prepare(DataConfig(source="hf", path=str(path)), tmp_path / "d")
    expected = [t for d in docs for t in [*d.encode(), 256]]
    assert list(_stream(s)) == expected and s.meta["documents"] == {"train": 19, "val": 1}


def test_a_hub_name_offline_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source="hf", path="someone/no-such-dataset"), tmp_path / "d")
    assert "cannot load hub dataset data.path='someone/no-such-dataset' (offline" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "d").exists()
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *_micro("someone/no-such-dataset")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no-such-dataset" in err[0], err


def test_a_hub_subset_is_passed_to_the_hub_and_refused_for_local_paths(tmp_path, monkeypatch):
    """``data.subset`` (a hub dataset's configuration) reaches ``load_dataset``; a stand-in hub serves the rows."""
    docs = _sentences(10)
    asked = []

    def hub(path, name=None, *, split, streaming):
        asked.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", hub)
    s = prepare(DataConfig(source="hf", path="wikitext", subset="wikitext-2-raw-v1"), tmp_path / "d")
    assert asked and all(a == ("wikitext", "wikitext-2-raw-v1", "train", True) for a in asked)
    assert list(_stream(s)) == [t for d in docs for t in [*d.encode(), 256]]
    (tmp_path / "local.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    with pytest.raises(DataError, match="data.subset='x' names a hub dataset's configuration"):
        prepare(DataConfig(source="hf", path=str(tmp_path / "local.jsonl"), subset="x"), tmp_path / "e")
    assert any("data.subset applies to data.source=hf only" in p for p in DataConfig(subset="x").problems())


def test_hub_names_and_local_paths_are_told_apart(tmp_path):
    assert hf_data.hub_name("owner/name") and hf_data.hub_name("wikitext")
    assert not hf_data.hub_name("corpus/train.jsonl") and not hf_data.hub_name("./x") and not hf_data.hub_name("/x")
    (tmp_path / "here").mkdir()
    assert not hf_data.hub_name(str(tmp_path / "here"))
    assert any("does not exist" in p for p in DataConfig(source="hf", path="missing/train.jsonl").problems())
    assert DataConfig(source="hf", path="owner/name").problems() == []


def test_config_problems_are_one_line_each():
    probs = DataConfig(source="text", path=".", workers=0, text_column="body", format="xml").problems()
    assert any("data.workers must be an integer >= 1" in p for p in probs)
    assert any("data.format must be one of auto, json, parquet, text, csv" in p for p in probs)
    assert any("data.text_column applies to data.source=hf only" in p for p in probs)
    both = DataConfig(source="hf", path=".", val_split="validation", val_path=".").problems()
    assert both == ["data.val_split and data.val_path both give a validation set; set one"]
    assert all("\n" not in p for p in probs)


# -- the text source and the token files ----------------------------------------------------------


def _write_text_dir(d) -> list[bytes]:
    """Three files (one empty, one not UTF-8 in places), returned in the order the source reads them."""
    d.mkdir()
    files = {
        "a.txt": "\n".join(_sentences(300, seed=3)).encode(),
        "b.txt": b"",
        "sub/c.txt": "héllo wörld\n".encode() * 50 + b"\xff\xfe raw bytes\n",
    }
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return [files[k] for k in sorted(files, key=lambda k: str(d / k))]


def test_text_bytes_are_the_ids_they_always_were(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_data, "PIECE_BYTES", 97)  # many pieces per file: pieces must not change the ids
    raw = _write_text_dir(tmp_path / "txt")
    s = prepare(DataConfig(source="text", path=str(tmp_path / "txt"), val_fraction=0.1), tmp_path / "d")
    before = np.concatenate([np.append(np.frombuffer(b, np.uint8).astype(np.uint16), 256) for b in raw])
    assert np.array_equal(_stream(s), before)  # raw bytes + 256 after each file, as the old reader wrote
    assert len(s.train) == int(len(before) * 0.9) and s.vocab_size == 257  # the split: last 10 % of the tokens
    assert s.meta["tokenizer"] == "bytes" and s.meta["eos"] == 256 and "tokenizer_sha256" not in s.meta


def test_bpe_over_pieces_matches_whole_file_encoding(tmp_path, monkeypatch):
    (tmp_path / "txt").mkdir()
    rng = random.Random(5)  # newlines among other white space: where a piece may end matters
    seps = ["\n", "\n\n", " \n", "\n  ", "\n\t", "  \n\n "]
    text = "".join(s + rng.choice(seps) for s in _sentences(400, seed=5)) + "end."
    (tmp_path / "txt" / "a.txt").write_text(text)
    monkeypatch.setattr(hf_data, "PIECE_BYTES", 61)
    cfg = DataConfig(source="text", path=str(tmp_path / "txt"), tokenizer="bpe:320", val_fraction=0.2)
    s = prepare(cfg, tmp_path / "d")
    tok = TextTokenizer.from_file(tmp_path / "d" / "tokenizer.json", kind="bpe")
    assert list(_stream(s)) == tok.encode(text) + [tok.eos_id]
    assert build_tokenizer("bpe:320", lambda: [text], seed=0).to_json() == tok.to_json()  # learnt as from the file


def test_a_file_that_is_not_utf8_is_a_one_line_error_for_bpe(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"fine text\n" * 5 + b"\xff broken")
    with pytest.raises(DataError, match=r"a.txt' is not UTF-8 text \(byte 50\)"):
        prepare(DataConfig(source="text", path=str(tmp_path / "txt"), tokenizer="bpe:300"), tmp_path / "d")


@pytest.mark.parametrize("source", ["text", "hf", "hf-ids"])
def test_any_number_of_workers_writes_the_same_files(tmp_path, monkeypatch, source):
    monkeypatch.setattr(hf_data, "BATCH_CHARS", 500)  # many small tasks, so their order matters
    monkeypatch.setattr(hf_data, "ROW_BATCH", 7)
    if source == "text":
        (tmp_path / "src").mkdir()
        for k in range(4):
            (tmp_path / "src" / f"{k}.txt").write_text("\n".join(_sentences(60, seed=k)))
        extra = {"tokenizer": "bpe:300"}
    elif source == "hf":
        datasets.Dataset.from_dict({"text": _sentences(200, seed=7)}).save_to_disk(str(tmp_path / "src"))
        extra = {"tokenizer": "bpe:300"}
    else:
        ids = [list(range(i, i + 5)) for i in range(100)]
        datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "src"))
        extra = {}
    files = {}
    for workers in (1, 2):
        cfg = DataConfig(source=source.split("-")[0], path=str(tmp_path / "src"), workers=workers, **extra)
        prepare(cfg, tmp_path / f"w{workers}")
        files[workers] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"w{workers}").iterdir())}
    meta = [json.loads(files[w].pop("data.json")) for w in (1, 2)]
    assert files[1] == files[2] and len(files[1]["train.bin"]) > 900
    assert meta[0]["sha256"] == meta[1]["sha256"] and meta[0]["config"]["workers"] == 1


# -- the data directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["text", "hf"])
def test_a_refused_corpus_leaves_nothing_behind(tmp_path, text_corpus, source):
    if source == "hf":
        datasets.Dataset.from_dict({"text": _sentences(50)}).save_to_disk(str(tmp_path / "ds"))
    path = str(text_corpus if source == "text" else tmp_path / "ds")
    run = tmp_path / "run"
    run.mkdir()
    seen = []

    def refuse(vocab_size, n_train, n_val):
        seen.append((vocab_size, n_train, n_val))
        raise DataError("refused")

    with pytest.raises(DataError, match="refused"):
        prepare(DataConfig(source=source, path=path), run / "data", check=refuse)
    assert seen and seen[0][0] == 257 and seen[0][1] > seen[0][2] > 0
    assert list(run.iterdir()) == []


def test_leftovers_of_a_killed_prepare_are_removed(tmp_path, text_corpus):
    run = tmp_path / "run"
    (run / ".data.abc123.tmp").mkdir(parents=True)
    (run / ".data.abc123.tmp" / "train.bin").write_bytes(b"partial")
    (run / "data").mkdir()  # an old-style half-written directory: no data.json
    (run / "data" / "train.bin").write_bytes(b"partial")
    s = prepare(DataConfig(source="text", path=str(text_corpus)), run / "data")
    assert sorted(p.name for p in run.iterdir()) == ["data"] and len(s.train) > 1000


def test_an_older_data_json_and_another_worker_count_still_load(tmp_path, text_corpus):
    cfg = DataConfig(source="text", path=str(text_corpus))
    first = prepare(cfg, tmp_path / "d")
    meta_path = tmp_path / "d" / "data.json"
    meta = json.loads(meta_path.read_text())
    for key in ("tokenizer", "text_column", "split", "val_split", "format", "workers"):
        meta["config"].pop(key)  # as written before these settings existed
    meta_path.write_text(json.dumps(meta))
    again = prepare(DataConfig(source="text", path=str(text_corpus), workers=2), tmp_path / "d")
    assert np.array_equal(first.train, again.train)
    with pytest.raises(DataError, match="different data config"):
        prepare(DataConfig(source="text", path=str(text_corpus), tokenizer="bpe:300"), tmp_path / "d")


def test_too_few_rows_to_hold_one_out(tmp_path):
    datasets.Dataset.from_dict({"text": ["only one"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="has 1 row"):
        prepare(DataConfig(source="hf", path=str(tmp_path / "one")), tmp_path / "d")


def test_a_separate_validation_dataset(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in _sentences(30, seed=1)))
    datasets.Dataset.from_dict({"text": _sentences(4, seed=2)}).save_to_disk(str(tmp_path / "val"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val"))
    s = prepare(cfg, tmp_path / "d")
    assert s.meta["documents"] == {"train": 30, "val": 4}  # all of data.path trains
    assert list(np.asarray(s.val)) == [t for d in _sentences(4, seed=2) for t in [*d.encode(), 256]]
