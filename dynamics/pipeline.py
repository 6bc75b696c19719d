"""End-to-end comparisons: train a full-rank and a ReLoRA run, evaluate, analyse, plot, report.

``dynamics demo`` runs a ``micro`` pair on the built-in corpus on a CPU in a
few minutes; ``dynamics reproduce --preset tiny|small`` runs the study's
settings (SPEC §2–3) on a GPU, optionally with fewer steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from trainer.config import TrainConfig, build_config

#: The demo: a micro pair that trains, captures and analyses in a few minutes on 2 CPU cores.
DEMO_COMMON = [
    "steps=300", "batch_size=16", "seq_len=64", "lr=3e-3", "warmup_steps=30", "eval_interval=50",
    "checkpoint_interval=50", "eval_batches=4", "data.train_tokens=1000000", "data.val_tokens=50000",
]
DEMO_RELORA = ["relora.rank=8", "relora.alpha=16", "relora.dropout=0.1", "relora.reset_every=100",
               "relora.restart_warmup=10", "relora.optimizer_reset=random"]

#: The study's hyperparameters (SPEC §2–3). Steps, batch and data can be overridden.
STUDY_COMMON = ["steps=20000", "batch_size=1024", "seq_len=2048", "lr=3e-4", "beta1=0.9", "beta2=0.999",
                "weight_decay=0.01", "eval_interval=100", "checkpoint_interval=100", "precision=auto",
                "data.train_tokens=50000000", "data.val_tokens=1000000"]
STUDY_FULL = ["schedule=linear", "warmup_steps=2500", "min_lr_ratio=0.0"]
STUDY_RELORA = ["warmup_steps=2000", "min_lr_ratio=0.1", "relora.rank=16", "relora.alpha=32", "relora.dropout=0.1",
                "relora.reset_every=2000", "relora.restart_warmup=100", "relora.optimizer_reset=random",
                "relora.optimizer_reset_ratio=0.999"]


def pair_configs(preset: str, common: list[str], full: list[str], relora: list[str],
                 overrides: list[str] | None = None) -> dict[str, TrainConfig]:
    """The two configs of a comparison; ``overrides`` apply to both (after the recipe's own settings)."""
    extra = list(overrides or [])
    return {
        "full": build_config(preset=preset, overrides=common + full + ["method=full"] + extra),
        "relora": build_config(preset=preset, overrides=common + relora + ["method=relora"] + extra),
    }


def run_pair(configs: dict[str, TrainConfig], out: str | Path, *, title: str, progress: bool = True,
             echo=print) -> Path:
    """Train each config into ``out/<method>``, then evaluate, analyse, plot and write ``out/report.md``.

    Each stage can be re-run: training resumes, analysis reuses its cache.
    Returns the report's path.
    """
    from dynamics.analyze import analyze_runs
    from dynamics.report import write_report
    from trainer.checkpoint import MANIFEST
    from trainer.evaluate import evaluate_run
    from trainer.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    runs = {}
    for method, cfg in configs.items():
        run_dir = out / method
        t0 = time.perf_counter()
        echo(f"[{title}] training {method} ({cfg.preset}, {cfg.steps} steps) → {run_dir}")
        resume = (run_dir / MANIFEST).exists()
        train(cfg, run_dir, resume=resume, progress=progress)
        timings[f"train {method}"] = time.perf_counter() - t0
        runs[method] = run_dir

    t0 = time.perf_counter()
    echo(f"[{title}] evaluating")
    evals = []
    for method, run_dir in runs.items():
        last = configs[method].steps
        ev = evaluate_run(run_dir, steps=[last], n_builtin_pairs=1000, progress=False)
        evals.append(ev.assign(method=configs[method].method, run=run_dir.name))
    evals_table = pd.concat(evals, ignore_index=True)
    evals_table.to_csv(out / "evaluation.csv", index=False)
    timings["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo(f"[{title}] analysing checkpoints")
    results = out / "results.parquet"
    table, errors = analyze_runs(list(runs.values()), results, progress=progress, keep_going=True)
    timings["analyse"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo(f"[{title}] plotting")
    figures = make_figures(table, out / "results.spectra.parquet", out / "figures")
    timings["plot"] = time.perf_counter() - t0

    cfg_f, cfg_r = configs.get("full"), configs.get("relora")
    any_cfg = cfg_f or cfg_r
    settings: dict[str, Any] = {
        "model": f"{any_cfg.preset} ({any_cfg.model.n_layers} layers, d_model {any_cfg.model.d_model}, "
                 f"{any_cfg.model.n_heads}/{any_cfg.model.n_kv_heads} heads, MLP {any_cfg.model.d_mlp})",
        "data": f"{any_cfg.data.source}" + (f" ({any_cfg.data.train_tokens:,} training tokens)" if any_cfg.data.source == "grammar" else ""),
        "training": f"{any_cfg.steps} steps × {any_cfg.batch_size} sequences × {any_cfg.context} tokens, lr {any_cfg.lr}",
    }
    if cfg_r is not None:
        r = cfg_r.relora
        settings["ReLoRA"] = (f"r {r.rank}, alpha {r.alpha}, dropout {r.dropout}, merge every {r.reset_every} steps, "
                              f"restart warmup {r.restart_warmup}, optimizer reset {r.optimizer_reset} ({r.prune_ratio})")
    if errors:
        settings["analysis failures"] = "; ".join(errors)
    report = write_report(out / "report.md", title=title, table=table, evals=evals_table,
                          runs={m: d.name for m, d in runs.items()}, settings=settings, figures=figures,
                          timings=timings)
    echo(f"[{title}] report: {report}")
    return report


def make_figures(table: pd.DataFrame, spectra_path: Path, out_dir: Path) -> list[Path]:
    """Every figure the table supports (PNG and PDF), via :func:`dynamics.plots.save_all`."""
    from dynamics import plots

    spectra = pd.read_parquet(spectra_path) if spectra_path.exists() else None
    return list(plots.save_all(table, spectra, out_dir))


def demo(out: str | Path, *, overrides: list[str] | None = None, progress: bool = True) -> Path:
    """The main job: a ``micro`` full-rank vs ReLoRA pair on the built-in grammar corpus."""
    configs = pair_configs("micro", DEMO_COMMON, [], DEMO_RELORA, overrides)
    return run_pair(configs, out, title="Full-rank vs ReLoRA: micro demo", progress=progress)


def reproduce(preset: str, out: str | Path, *, overrides: list[str] | None = None, progress: bool = True,
              seeds: int = 1) -> Path:
    """The study's recipe (SPEC §2–3) for ``tiny`` or ``small``; shorten with ``steps=N`` in ``overrides``.

    ``seeds`` > 1 trains seeds ``0 … seeds−1`` of both methods (``out/full``,
    ``out/relora`` for seed 0, ``out/full-seed1``, ``out/relora-seed1``, …): the
    analysis pairs them by seed and the summary reports intervals and a paired test.

    A shortened run keeps the schedule's shape: warmups, the ReLoRA period and
    the checkpoint interval are scaled by ``steps / 20000`` (see
    :func:`shortened_settings`); explicit ``overrides`` of those still win.
    """
    overrides = list(overrides or [])
    configs = {}
    if seeds < 1:
        from trainer.config import ConfigError

        raise ConfigError(f"reproduce: seeds must be >= 1, got {seeds}")
    for seed in range(seeds):
        for method, recipe in (("full", STUDY_FULL), ("relora", STUDY_RELORA)):
            settings = STUDY_COMMON + recipe + [f"method={method}"]
            seeded = overrides + ([f"seed={seed}"] if seeds > 1 else [])
            name = method if seed == 0 else f"{method}-seed{seed}"
            configs[name] = build_config(preset=preset, overrides=settings + shortened_settings(settings + seeded) + seeded)
    return run_pair(configs, out, title=f"Full-rank vs ReLoRA: {preset} (study settings)", progress=progress)


def shortened_settings(settings: list[str], study_steps: int = 20000) -> list[str]:
    """``key=value`` items scaling warmup, ReLoRA period and intervals of ``settings`` by ``steps / study_steps``.

    ``settings`` is a recipe's ``key=value`` list (the last ``steps=`` wins). Empty
    when the run is not shorter than the study. Keeps the warmup fraction, the
    number of ReLoRA restarts and the number of checkpoints of the full recipe.
    """
    from trainer.config import parse_overrides

    flat: dict = {}
    for item in settings:
        flat.update(parse_overrides([item]))
    steps = int(flat.get("steps", study_steps))
    factor = steps / study_steps
    if factor >= 1:
        return []
    relora = flat.get("relora", {})

    def scaled(v: int, floor: int = 1) -> int:
        return max(floor, round(v * factor))

    reset = scaled(int(relora.get("reset_every", 2000)), 2)
    interval = max(steps // 10, 1)
    return [
        f"warmup_steps={min(scaled(int(flat.get('warmup_steps') or 0), 0), steps - 1)}",
        f"relora.reset_every={reset}",
        f"relora.restart_warmup={min(scaled(int(relora.get('restart_warmup', 100))), reset - 1)}",
        f"checkpoint_interval={min(int(flat.get('checkpoint_interval', interval)), interval)}",
        f"eval_interval={min(int(flat.get('eval_interval', interval)), interval)}",
    ]
