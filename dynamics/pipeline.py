"""End-to-end comparisons: train a full-rank and a ReLoRA run, evaluate, analyse, plot, report.

``dynamics demo`` runs a ``micro`` pair on the built-in corpus on a CPU in a
few minutes; ``dynamics reproduce --preset tiny|small`` runs the study's
settings (SPEC §2–3) on a GPU, optionally with fewer steps. The study's
settings are the shipped config files ``configs/<preset>_study_full.yaml`` and
``configs/<preset>_study_relora.yaml`` (one recipe, read here and by
``dynamics train --config``); both describe the same run length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from trainer.config import TrainConfig, build_config, parse_overrides
from trainer.errors import ConfigError
from trainer.run_format import MANIFEST

#: The shipped config files (``configs/`` of the repository checkout this package runs from).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Methods of a study pair, in the order they are trained.
STUDY_METHODS = ("full", "relora")

#: The demo: a micro pair that trains, captures and analyses in a few minutes on 2 CPU cores.
DEMO_COMMON = [
    "steps=300",
    "batch_size=16",
    "seq_len=64",
    "lr=3e-3",
    "warmup_steps=30",
    "eval_interval=50",
    "checkpoint_interval=50",
    "eval_batches=4",
    "data.train_tokens=1000000",
    "data.val_tokens=50000",
]
DEMO_RELORA = [
    "relora.rank=8",
    "relora.alpha=16",
    "relora.dropout=0.1",
    "relora.merge_every=100",
    "relora.lr_restart_warmup=10",
    "relora.optimizer_reset=random",
]


def pair_configs(
    preset: str, common: list[str], full: list[str], relora: list[str], overrides: list[str] | None = None
) -> dict[str, TrainConfig]:
    """The two configs of a comparison; ``overrides`` apply to both (after the recipe's own settings)."""
    extra = list(overrides or [])
    return {
        "full": build_config(preset=preset, overrides=common + full + ["method=full"] + extra),
        "relora": build_config(preset=preset, overrides=common + relora + ["method=relora"] + extra),
    }


def run_pair(
    configs: dict[str, TrainConfig],
    out: str | Path,
    *,
    title: str,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train each config into ``out/<method>``, then evaluate, analyse, plot and write ``out/report.md``.

    Each stage can be re-run: training resumes, analysis reuses its cache.
    Returns the report's path.
    """
    from dynamics.analyze import analyze_runs
    from dynamics.report import write_report
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
    any_cfg = cfg_f if cfg_f is not None else next(iter(configs.values()))
    settings: dict[str, Any] = {
        "model": f"{any_cfg.preset} ({any_cfg.model.n_layers} layers, d_model {any_cfg.model.d_model}, "
        f"{any_cfg.model.n_heads}/{any_cfg.model.n_kv_heads} heads, MLP {any_cfg.model.d_mlp})",
        "data": f"{any_cfg.data.source}"
        + (f" ({any_cfg.data.train_tokens:,} training tokens)" if any_cfg.data.source == "grammar" else ""),
        "training": f"{any_cfg.steps} steps × {any_cfg.batch_size} sequences × {any_cfg.context} tokens, lr {any_cfg.lr}",
    }
    if cfg_r is not None:
        r = cfg_r.relora
        settings["ReLoRA"] = (
            f"r {r.rank}, alpha {r.alpha}, dropout {r.dropout}, targets {', '.join(r.targets)}, "
            f"merge every {r.merge_every} steps, lr restart warmup {r.lr_restart_warmup}, "
            f"optimizer reset {r.optimizer_reset} ({r.prune_ratio})"
        )
    if errors:
        settings["analysis failures"] = "; ".join(errors)
    report = write_report(
        out / "report.md",
        title=title,
        table=table,
        evals=evals_table,
        runs={m: d.name for m, d in runs.items()},
        settings=settings,
        figures=figures,
        timings=timings,
    )
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


def study_config_path(preset: str, method: str) -> Path:
    """The shipped study config of ``preset`` and ``method``: ``configs/<preset>_study_<method>.yaml``.

    Raises :class:`~trainer.config.ConfigError` when it is missing (``reproduce``
    needs the repository checkout's ``configs/``, which a wheel does not ship).
    """
    path = CONFIG_DIR / f"{preset}_study_{method}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"reproduce: the study config {path} is missing; `dynamics reproduce --preset {preset}` reads "
            f"configs/{preset}_study_full.yaml and configs/{preset}_study_relora.yaml from the repository "
            "checkout it runs from (or train each with `dynamics train --config FILE`)"
        )
    return path


def study_configs(
    preset: str, overrides: list[str] | None = None, *, seed: int | None = None
) -> dict[str, TrainConfig]:
    """The study pair ``{"full": ..., "relora": ...}`` of ``preset``, read from the shipped config files.

    ``overrides`` (``key=value``) apply to both after the file. When they shorten
    the run (``steps=N`` below the file's), warmups, the ReLoRA periods and the
    intervals are scaled from the file's values by :func:`shortened_settings`;
    explicit ``overrides`` of those still win. ``seed`` sets both runs' seed.
    """
    user = list(overrides or []) + ([f"seed={seed}"] if seed is not None else [])
    configs = {}
    for method in STUDY_METHODS:
        path = study_config_path(preset, method)
        recipe = build_config(file=path)
        if recipe.preset != preset or recipe.method != method:
            raise ConfigError(
                f"reproduce: {path} describes preset {recipe.preset!r}, method {recipe.method!r}; "
                f"expected {preset!r}, {method!r}"
            )
        steps = parse_overrides(user).get("steps", recipe.steps)  # the full recipe may not validate at the new length
        steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else recipe.steps
        configs[method] = build_config(file=path, overrides=shortened_settings(recipe, steps) + user)
    return configs


def reproduce(
    preset: str, out: str | Path, *, overrides: list[str] | None = None, progress: bool = True, seeds: int = 1
) -> Path:
    """The study's recipe (SPEC §2–3; :func:`study_configs`) for ``tiny`` or ``small``; shorten with ``steps=N``.

    ``seeds`` > 1 trains seeds ``0 … seeds−1`` of both methods (``out/full``,
    ``out/relora`` for seed 0, ``out/full-seed1``, ``out/relora-seed1``, …): the
    analysis pairs them by seed and the summary reports intervals and a paired test.

    A shortened run keeps the schedule's shape: warmups, the ReLoRA periods and
    the checkpoint interval are scaled by ``steps / (the config's steps)`` (see
    :func:`shortened_settings`); explicit ``overrides`` of those still win.
    """
    if seeds < 1:
        raise ConfigError(f"reproduce: seeds must be >= 1, got {seeds}")
    configs = {}
    for seed in range(seeds):
        pair = study_configs(preset, overrides, seed=seed if seeds > 1 else None)
        for method, cfg in pair.items():
            configs[method if seed == 0 else f"{method}-seed{seed}"] = cfg
    return run_pair(configs, out, title=f"Full-rank vs ReLoRA: {preset} (study settings)", progress=progress)


def shortened_settings(recipe: TrainConfig, steps: int) -> list[str]:
    """``key=value`` items scaling ``recipe``'s warmups, ReLoRA periods and intervals to a run of ``steps``.

    Empty when ``steps`` is not shorter than ``recipe.steps``. Keeps the warmup
    fraction, the number of ReLoRA merges (and of optimizer resets and lr
    restarts when they have periods of their own) and the number of checkpoints
    of the recipe: the factor is ``steps / recipe.steps``.
    """
    factor = steps / recipe.steps
    if factor >= 1:
        return []

    def scaled(v: int, floor: int = 1) -> int:
        return max(floor, round(v * factor))

    interval = max(steps // 10, 1)
    out = [
        f"warmup_steps={min(scaled(recipe.warmup, 0), steps - 1)}",
        f"checkpoint_interval={min(recipe.checkpoint_interval, interval)}",
        f"eval_interval={min(recipe.eval_interval, interval)}",
    ]
    if recipe.method == "relora":
        r = recipe.relora
        merge = scaled(r.merge_every, 2)
        out.append(f"relora.merge_every={merge}")
        for key in ("optimizer_reset_every", "lr_restart_every"):
            value = getattr(r, key)
            if value is not None:
                out.append(f"relora.{key}={scaled(value, 2)}")
        restart = scaled(r.lr_restart_every, 2) if r.lr_restart_every is not None else merge
        out.append(f"relora.lr_restart_warmup={min(scaled(r.lr_restart_warmup), restart - 1)}")
    return out
