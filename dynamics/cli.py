"""The ``dynamics`` command line.

``dynamics train``    train a run (full-rank or ReLoRA) into a run directory
``dynamics evaluate`` validation loss / perplexity and minimal-pair accuracy per checkpoint
``dynamics analyze``  spectra and metrics of every checkpoint → a tidy table
``dynamics summary``  one-screen comparison of methods from that table
``dynamics plot``     every figure a results table supports → PNG/PDF files
``dynamics demo``     the main job: a micro full-rank and ReLoRA pair → OUT/report.md
``dynamics reproduce`` the study's recipe (tiny/small) for a GPU machine
``dynamics export``   a checkpoint as a Hugging Face ``LlamaForCausalLM`` directory
``dynamics batch-size`` the largest micro-batch that fits on this GPU, and batch_size/grad_accum for a target

User mistakes (bad config, missing files, corrupted checkpoints) print one
``error: ...`` line and exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model into a run directory",
                       description="Train a pico-decoder full-rank or with ReLoRA. Settings: preset < --config < flags < --set.")
    p.add_argument("--preset", choices=["micro", "tiny", "small"], help="model size (default micro)")
    p.add_argument("--method", choices=["full", "relora"], help="full-rank or ReLoRA (default full)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--config", type=Path, help="YAML or JSON file of settings")
    p.add_argument("--init-from", metavar="RUN_DIR[@STEP]",
                   help="start from another run's dense weights (e.g. a full-rank warm start) instead of a fresh init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted for sections (lr=1e-3, model.d_model=128, relora.rank=8); repeatable")
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import build_config
    from trainer.train import threads_hint, train

    cfg = build_config(preset=args.preset, file=args.config, cli={"method": args.method, "steps": args.steps, "init_from": args.init_from},
                       overrides=args.overrides)
    threads_hint()
    out = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"run written to {out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="validation loss/perplexity and minimal-pair accuracy per checkpoint",
                       description="Evaluate every checkpoint of a run: validation loss and perplexity, and minimal-pair "
                                   "accuracy per phenomenon on the built-in grammar's pairs and on BLiMP-format JSONL files.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--blimp", type=Path, action="append", default=[], metavar="FILE.jsonl",
                   help="BLiMP-format minimal pairs (sentence_good, sentence_bad[, UID]); repeatable")
    p.add_argument("--steps", type=int, nargs="+", help="only these checkpoint steps")
    p.add_argument("--out", type=Path, help="write the long table here (.csv or .parquet)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_run

    table = evaluate_run(args.run, blimp=args.blimp, steps=args.steps, device=args.device)
    if args.out is not None:
        _write_table(table, args.out)
        print(f"wrote {args.out}")
    is_pair = table["metric"] == "pair_acc"
    col = table["metric"].where(~is_pair, table["source"] + ":" + table["phenomenon"].astype(str))
    wide = table.assign(col=col)
    wide = wide.pivot_table(index="col", columns="step", values="value", aggfunc="first")
    wide.index.name, wide.columns.name = "metric \\ step", None
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _write_table(table, path: Path) -> None:
    from trainer.atomic import atomic_write

    if path.suffix == ".parquet":
        atomic_write(path, lambda p: table.to_parquet(p, index=False))
    elif path.suffix == ".csv":
        atomic_write(path, lambda p: table.to_csv(p, index=False))
    else:
        from trainer.config import ConfigError

        raise ConfigError(f"--out must end in .csv or .parquet, got {str(path)!r}")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="spectral metrics of every checkpoint → one tidy table",
                       description="Compute spectra and metrics of weights, gradients, activations and update matrices "
                                   "for every checkpoint of the given runs. Re-running skips what is already computed.")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                   help="run directories, or checkpoints from elsewhere: a Hugging Face / safetensors model directory, "
                        "a folder of step directories (step_1000/, checkpoint-1000/ ...), or a .safetensors/.pt/.bin "
                        "file (pickles are loaded with weights_only=True; one that needs code is refused)")
    p.add_argument("--out", type=Path, default=Path("results.parquet"), help="results table (.parquet, or .csv)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--keep-going", action="store_true", help="analyse the rest when a checkpoint fails; list failures")
    p.add_argument("--kinds", help="comma-separated subset of weight,grad,act,update,update_cumulative,update_restart,lora")
    p.add_argument("--no-circuits", action="store_true", help="skip per-head OV/QK circuits")
    p.add_argument("--basic", action="store_true",
                   help="spectral metrics only: skip heavy tails, Marchenko-Pastur spikes, subspaces and cross-run rows")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from dynamics.analyze import AnalysisOptions, analyze_runs

    opts = AnalysisOptions()
    if args.kinds:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        bad = [k for k in kinds if k not in opts.kinds]
        if bad:
            from trainer.config import ConfigError

            raise ConfigError(f"--kinds: unknown {bad}; choose from {','.join(opts.kinds)}")
        opts = AnalysisOptions(kinds=kinds, circuits=not args.no_circuits)
    elif args.no_circuits:
        opts = AnalysisOptions(circuits=False)
    if args.basic:
        from dataclasses import replace

        opts = replace(opts, heavy_tails=False, spikes=False, subspaces=False, cross_run=False)
    if args.workers < 1:
        from trainer.config import ConfigError

        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    table, errors = analyze_runs(args.runs, args.out, options=opts, workers=args.workers, keep_going=args.keep_going,
                                 progress=not args.no_progress)
    print(f"wrote {args.out} ({len(table)} rows)")
    for e in errors:
        print(f"failed: {e}", file=sys.stderr)
    return 1 if errors else 0


def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="one-screen comparison of methods from a results table")
    p.add_argument("table", type=Path, help="results table written by `dynamics analyze`")
    p.add_argument("--kind", default="weight", help="which kind to summarise (default weight)")
    p.add_argument("--metric", default="proportional_effective_rank", help="metric (default proportional_effective_rank)")
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from dynamics.analyze import read_results
    from dynamics.summary import summarize

    table = read_results(args.table)
    print(summarize(table, kind=args.kind, metric=args.metric).to_string())
    per_method = table[table["kind"] != "train"].groupby("method")["run"].nunique()
    if (per_method >= 2).any():  # seed replicates: mean, 95% interval and the test of the method difference
        from dynamics.seeds import seed_summary

        print("\nAcross seeds (mean, 95% t-interval; test of relora − full per component):")
        print(seed_summary(table, kind=args.kind, metric=args.metric).to_string(
            float_format=lambda v: f"{v:.4g}", na_rep="–"))
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="every figure a results table supports → PNG/PDF files",
                       description="Draw the study's figures from a table written by `dynamics analyze`: loss, PER of "
                                   "weights/gradients/circuits/activations per layer over training, gradient condition "
                                   "numbers, update-matrix rank with ReLoRA merges marked, spectra, CKA heatmaps and a "
                                   "per-component summary. Figures the table has no data for are skipped with a note.")
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: train a micro full-rank and ReLoRA pair, analyse, plot, report",
                       description="Train a micro full-rank and a micro ReLoRA model on the built-in corpus (a few minutes "
                                   "on 2 CPU cores), capture dynamics, evaluate, analyse, and write OUT/report.md with figures.")
    p.add_argument("--out", type=Path, default=Path("demo"), help="output directory (default demo/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of both runs (e.g. steps=100); repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dynamics.pipeline import demo
    from trainer.train import threads_hint

    threads_hint()
    report = demo(args.out, overrides=args.overrides, progress=not args.no_progress)
    print(f"open {report}")
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the study's recipe (tiny or small, both methods) for a GPU machine",
                       description="Train the study's full-rank and ReLoRA runs (SPEC settings: AdamW 3e-4, 1024×2048 tokens "
                                   "per step, 20 000 steps, checkpoints every 100; ReLoRA r 16, alpha 32, reset 2000), then "
                                   "evaluate, analyse, plot and report. --steps shortens the run and scales warmups and "
                                   "ReLoRA periods in proportion. Point data.source/data.path at real data with --set.")
    p.add_argument("--preset", choices=["tiny", "small"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, help="shorter run (default 20000)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seed replicates per method (default 1); N > 1 trains seeds 0..N-1 of both methods")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dynamics.pipeline import reproduce
    from trainer.train import threads_hint

    threads_hint()
    overrides = ([f"steps={args.steps}"] if args.steps else []) + args.overrides
    if args.seeds < 1:
        from trainer.config import ConfigError

        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    report = reproduce(args.preset, args.out, overrides=overrides, progress=not args.no_progress, seeds=args.seeds)
    print(f"open {report}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a checkpoint as a Hugging Face LlamaForCausalLM directory",
                       description="Write one checkpoint as config.json + model.safetensors loadable by transformers' "
                                   "LlamaForCausalLM (ReLoRA runs: the effective weights W + s·B·A).")
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="directory to create")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--to", choices=["hf"], default="hf", help="format (hf: Hugging Face LLaMA)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.hf import export_hf

    out = export_hf(args.run, args.out, step=args.step)
    print(f"exported {args.run} step {args.step if args.step is not None else 'latest'} to {out}")
    return 0


def _add_batch_size(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch-size", help="largest micro-batch that fits on this GPU; batch_size/grad_accum for a target",
                       description="Run real training steps of the configured model (ReLoRA-wrapped for --method relora, "
                                   "AdamW, bf16 autocast and torch.compile as the trainer would) on the CUDA device at "
                                   "growing micro-batches, doubling then bisecting, until memory runs out. Prints the "
                                   "largest micro-batch with its peak memory and the batch_size/grad_accum to use for "
                                   "--target-batch sequences per optimizer step. Needs a CUDA device.")
    p.add_argument("--preset", choices=["micro", "tiny", "small"], default="tiny", help="model size (default tiny)")
    p.add_argument("--method", choices=["full", "relora"], help="full-rank or ReLoRA (default full)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context, 2048 for tiny/small)")
    p.add_argument("--target-batch", type=int, default=1024,
                   help="sequences per optimizer step to split into micro-batches (default 1024, the study's)")
    p.add_argument("--limit", type=int, help="largest micro-batch to try (default: --target-batch)")
    p.add_argument("--config", type=Path, help="YAML or JSON file of settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting as in `dynamics train` (compile=false, relora.rank=8, precision=fp32 ...); "
                        "repeatable")
    p.set_defaults(func=_cmd_batch_size)


def _cmd_batch_size(args: argparse.Namespace) -> int:
    import torch

    from trainer.config import ConfigError, build_config

    if not torch.cuda.is_available():
        raise ConfigError("dynamics batch-size measures GPU memory and needs a CUDA device; none is available on this "
                          "machine (on a CPU memory is rarely the limit: keep the preset's batch_size)")
    for flag, value in (("--target-batch", args.target_batch), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    cfg = build_config(preset=args.preset, file=args.config, cli={"method": args.method, "seq_len": args.seq_len},
                       overrides=args.overrides)
    from trainer.batch_size import GIB, measure_batch_size
    from trainer.train import resolve_device

    device = resolve_device(cfg.device)
    if device.type != "cuda":
        raise ConfigError(f"dynamics batch-size needs a CUDA device, got device={cfg.device!r}; drop that setting")

    def echo(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(f"trying micro-batches of {cfg.preset} {cfg.method} ({cfg.context} tokens per sequence) on {device}:",
          file=sys.stderr, flush=True)
    try:
        r = measure_batch_size(cfg, target_batch=args.target_batch, limit=args.limit, device=device, echo=echo)
    except MemoryError as e:
        print(f"error: {e}; try a shorter --seq-len", file=sys.stderr)
        return 1
    mode = f"{'bf16 autocast' if r.bf16 else 'float32'}, {'compiled' if r.compiled else 'eager'}"
    capped = " (the search limit; more may fit: raise --limit)" if r.max_micro_batch == r.limit else ""
    print(f"{r.device_name}, {r.total_bytes / GIB:.1f} GiB; {cfg.preset} {cfg.method}, seq_len {r.seq_len}, {mode}")
    print(f"largest micro-batch: {r.max_micro_batch} sequences{capped}, peak {r.max_peak_bytes / GIB:.2f} GiB allocated")
    print(f"for {r.target_batch} sequences per step: --set batch_size={r.target_batch} --set grad_accum={r.grad_accum} "
          f"(micro-batch {r.micro_batch}, peak {r.peak_bytes / GIB:.2f} GiB allocated)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamics", description="Learning dynamics of full-rank vs ReLoRA pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_analyze(sub)
    _add_summary(sub)
    _add_plot(sub)
    _add_demo(sub)
    _add_reproduce(sub)
    _add_export(sub)
    _add_batch_size(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynamics`` console script; returns the exit status."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.evaluate import EvaluationError
    from trainer.train import TrainingError
    from dynamics.validation import DynamicsError

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, EvaluationError, DynamicsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only or unwritable directory ...: what failed and where, no traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}; files completed before the failure are intact "
              "(fix the problem and re-run; `dynamics train --resume` continues a run)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
