"""Shared fixtures: tiny configs and data that make a real training run take a second or two.

``trained_pair`` is the one pair of trained runs the analysis tests share (full
rank and ReLoRA, trained once per session); ``analysed_pair`` is its results
table. A test that damages files copies a run first.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-scale",
        type=int,
        default=None,
        metavar="N",
        help="size of the fault campaign in tests/reliability (default 1, or $RELIABILITY_N); "
        "N multiplies the number of cases of every category",
    )


WORDS = "the a cat dog bird sees chases likes runs sleeps big small red quick and then".split()


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A directory with a small plain-text file (~60 kB) of random word sequences."""
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(6000)]
    (d / "corpus.txt").write_text("\n".join(lines))
    return d


@pytest.fixture(scope="session")
def fast_overrides(text_corpus) -> list[str]:
    """``--set`` items for a micro run on the text fixture that trains in about a second (extend by copying:
    ``fast_overrides + [...]``; session-scoped, so module-scoped fixtures can use it too)."""
    return [
        "data.source=text",
        f"data.path={text_corpus}",
        "seq_len=32",
        "batch_size=8",
        "eval_interval=5",
        "eval_batches=2",
        "checkpoint_interval=5",
        "warmup_steps=2",
    ]


@pytest.fixture
def train_variants(tmp_path, fast_overrides):
    """``train_variants(extra, {name: overrides})`` trains a fast micro run per variant (each with ``extra`` too).

    Returns ``{name: {"loss": [...], "val_loss": [...], "weights": final dense weights}}``.
    """
    import json

    from safetensors.torch import load_file

    from trainer.checkpoint import read_manifest
    from trainer.config import build_config
    from trainer.train import train

    def run(extra: list[str], variants: dict[str, list[str]]) -> dict[str, dict]:
        out = {}
        for name, overrides in variants.items():
            run_dir = train(build_config(overrides=fast_overrides + extra + overrides), tmp_path / name, progress=False)
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = read_manifest(run_dir)["checkpoints"][-1]["step"]
            out[name] = {
                "loss": [r["loss"] for r in records if "loss" in r],
                "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
                "weights": load_file(str(run_dir / f"checkpoints/step_{last:06d}/model.safetensors")),
            }
        return out

    return run


#: The shared pair's settings: 8 steps of 8 × 32 tokens, checkpoints (and captures) at 0, 4, 8.
PAIR_BASE = [
    "steps=8",
    "checkpoint_interval=4",
    "eval_interval=4",
    "seq_len=32",
    "batch_size=8",
    "warmup_steps=1",
    "data.train_tokens=40000",
    "data.val_tokens=4000",
    "eval_batches=1",
]
#: The ReLoRA run of the pair: rank 4 on every projection, merges at steps 4 and 8.
PAIR_RELORA = ["method=relora", "relora.rank=4", "relora.alpha=8", "relora.merge_every=4", "relora.lr_restart_warmup=1"]


class TrainedPair(NamedTuple):
    """Run directories of the shared pair (iterates as ``(full, relora)``)."""

    full: Path
    relora: Path


@pytest.fixture(scope="session")
def pair_overrides() -> dict[str, list[str]]:
    """``--set`` items of the shared pair: ``base`` (both runs) and ``relora`` (added for the ReLoRA run).

    A run trained with ``base`` (plus ReLoRA settings) is comparable with the pair's full-rank run
    (same model, data, steps, batch and context), so the analysis pairs them.
    """
    return {"base": list(PAIR_BASE), "relora": list(PAIR_RELORA)}


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory) -> TrainedPair:
    """A micro full-rank run and a micro ReLoRA run (rank 4, all projections), trained once per session.

    8 steps each on the built-in grammar corpus; checkpoints and captures at steps 0, 4 and 8; the ReLoRA
    run merges at 4 and 8. Read-only: copy a run (``shutil.copytree``) before damaging it.
    """
    from trainer.config import build_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("pair")
    full = train(build_config(overrides=PAIR_BASE), root / "full", progress=False)
    relora = train(build_config(overrides=PAIR_BASE + PAIR_RELORA), root / "relora", progress=False)
    return TrainedPair(Path(full), Path(relora))


@pytest.fixture(scope="session")
def analysed_pair(trained_pair, tmp_path_factory) -> tuple[Any, Path]:
    """``(table, path)``: the shared pair analysed with the default options (``results.parquet``, its cache beside it)."""
    from dynamics.analyze import analyze_runs

    out = tmp_path_factory.mktemp("results") / "results.parquet"
    table, errors = analyze_runs(list(trained_pair), out, progress=False)
    assert errors == []
    return table, out
