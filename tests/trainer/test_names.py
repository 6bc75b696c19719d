"""Canonical names: parse, select; step directory names (trainer.run_format)."""

from __future__ import annotations

import pytest

import trainer.names
from trainer.names import matrix_names, parse, select
from trainer.run_format import parse_step_dirname, step_dirname


def test_parse_columns():
    p = parse("layers.11.mlp.down")
    assert (p.layer, p.block, p.proj, p.sub) == (11, "mlp", "down", None)
    assert parse("layers.0.attn.q.lora_b").sub == "lora_b"
    assert parse("layers.2.resid_mid").block == "resid"
    assert parse("embed").layer is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "layers.01.attn.q",
        "model.layers.0.self_attn.q_proj",
        "layers.0.attn.q.weight",
        "q3",
        "layers.0.mlp.w1",
        "embed.lora_a",
    ],
)
def test_parse_rejects_non_canonical(bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_select_globs_keep_order():
    names = matrix_names(3)
    assert select(names, "layers.*.attn.q") == ["layers.0.attn.q", "layers.1.attn.q", "layers.2.attn.q"]
    assert select(names, ["layers.1.mlp.*"]) == ["layers.1.mlp.gate", "layers.1.mlp.up", "layers.1.mlp.down"]
    assert select(names, "layers.*.q") == []
    assert len(select(names)) == 21
    assert select(names, "**.down") == ["layers.0.mlp.down", "layers.1.mlp.down", "layers.2.mlp.down"]


def test_step_dirnames():
    assert step_dirname(100) == "step_000100"
    assert parse_step_dirname("step_000100") == 100
    assert parse_step_dirname(".step_000100.tmp") is None
    # said once, in trainer.run_format (which imports trainer.names, so trainer.names does not re-export them)
    assert not hasattr(trainer.names, "step_dirname") and not hasattr(trainer.names, "parse_step_dirname")
