"""The ``dynamics`` command line.

``dynamics train``    train a run (full-rank or ReLoRA) into a run directory
``dynamics evaluate`` validation loss / perplexity and minimal-pair accuracy per checkpoint
``dynamics analyze``  spectra and metrics of every checkpoint → a tidy table
``dynamics summary``  one-screen comparison of methods from that table
``dynamics plot``     every figure a results table supports → PNG/PDF files
``dynamics demo``     the main job: micro full-rank and ReLoRA runs, 3 seeds each → OUT/report.md
``dynamics reproduce`` the study's recipe (tiny/small) for a GPU machine
``dynamics export``   a checkpoint as a Hugging Face ``LlamaForCausalLM`` directory
``dynamics batch-size`` the largest micro-batch that fits on this GPU, and batch_size/grad_accum for a target

``train``, ``evaluate``, ``export`` and ``batch-size`` are the trainer's commands
(:mod:`trainer.commands`); this module declares the rest and dispatches.

No error of the project ends in a traceback; each prints one ``error: ...`` line:

* exit status 2 for bad input — a bad setting or flag, a corpus or evaluation
  input that cannot be used, a missing, corrupted or too new run or checkpoint
  (:class:`trainer.errors.TrainerError` other than the two below, and every
  :class:`dynamics.validation.DynamicsError`);
* exit status 1 for a run that failed while training or capturing
  (:class:`trainer.errors.TrainingError`, :class:`trainer.errors.CaptureError`),
  and for an operating-system error (disk full, no permission ...);
* 130 after Ctrl-C (SIGINT), 143 after SIGTERM: ``dynamics train`` first finishes
  the step in progress and saves a checkpoint (:mod:`trainer.interrupts`); a
  second signal stops it at once, with the same status.

A second writer of a run directory (or of ``analyze``'s cache) is refused with
status 2, naming the process that holds it (:mod:`trainer.lock`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from dynamics.validation import DynamicsError
from trainer import commands
from trainer.errors import CaptureError, ConfigError, TrainerError, TrainingError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _add_analyze(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "analyze",
        help="spectral metrics of every checkpoint → one tidy table",
        description="Compute spectra and metrics of weights, gradients, activations and update matrices "
        "for every checkpoint of the given runs. Re-running skips what is already computed.",
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or checkpoints from elsewhere: a Hugging Face / safetensors model directory, "
        "a folder of step directories (step_1000/, checkpoint-1000/ ...), or a .safetensors/.pt/.bin "
        "file (pickles are loaded with weights_only=True; one that needs code is refused)",
    )
    p.add_argument("--out", type=Path, default=Path("results.parquet"), help="results table (.parquet, or .csv)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--keep-going", action="store_true", help="analyse the rest when a checkpoint fails; list failures")
    p.add_argument(
        "--include-interrupts",
        action="store_true",
        help="also analyse checkpoints saved when training was interrupted (left out by default: they are not on "
        "the run's checkpoint grid and would change the update matrices of the regular ones)",
    )
    p.add_argument(
        "--kinds",
        help="comma-separated subset of weight,grad,act,update,update_cumulative,update_merge,lora "
        "(update_restart: the former name of update_merge)",
    )
    p.add_argument("--no-circuits", action="store_true", help="skip per-head OV/QK circuits")
    p.add_argument(
        "--basic",
        action="store_true",
        help="spectral metrics only: skip heavy tails, Marchenko-Pastur spikes, subspaces, entry sparsity, "
        "SVCCA/PWCCA and cross-run rows",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        help="compute spectra and metrics as float64 torch tensors on this device (auto: cuda if available); "
        "default: the numpy path on CPU. Same rows and cache; values agree to ~1e-12 relative (~1e-8 for "
        "sigma_min and condition numbers on cuda)",
    )
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="analyse only shard K of N (a deterministic 1/N of the checkpoints) into the shared cache, without "
        "writing the table; shards may run at once; a final run without --shard assembles the table",
    )
    p.add_argument(
        "--executor",
        choices=("local", "dask"),
        default="local",
        help="where the checkpoints are analysed: local processes (--workers), or tasks on a Dask cluster "
        "(needs `pip install relora-dynamics[cluster]`; same cache and table)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --executor dask: a running `dask scheduler` (tcp://host:8786); without it or --scheduler-file, "
        "a local cluster of --workers processes",
    )
    p.add_argument(
        "--scheduler-file",
        type=Path,
        metavar="PATH",
        help="with --executor dask: the file written by `dask scheduler --scheduler-file PATH`",
    )
    p.add_argument(
        "--log-to",
        nargs=2,
        metavar=("LOGGER", "DIR"),
        help="also publish the table's curves (mean over layers per kind/metric/component, per step) to "
        "tensorboard, wandb or mlflow at DIR (dynamics.publish), next to the training loss curves",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from dynamics._malloc import one_arena

    one_arena()  # before the imports below: every thread of this process allocates from glibc's main arena
    from dynamics.analyze import KIND_ALIASES, AnalysisOptions, analyze_runs, parse_shard

    opts = AnalysisOptions()
    if args.kinds:
        kinds = tuple(KIND_ALIASES.get(k.strip(), k.strip()) for k in args.kinds.split(",") if k.strip())
        bad = [k for k in kinds if k not in opts.kinds]
        if bad:
            raise ConfigError(f"--kinds: unknown {bad}; choose from {','.join(opts.kinds)}")
        opts = AnalysisOptions(kinds=kinds, circuits=not args.no_circuits)
    elif args.no_circuits:
        opts = AnalysisOptions(circuits=False)
    if args.basic:  # the same switches as AnalysisOptions.basic(), said once there
        opts = AnalysisOptions.basic(kinds=opts.kinds, circuits=opts.circuits)
    if args.include_interrupts:
        from dataclasses import replace

        opts = replace(opts, include_interrupts=True)
    if args.device:
        from dataclasses import replace

        opts = replace(opts, device=args.device)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    shard = parse_shard(args.shard) if args.shard is not None else None  # before any work: a bad K/N is one line
    if args.log_to is not None:  # before any work: a bad choice or a missing package is one line
        from trainer.tracking import require

        if args.log_to[0] not in ("tensorboard", "wandb", "mlflow"):
            raise ConfigError(f"--log-to: unknown tracker {args.log_to[0]!r}; choose from tensorboard, wandb, mlflow")
        if shard is not None:
            raise ConfigError("--log-to publishes the assembled table; drop --shard (or publish on the final run)")
        require([args.log_to[0]])
    table, errors = analyze_runs(
        args.runs,
        args.out,
        options=opts,
        workers=args.workers,
        keep_going=args.keep_going,
        progress=not args.no_progress,
        shard=shard,
        executor=args.executor,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
    )
    if shard is not None:
        c = table.attrs["shard"]
        print(
            f"shard {c['shard']}: {c['assigned']} of {c['units']} units: {c['computed']} computed, {c['cached']} "
            f"already cached, {c['failed']} failed; {args.out} not written (run without --shard to assemble it)"
        )
    else:
        print(f"wrote {args.out} ({len(table)} rows)")
    if args.log_to is not None:
        from dynamics.publish import describe, publish

        print(describe(publish(table, args.log_to[0], args.log_to[1]), *args.log_to))
    for e in errors:
        print(f"failed: {e}", file=sys.stderr)
    return 1 if errors else 0


def _add_summary(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("summary", help="one-screen comparison of methods from a results table")
    p.add_argument("table", type=Path, help="results table written by `dynamics analyze`")
    p.add_argument("--kind", default="weight", help="which kind to summarise (default weight)")
    p.add_argument(
        "--metric", default="proportional_effective_rank", help="metric (default proportional_effective_rank)"
    )
    p.add_argument(
        "--adjust",
        choices=["bh", "holm"],
        default="bh",
        help="multiple-comparison adjustment across components: bh (Benjamini-Hochberg, default) or holm",
    )
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from dynamics.analyze import read_results
    from dynamics.seeds import format_seed_summary, seed_summary
    from dynamics.stats import ADJUSTMENTS
    from dynamics.summary import summarize

    table = read_results(args.table)
    print(summarize(table, kind=args.kind, metric=args.metric).to_string())
    per_method = table[table["kind"] != "train"].groupby("method")["run"].nunique()
    if not {"full", "relora"} <= set(per_method.index):
        return 0
    if (per_method < 2).any():
        print(
            f"\nOne run of a method ({per_method.to_dict()}): no interval across seeds and no test; a difference "
            "between single runs is not a finding. Train seeds: `dynamics demo --seeds 3`, `dynamics reproduce --seeds 3`."
        )
        return 0
    summary = seed_summary(table, kind=args.kind, metric=args.metric, adjust=args.adjust)
    print(
        f"\nAcross seeds: mean and 95% t-interval per method; Δ = relora − full paired by seed (paired t-test; "
        f"Wilcoxon signed-rank from 6 pairs; Welch's t-test when unpaired); p adjusted across components "
        f"({ADJUSTMENTS[args.adjust]}); 'survives': adjusted p < 0.05."
    )
    print(format_seed_summary(summary))
    return 0


def _add_plot(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plot",
        help="every figure a results table supports → PNG/PDF files",
        description="Draw the study's figures from a table written by `dynamics analyze`: loss, PER of "
        "weights/gradients/circuits/activations per layer over training, gradient condition "
        "numbers, update-matrix rank with ReLoRA merges marked, spectra, CKA heatmaps and a "
        "per-component summary. Figures the table has no data for are skipped with a note.",
    )
    p.add_argument("table", type=Path, help="results table (.parquet or .csv) written by `dynamics analyze`")
    p.add_argument("--spectra", type=Path, help="raw spectra (default: <table stem>.spectra.parquet next to the table)")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output directory (default figures/)")
    p.add_argument("--formats", default="png,pdf", help="comma-separated file formats (default png,pdf)")
    p.add_argument("--dpi", type=int, default=150, help="resolution of raster formats (default 150)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    import logging

    from dynamics import plots

    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("note: %(message)s"))
    log = logging.getLogger("dynamics.plots")
    log.addHandler(notes)
    log.setLevel(logging.INFO)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    paths = plots.save_all(args.table, args.spectra, args.out, formats=formats, dpi=args.dpi)
    print(f"wrote {len(paths)} files to {args.out}: " + ", ".join(sorted({p.stem for p in paths})))
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train micro full-rank and ReLoRA runs over 3 seeds, analyse, plot, report",
        description="Train micro full-rank and ReLoRA models on the built-in corpus, seeds 0..N-1 of each "
        "(under 5 minutes on 2 CPU cores for 3 seeds), capture dynamics, evaluate, analyse, and write "
        "OUT/report.md with figures: every comparison across seeds, with intervals, tests and the study's claims.",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (default demo/)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3; 1 gives no tests)")
    p.add_argument("--workers", type=int, default=2, help="runs trained in parallel processes (default 2)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of both runs (e.g. steps=100); repeatable",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dynamics.pipeline import demo
    from trainer.runtime import threads_hint

    threads_hint()
    if args.seeds < 1 or args.workers < 1:
        raise ConfigError(f"--seeds and --workers must be >= 1, got {args.seeds} and {args.workers}")
    report = demo(
        args.out, overrides=args.overrides, progress=not args.no_progress, seeds=args.seeds, workers=args.workers
    )
    print(f"open {report}")
    return 0


def _add_reproduce(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the study's recipe (tiny or small, both methods) for a GPU machine",
        description="Train the study's full-rank and ReLoRA runs (SPEC settings: AdamW 3e-4, 1024×2048 tokens "
        "per step, 20 000 steps, checkpoints every 100; ReLoRA r 16, alpha 32, a merge every 2000), then "
        "evaluate, analyse, plot and report. --steps shortens the run and scales warmups and "
        "ReLoRA periods in proportion. Point data.source/data.path at real data with --set.",
    )
    p.add_argument("--preset", choices=["tiny", "small"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, help="shorter run (default 20000)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seed replicates per method (default 1); N > 1 trains seeds 0..N-1 of both methods",
    )
    p.add_argument("--workers", type=int, default=1, help="runs trained in parallel processes (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dynamics.pipeline import reproduce
    from trainer.runtime import threads_hint

    threads_hint()
    overrides = ([f"steps={args.steps}"] if args.steps else []) + args.overrides
    if args.seeds < 1 or args.workers < 1:
        raise ConfigError(f"--seeds and --workers must be >= 1, got {args.seeds} and {args.workers}")
    report = reproduce(
        args.preset,
        args.out,
        overrides=overrides,
        progress=not args.no_progress,
        seeds=args.seeds,
        workers=args.workers,
    )
    print(f"open {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamics", description="Learning dynamics of full-rank vs ReLoRA pretraining."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_train(sub)
    commands.add_evaluate(sub)
    _add_analyze(sub)
    _add_summary(sub)
    _add_plot(sub)
    _add_demo(sub)
    _add_reproduce(sub)
    commands.add_export(sub)
    commands.add_batch_size(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynamics`` console script; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    # The project's roots come before OSError: CheckpointError and DynamicsIOError are OSErrors too.
    try:
        status: int = args.func(args)
        return status
    except (TrainingError, CaptureError) as e:  # the run itself failed
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (TrainerError, DynamicsError) as e:  # bad input: settings, data, damaged or missing files
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, read-only or unwritable directory ...: what failed and where, no traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"error: {e.strerror or e}{where}; files completed before the failure are intact "
            "(fix the problem and re-run; `dynamics train --resume` continues a run)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # trainer.interrupts.Interrupted carries the signal's status (143: SIGTERM)
        print("interrupted", file=sys.stderr)
        interrupted: int = getattr(e, "exit_status", EXIT_INTERRUPTED)
        return interrupted


if __name__ == "__main__":
    sys.exit(main())
