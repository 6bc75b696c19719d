"""The main job end to end (reduced size) and the study recipe's wiring."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from dynamics.cli import main
from dynamics.pipeline import STUDY_COMMON, STUDY_FULL, STUDY_RELORA, pair_configs, shortened_settings
from trainer.config import build_config

SMALL_DEMO = ["steps=24", "checkpoint_interval=8", "eval_interval=8", "relora.reset_every=8", "relora.restart_warmup=2",
              "warmup_steps=3", "data.train_tokens=60000", "data.val_tokens=6000", "eval_batches=1"]


@pytest.mark.slow
def test_demo_end_to_end_writes_report_and_figures(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--no-progress"] + [a for o in SMALL_DEMO for a in ("--set", o)]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Findings", "## Loss and minimal pairs", "## Weight PER per component", "## Figures"):
        assert section in report
    assert "Final validation loss: ReLoRA" in report and "Minimal-pair accuracy" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 4
    for rel in images:
        png = out / rel
        assert png.is_file() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert any(p.suffix == ".pdf" for p in (out / "figures").iterdir())
    table = pd.read_parquet(out / "results.parquet")
    assert {"full", "relora"} == set(table["method"])
    ev = pd.read_csv(out / "evaluation.csv")
    assert set(ev["method"]) == {"full", "relora"}
    # a second call resumes the finished runs and reuses the analysis cache
    assert main(args) == 0


def test_study_recipe_matches_spec():
    cfgs = pair_configs("tiny", STUDY_COMMON, STUDY_FULL, STUDY_RELORA)
    full, relora = cfgs["full"], cfgs["relora"]
    assert (full.lr, full.beta1, full.beta2, full.weight_decay, full.grad_clip) == (3e-4, 0.9, 0.999, 0.01, None)
    assert (full.steps, full.batch_size, full.context, full.checkpoint_interval) == (20000, 1024, 2048, 100)
    assert (full.schedule, full.warmup) == ("linear", 2500)
    r = relora.relora
    assert (r.rank, r.alpha, r.dropout, r.reset_every, r.restart_warmup, relora.warmup) == (16, 32.0, 0.1, 2000, 100, 2000)
    assert relora.min_lr_ratio == 0.1 and r.prune_ratio == 0.999


def test_shortened_recipe_keeps_the_schedule_shape():
    recipe = STUDY_COMMON + STUDY_RELORA + ["method=relora"]
    settings = dict(s.split("=") for s in shortened_settings(recipe + ["steps=400"]))
    assert settings == {"warmup_steps": "40", "relora.reset_every": "40", "relora.restart_warmup": "2",
                        "checkpoint_interval": "40", "eval_interval": "40"}
    cfg = build_config(preset="tiny", overrides=recipe + shortened_settings(recipe + ["steps=400"]) + ["steps=400"])
    assert cfg.steps // cfg.relora.reset_every == 20000 // 2000  # as many restarts as the study
    assert shortened_settings(recipe) == []


@pytest.mark.slow
def test_reproduce_runs_at_a_reduced_step_count(tmp_path):
    args = ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r"), "--steps", "4", "--no-progress",
            "--set", "batch_size=2", "--set", "seq_len=32", "--set", "data.train_tokens=20000",
            "--set", "data.val_tokens=4000", "--set", "eval_batches=1", "--set", "capture.probe_sequences=2",
            "--set", "capture.grad_sequences=2",
            # CI-sized: the tiny preset's layers and widths, but a vocabulary that fits the built-in grammar (the
            # 50 304-row embedding's SVD dominates the analysis otherwise) and three checkpoints per run
            "--set", "model.vocab_size=512", "--set", "checkpoint_interval=2"]
    assert main(args) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    table = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert set(table["method"]) == {"full", "relora"}
