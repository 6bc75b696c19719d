"""Shared fixtures: tiny configs and data that make a real training run take a second or two."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--reliability-scale", type=int, default=None, metavar="N",
                     help="size of the fault campaign in tests/reliability (default 1, or $RELIABILITY_N); "
                          "N multiplies the number of cases of every category")

WORDS = "the a cat dog bird sees chases likes runs sleeps big small red quick and then".split()


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A directory with a small plain-text file (~60 kB) of random word sequences."""
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(6000)]
    (d / "corpus.txt").write_text("\n".join(lines))
    return d


@pytest.fixture
def fast_overrides(text_corpus) -> list[str]:
    """``--set`` items for a micro run on the text fixture that trains in about a second."""
    return [
        "data.source=text", f"data.path={text_corpus}", "seq_len=32", "batch_size=8",
        "eval_interval=5", "eval_batches=2", "checkpoint_interval=5", "warmup_steps=2",
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
            out[name] = {"loss": [r["loss"] for r in records if "loss" in r],
                         "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
                         "weights": load_file(str(run_dir / f"checkpoints/step_{last:06d}/model.safetensors"))}
        return out

    return run
