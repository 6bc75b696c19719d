"""The main job end to end (reduced size) and the study recipe: the shipped configs, read by `reproduce`."""

from __future__ import annotations

import re

import pandas as pd
import pytest

import dynamics.pipeline as pipeline
from dynamics.cli import main
from dynamics.cross_run import comparison_key
from dynamics.pipeline import CONFIG_DIR, shortened_settings, study_config_path, study_configs
from trainer.config import ConfigError, build_config
from trainer.errors import TrainerError

SMALL_DEMO = [
    "steps=24",
    "checkpoint_interval=8",
    "eval_interval=8",
    "relora.merge_every=8",
    "relora.lr_restart_warmup=2",
    "warmup_steps=3",
    "data.train_tokens=60000",
    "data.val_tokens=6000",
    "eval_batches=1",
]
#: What must agree between a study's two runs (besides everything ``comparison_key`` hashes).
RUN_LENGTH = ("steps", "batch_size", "grad_accum", "context", "checkpoint_interval", "eval_interval", "eval_batches")


@pytest.mark.slow
def test_demo_end_to_end_writes_report_and_figures(tmp_path):
    """Two seeds of each method trained in two processes; the report compares them across seeds."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--no-progress", "--seeds", "2", "--workers", "2"]
    args += [a for o in SMALL_DEMO for a in ("--set", o)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir() if (p / "manifest.json").exists()) == [
        "full",
        "full-seed1",
        "relora",
        "relora-seed1",
    ]
    report = (out / "report.md").read_text()
    for section in (
        "## Setup",
        "## Claims of the study",
        "## Comparisons",
        "### Loss and minimal pairs",
        "### Weight PER per component",
        "## Figures",
    ):
        assert section in report
    assert "seeds 0, 1" in report and "paired t-test" in report and "Benjamini–Hochberg" in report
    assert "train + evaluate (4 runs, 2 processes;" in report and "total (wall)" in report
    assert not re.search(r"\b(better|worse)\b", report)
    claims = report.split("## Claims of the study")[1].split("## Comparisons")[0]
    assert len(re.findall(r"^\| C\d", claims, flags=re.M)) == 6
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 4
    for rel in images:
        png = out / rel
        assert png.is_file() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert {p.suffix for p in (out / "figures").iterdir()} == {".png"}  # the demo writes what its report shows
    table = pd.read_parquet(out / "results.parquet")
    assert {"full", "relora"} == set(table["method"]) and table["run"].nunique() == 4
    seeds = table[(table.kind == "run") & (table.metric == "seed")].set_index("run")["value"].to_dict()
    assert seeds == {"full": 0, "relora": 0, "full-seed1": 1, "relora-seed1": 1}
    ev = pd.read_csv(out / "evaluation.csv")
    assert set(ev["method"]) == {"full", "relora"} and set(ev["seed"]) == {0, 1}
    # a second call resumes the finished runs and reuses the analysis cache
    assert main(args) == 0


def test_demo_trains_seeds_0_to_n_minus_1_of_each_method():
    configs = pipeline.demo_configs(["steps=40"], seeds=3)
    assert list(configs) == ["full", "relora", "full-seed1", "relora-seed1", "full-seed2", "relora-seed2"]
    assert [c.seed for c in configs.values()] == [0, 0, 1, 1, 2, 2]
    assert [c.method for c in configs.values()] == ["full", "relora"] * 3
    assert all(c.steps == 40 for c in configs.values())
    full, relora = configs["full-seed2"], configs["relora-seed2"]
    assert comparison_key(full.to_dict()) == comparison_key(relora.to_dict())  # the analysis pairs them
    with pytest.raises(ConfigError, match="seeds must be >= 1"):
        pipeline.demo_configs(seeds=0)
    with pytest.raises(ConfigError, match="seed= override"):
        pipeline.demo("unused", overrides=["seed=4"])


def test_demo_and_reproduce_flags_are_checked(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds and --workers must be >= 1" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "tiny", "--out", str(tmp_path), "--workers", "0"]) == 2


@pytest.mark.slow
def test_a_failed_run_in_a_worker_is_named_and_the_others_finish(tmp_path):
    configs = pipeline.demo_configs(SMALL_DEMO, seeds=1)
    (tmp_path / "relora").write_text("not a directory")  # this run cannot be written
    with pytest.raises(TrainerError, match=r"1 of 2 runs failed; relora: .*resumed on re-run"):
        pipeline.train_runs(configs, tmp_path, workers=2, echo=lambda s: None)
    assert (tmp_path / "full" / "manifest.json").is_file()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_study_recipe_is_the_shipped_configs(preset, monkeypatch, tmp_path):
    """`reproduce` trains exactly configs/<preset>_study_{full,relora}.yaml: SPEC's settings, one run length."""
    files = {m: CONFIG_DIR / f"{preset}_study_{m}.yaml" for m in ("full", "relora")}
    assert all(f.is_file() for f in files.values()) and study_config_path(preset, "full") == files["full"]
    shipped = {m: build_config(file=f) for m, f in files.items()}
    trained = {}
    monkeypatch.setattr(pipeline, "run_pair", lambda configs, out, **kw: trained.update(configs) or out / "report.md")
    pipeline.reproduce(preset, tmp_path)
    assert trained == shipped  # the recipe is the files, nothing added or overridden
    full, relora = shipped["full"], shipped["relora"]
    assert (full.preset, full.method, relora.preset, relora.method) == (preset, "full", preset, "relora")
    for cfg in (full, relora):
        assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (3e-4, 0.9, 0.999, 0.01, None)
        assert (cfg.steps, cfg.batch_size, cfg.context, cfg.checkpoint_interval) == (20000, 1024, 2048, 100)
    assert [getattr(full, k) for k in RUN_LENGTH] == [getattr(relora, k) for k in RUN_LENGTH]
    assert comparison_key(full.to_dict()) == comparison_key(relora.to_dict())  # the analysis pairs them
    assert (full.schedule, full.warmup, full.min_lr_ratio) == ("linear", 2500, 0.0)
    r = relora.relora
    assert (r.rank, r.alpha, r.dropout, r.merge_every, r.lr_restart_warmup, relora.warmup) == (
        16,
        32.0,
        0.1,
        2000,
        100,
        2000,
    )
    assert r.targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert relora.min_lr_ratio == 0.1 and r.prune_ratio == 0.999


def test_shortened_recipe_keeps_the_schedule_shape():
    recipe = build_config(file=study_config_path("tiny", "relora"))
    settings = dict(s.split("=") for s in shortened_settings(recipe, 400))
    assert settings == {
        "warmup_steps": "40",
        "relora.merge_every": "40",
        "relora.lr_restart_warmup": "2",
        "checkpoint_interval": "40",
        "eval_interval": "40",
    }
    cfg = study_configs("tiny", ["steps=400"])["relora"]
    assert cfg.steps // cfg.relora.merge_every == 20000 // 2000  # as many merges as the study
    assert (cfg.warmup, cfg.relora.lr_restart_warmup, cfg.checkpoint_interval) == (40, 2, 40)
    full = study_configs("tiny", ["steps=400", "warmup_steps=7"])["full"]  # an explicit override still wins
    assert (full.steps, full.warmup, full.checkpoint_interval) == (400, 7, 40)
    assert shortened_settings(recipe, 20000) == [] == shortened_settings(recipe, 40000)


def test_a_missing_study_config_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="tiny_study_full.yaml is missing"):
        study_configs("tiny")


@pytest.mark.slow
def test_reproduce_runs_at_a_reduced_step_count(tmp_path):
    args = [
        "reproduce",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "4",
        "--no-progress",
        "--set",
        "batch_size=2",
        "--set",
        "seq_len=32",
        "--set",
        "data.train_tokens=20000",
        "--set",
        "data.val_tokens=4000",
        "--set",
        "eval_batches=1",
        "--set",
        "capture.probe_sequences=2",
        "--set",
        "capture.grad_sequences=2",
        "--set",
        "grad_accum=1",
        # CI-sized: the tiny preset's layers and widths, but a vocabulary that fits the built-in grammar (the
        # 50 304-row embedding's SVD dominates the analysis otherwise) and three checkpoints per run
        "--set",
        "model.vocab_size=512",
        "--set",
        "checkpoint_interval=2",
    ]
    assert main(args) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    table = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert set(table["method"]) == {"full", "relora"}
