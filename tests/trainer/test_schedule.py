"""Learning-rate schedules, checked against the SPEC formulas step by step."""

from __future__ import annotations

import math

import pytest

from trainer.config import build_config
from trainer.runtime import lr_at
from trainer.schedule import cosine_factor, jagged_cosine_factor, linear_factor


def spec_jagged(t, T, W0, R, Wr, m):
    def c(s):
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (s - W0) / (T - W0)))

    if t < W0:
        return t / W0
    u, k = t % R, t // R
    if t >= R and u < Wr:
        return (u / Wr) * c(k * R + Wr)
    return c(t)


@pytest.mark.parametrize("T, W0, R, Wr", [(200, 20, 50, 5), (120, 10, 30, 1), (97, 3, 40, 10)])
def test_jagged_cosine_equals_spec_at_every_step(T, W0, R, Wr):
    for t in range(T):
        got = jagged_cosine_factor(t, total=T, warmup=W0, lr_restart_every=R, lr_restart_warmup=Wr, min_ratio=0.1)
        assert got == pytest.approx(spec_jagged(t, T, W0, R, Wr, 0.1), abs=1e-12), t
    for k in range(1, T // R + 1):
        if k * R < T:
            got = jagged_cosine_factor(
                k * R, total=T, warmup=W0, lr_restart_every=R, lr_restart_warmup=Wr, min_ratio=0.1
            )
            assert got == 0.0


def test_cosine_and_linear_endpoints():
    for f in (cosine_factor, linear_factor):
        assert f(0, total=100, warmup=10, min_ratio=0.1) == 0.0
        assert f(5, total=100, warmup=10, min_ratio=0.1) == pytest.approx(0.5)
        assert f(10, total=100, warmup=10, min_ratio=0.1) == pytest.approx(1.0)
        assert f(100, total=100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_relora_runs_use_the_jagged_schedule():
    cfg = build_config(
        overrides=[
            "method=relora",
            "steps=100",
            "warmup_steps=10",
            "relora.merge_every=30",
            "relora.lr_restart_warmup=5",
            "lr=1e-3",
        ]
    )
    assert lr_at(cfg, 30) == 0.0 and lr_at(cfg, 60) == 0.0 and lr_at(cfg, 29) > 0
    full = build_config(overrides=["steps=100", "warmup_steps=10", "lr=1e-3"])
    assert lr_at(full, 30) > 0
