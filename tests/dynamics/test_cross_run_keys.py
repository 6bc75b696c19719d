"""Which runs pair (ReLoRA vs full rank) and which group by seed: how a run was executed never splits them."""

from __future__ import annotations

import copy

from dynamics.cross_run import comparison_key, pair_runs, seed_group_key
from trainer.config import build_config
from trainer.run_format import EXECUTION_SETTINGS, without_execution_settings


def config(*overrides: str) -> dict:
    return build_config(preset="micro", overrides=list(overrides)).to_dict()


def test_execution_settings_neither_split_pairs_nor_seed_groups() -> None:
    full = config("method=full", "seed=0")
    relora = config("method=relora", "seed=0", "data.workers=4", "device=cpu", "compile=true", "prefetch=0")
    assert pair_runs([("f", "full", full), ("r", "relora", relora)]) == [("r", "f")]
    seed1 = config("method=full", "seed=1", "data.workers=3", "loss_chunk_tokens=64")
    assert seed_group_key(seed1) == seed_group_key(full)


def test_what_a_run_computes_still_splits_them() -> None:
    full = config("method=full", "seed=0")
    assert comparison_key(config("method=relora", "data.seed=5")) != comparison_key(full)
    assert pair_runs([("f", "full", full), ("r", "relora", config("method=relora", "batch_size=8"))]) == []
    for change in ("lr=0.01", "precision=bf16", "tf32=false", "data.seed=5", "steps=10"):
        assert seed_group_key(config("method=full", "seed=1", change)) != seed_group_key(full), change


def test_without_execution_settings_leaves_its_input_alone() -> None:
    stored = config("data.workers=2")
    before = copy.deepcopy(stored)
    stripped = without_execution_settings(stored)
    assert stored == before
    assert "workers" not in stripped["data"] and "device" not in stripped
    assert stripped["data"]["seed"] == stored["data"]["seed"] and stripped["model"] == stored["model"]
    assert all("." in k or k not in stripped for k in EXECUTION_SETTINGS)
