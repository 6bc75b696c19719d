"""End-to-end comparisons: train full-rank and ReLoRA runs (seeds), evaluate, analyse, plot, report.

``dynamics demo`` trains seeds 0, 1, 2 of a ``micro`` pair on the built-in
corpus, two runs at a time in parallel processes, in a few minutes on 2 CPU
cores; ``dynamics reproduce --preset tiny|small`` runs the study's
settings (SPEC §2–3) on a GPU, optionally with fewer steps. The study's
settings are the shipped config files ``configs/<preset>_study_full.yaml`` and
``configs/<preset>_study_relora.yaml`` (one recipe, read here and by
``dynamics train --config``); both describe the same run length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from dynamics.validation import DynamicsError
from trainer.config import TrainConfig, build_config, parse_overrides
from trainer.errors import ConfigError, TrainerError, TrainingError
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
#: Seeds per method the demo trains by default (``dynamics demo --seeds N``), and its parallel processes.
DEMO_SEEDS = 3
DEMO_WORKERS = 2
#: The demo's figures: PNG, what its report shows (`dynamics plot OUT/results.parquet` adds PDFs).
DEMO_FORMATS = ("png",)
#: Built-in minimal pairs per evaluation (per run, last checkpoint).
EVAL_PAIRS = 1000
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


def _one_thread() -> None:
    """Initializer of a training worker process: one intra-op thread, so parallel runs do not oversubscribe cores."""
    import torch

    torch.set_num_threads(1)


def _train_and_evaluate(label: str, cfg: TrainConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (resuming a finished or interrupted run), then evaluate its last checkpoint.

    Runs in the calling process or in a worker (module-level so it pickles).
    Returns ``{"label", "train_s", "evaluate_s", "evals"}``; ``evals`` is the
    evaluation table's records with ``method``, ``run`` and ``seed`` added.
    """
    from trainer.evaluate import evaluate_run
    from trainer.train import train

    t0 = time.perf_counter()
    train(cfg, run_dir, resume=(run_dir / MANIFEST).exists(), progress=progress)
    t1 = time.perf_counter()
    ev = evaluate_run(run_dir, steps=[cfg.steps], n_builtin_pairs=EVAL_PAIRS, progress=False)
    ev = ev.assign(method=cfg.method, run=run_dir.name, seed=cfg.seed)
    return {
        "label": label,
        "train_s": t1 - t0,
        "evaluate_s": time.perf_counter() - t1,
        "evals": ev.to_dict("records"),
    }


def train_runs(
    configs: dict[str, TrainConfig],
    out: Path,
    *,
    workers: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    title: str = "",
) -> tuple[list[dict[str, Any]], float]:
    """Train and evaluate every config into ``out/<label>``: in this process, or ``workers`` parallel processes.

    Each run is independent (its own seed, data files and directory). With
    ``workers > 1`` the runs go to a pool of spawned processes with one torch
    thread each; every run is waited for, then the failures are raised together
    (a project error keeps its class, with the run's label in front; finished
    runs stay on disk and are resumed, not retrained, by the next call).
    Returns the per-run results of :func:`_train_and_evaluate` in ``configs``' order, and the wall time.
    """
    t0 = time.perf_counter()
    jobs = [(label, cfg, out / label) for label, cfg in configs.items()]
    for label, cfg, run_dir in jobs:
        echo(f"[{title}] training {label} ({cfg.preset}, {cfg.method}, seed {cfg.seed}, {cfg.steps} steps) → {run_dir}")
    results: dict[str, dict[str, Any]] = {}
    failures: list[tuple[str, BaseException]] = []
    if workers <= 1 or len(jobs) <= 1:
        for label, cfg, run_dir in jobs:
            results[label] = _train_and_evaluate(label, cfg, run_dir, progress)
    else:
        import multiprocessing as mp

        from trainer.runtime import child_threads

        with (
            child_threads(1),
            ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn"), initializer=_one_thread
            ) as pool,
        ):
            futures = {
                pool.submit(_train_and_evaluate, label, cfg, run_dir, False): label for label, cfg, run_dir in jobs
            }
            for fut in as_completed(futures):
                label = futures[fut]
                try:
                    results[label] = fut.result()
                except Exception as e:  # noqa: BLE001 — collected so the other runs finish; raised together below
                    failures.append((label, e))
                    echo(f"[{title}] {label} FAILED: {type(e).__name__}: {e}")
                    continue
                r = results[label]
                echo(f"[{title}] {label} done: trained in {r['train_s']:.0f} s, evaluated in {r['evaluate_s']:.0f} s")
    if failures:
        label, first = failures[0]
        others = "; ".join(f"{lb}: {type(e).__name__}: {e}" for lb, e in failures[1:])
        msg = (
            f"{len(failures)} of {len(jobs)} runs failed; {label}: {first}"
            + (f"; {others}" if others else "")
            + f" (finished runs are kept in {out} and resumed on re-run)"
        )
        if isinstance(first, (TrainerError, DynamicsError)):
            raise type(first)(msg) from first
        raise TrainingError(msg) from first
    return [results[label] for label in configs], time.perf_counter() - t0


def run_pair(
    configs: dict[str, TrainConfig],
    out: str | Path,
    *,
    title: str,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    workers: int = 1,
    formats: tuple[str, ...] = ("png", "pdf"),
) -> Path:
    """Train each config into ``out/<label>``, evaluate, analyse, plot and write ``out/report.md``.

    ``configs`` maps a run label to its config: ``full``, ``relora`` for seed 0
    and ``full-seed1``, ``relora-seed1``, … for more seeds; the analysis pairs
    runs by seed and the report compares the methods across every seed present.
    ``workers`` parallel processes train (and evaluate) the runs and analyse
    the checkpoints. Each stage can be re-run: training resumes, analysis
    reuses its cache. Figures are written in ``formats``. Returns the report's path.
    """
    from dynamics.analyze import analyze_runs
    from dynamics.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    results, wall = train_runs(configs, out, workers=workers, progress=progress, echo=echo, title=title)
    n = len(configs)
    where = f"{min(workers, n)} processes" if workers > 1 and n > 1 else "one process"
    summed = f"summed over runs: training {sum(r['train_s'] for r in results):.0f} s, evaluation " + (
        f"{sum(r['evaluate_s'] for r in results):.0f} s"
    )
    timings[f"train + evaluate ({n} runs, {where}; {summed})"] = wall
    evals_table = pd.DataFrame([rec for r in results for rec in r["evals"]])
    evals_table.to_csv(out / "evaluation.csv", index=False)
    runs = {label: out / label for label in configs}

    t0 = time.perf_counter()
    echo(f"[{title}] analysing checkpoints")
    results_path = out / "results.parquet"
    table, errors = analyze_runs(list(runs.values()), results_path, progress=progress, keep_going=True, workers=workers)
    timings["analyse"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    echo(f"[{title}] plotting")
    figures = make_figures(table, out / "results.spectra.parquet", out / "figures", formats=formats)
    timings["plot"] = time.perf_counter() - t0

    any_cfg = next(iter(configs.values()))
    cfg_r = next((c for c in configs.values() if c.method == "relora"), None)
    settings: dict[str, Any] = {
        "model": f"{any_cfg.preset} ({any_cfg.model.n_layers} layers, d_model {any_cfg.model.d_model}, "
        f"{any_cfg.model.n_heads}/{any_cfg.model.n_kv_heads} heads, MLP {any_cfg.model.d_mlp}; "
        f"{parameter_count(any_cfg) / 1e6:.2f}M parameters)",
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
    t0 = time.perf_counter()
    timings["report"] = 0.0
    timings["total (wall)"] = 0.0
    report = out / "report.md"

    def write(timings: dict[str, float]) -> None:
        write_report(
            report,
            title=title,
            table=table,
            evals=evals_table,
            settings=settings,
            figures=figures,
            timings=timings,
            scale=scale_note(any_cfg),
            sizes=any_cfg.preset,
        )

    write(timings)
    timings["report"] = time.perf_counter() - t0
    timings["total (wall)"] = time.perf_counter() - start
    write(timings)  # again, with its own time and the total
    echo(f"[{title}] report: {report} ({timings['total (wall)']:.0f} s)")
    return report


def parameter_count(cfg: TrainConfig) -> int:
    """Parameters of ``cfg``'s model (full-rank; ReLoRA adds its adapters), counted without allocating weights."""
    import torch

    from trainer.model import Decoder, count_parameters

    with torch.device("meta"):
        return count_parameters(Decoder(cfg.model))


def scale_note(cfg: TrainConfig) -> str:
    """One line on a run's size against the study's (SPEC §1–2): parameters and tokens per run."""
    tokens = cfg.steps * cfg.tokens_per_step
    return (
        f"{cfg.preset}, {parameter_count(cfg) / 1e6:.2g}M parameters, {tokens / 1e6:.2g}M tokens per run vs the "
        "study's 11M–66M parameters and 42B tokens: direction only"
    )


def make_figures(
    table: pd.DataFrame, spectra_path: Path, out_dir: Path, *, formats: tuple[str, ...] = ("png", "pdf")
) -> list[Path]:
    """Every figure the table supports in ``formats``, via :func:`dynamics.plots.save_all`."""
    from dynamics import plots

    spectra = pd.read_parquet(spectra_path) if spectra_path.exists() else None
    return list(plots.save_all(table, spectra, out_dir, formats=formats))


def demo_configs(overrides: list[str] | None = None, *, seeds: int = DEMO_SEEDS) -> dict[str, TrainConfig]:
    """The demo's runs: seeds ``0 … seeds−1`` of the micro pair, labelled as :func:`seed_labels` says."""
    if seeds < 1:
        raise ConfigError(f"demo: seeds must be >= 1, got {seeds}")
    configs = {}
    for seed in range(seeds):
        pair = pair_configs("micro", DEMO_COMMON, [], DEMO_RELORA, [*(overrides or []), f"seed={seed}"])
        configs.update(seed_labels(pair, seed))
    return configs


def seed_labels(pair: dict[str, TrainConfig], seed: int) -> dict[str, TrainConfig]:
    """Run labels of one seed's pair: ``full``, ``relora`` for seed 0, ``full-seed<k>``, ``relora-seed<k>`` after."""
    return {(method if seed == 0 else f"{method}-seed{seed}"): cfg for method, cfg in pair.items()}


def demo(
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    progress: bool = True,
    seeds: int = DEMO_SEEDS,
    workers: int = DEMO_WORKERS,
) -> Path:
    """The main job: ``seeds`` seeds of a ``micro`` full-rank vs ReLoRA pair on the built-in grammar corpus.

    Runs train in ``workers`` parallel processes (one torch thread each); the
    report compares the methods across the seeds (:mod:`dynamics.report`).
    The seeds are ``0 … seeds−1``; a ``seed=`` override is refused (a :class:`ConfigError`).
    Figures are PNG only (:data:`DEMO_FORMATS`), what the report shows.
    """
    if any(o.replace(" ", "").startswith("seed=") for o in overrides or []):
        raise ConfigError("demo: the runs' seeds are 0..N-1, set by --seeds N; drop the seed= override")
    configs = demo_configs(overrides, seeds=seeds)
    return run_pair(
        configs,
        out,
        title="Full-rank vs ReLoRA: micro demo",
        progress=progress,
        workers=workers,
        formats=DEMO_FORMATS,
    )


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
    preset: str,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    progress: bool = True,
    seeds: int = 1,
    workers: int = 1,
) -> Path:
    """The study's recipe (SPEC §2–3; :func:`study_configs`) for ``tiny`` or ``small``; shorten with ``steps=N``.

    ``seeds`` > 1 trains seeds ``0 … seeds−1`` of both methods (``out/full``,
    ``out/relora`` for seed 0, ``out/full-seed1``, ``out/relora-seed1``, …): the
    analysis pairs them by seed and the report compares the methods across them.
    ``workers`` > 1 trains runs in parallel processes (on one GPU they share it).

    A shortened run keeps the schedule's shape: warmups, the ReLoRA periods and
    the checkpoint interval are scaled by ``steps / (the config's steps)`` (see
    :func:`shortened_settings`); explicit ``overrides`` of those still win.
    """
    if seeds < 1:
        raise ConfigError(f"reproduce: seeds must be >= 1, got {seeds}")
    configs = {}
    for seed in range(seeds):
        configs.update(seed_labels(study_configs(preset, overrides, seed=seed if seeds > 1 else None), seed))
    return run_pair(
        configs, out, title=f"Full-rank vs ReLoRA: {preset} (study settings)", progress=progress, workers=workers
    )


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
