"""The trainer's sub-commands of the ``dynamics`` command line: train, evaluate, export, batch-size.

Each command is a pair: ``add_<name>(sub)`` declares its parser on the
``dynamics`` command's sub-parsers (flags, help) and binds ``cmd_<name>``,
which runs it and returns the exit status. :mod:`dynamics.cli` owns the single
``dynamics`` command, puts these next to the analysis commands and turns the
project's errors into one ``error:`` line; this module only raises them
(:mod:`trainer.errors`).

Heavy imports (torch, pandas, the training loop) happen inside the ``cmd_*``
functions, so building the parser (``dynamics --help``) stays fast. Like the
rest of :mod:`trainer`, this module never imports :mod:`dynamics`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "add_train",
    "cmd_train",
    "add_evaluate",
    "cmd_evaluate",
    "write_table",
    "add_export",
    "cmd_export",
    "add_batch_size",
    "cmd_batch_size",
]


def add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``dynamics train``."""
    p = sub.add_parser(
        "train",
        help="train a model into a run directory",
        description="Train a pico-decoder full-rank or with ReLoRA. Settings: preset < --config < flags < --set.",
    )
    p.add_argument("--preset", choices=["micro", "tiny", "small"], help="model size (default micro)")
    p.add_argument("--method", choices=["full", "relora"], help="full-rank or ReLoRA (default full)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--config", type=Path, help="YAML or JSON file of settings")
    p.add_argument(
        "--init-from",
        metavar="RUN_DIR[@STEP]",
        help="start from another run's dense weights (e.g. a full-rank warm start) instead of a fresh init",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted for sections (lr=1e-3, model.d_model=128, relora.rank=8); repeatable",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete checkpoint, with its stored settings; "
        "--steps N (more than stored) extends it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``dynamics train``: resolve the config, train into ``--out``; exit status 0.

    With ``--resume`` only the settings typed on this command line (or in its
    ``--config``) are compared with the stored run: a bare ``--resume`` continues it exactly.
    """
    from trainer.config import build_config
    from trainer.distributed import is_main_process
    from trainer.runtime import threads_hint
    from trainer.train import train

    cfg = build_config(  # records what was given (cfg.given): what train compares on --resume
        preset=args.preset,
        file=args.config,
        cli={"method": args.method, "steps": args.steps, "init_from": args.init_from},
        overrides=args.overrides,
    )
    threads_hint()
    out = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        print(f"run written to {out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is complete and the process group is left. Skip the interpreter's and C++'s exit-time
        # destructors: with gloo (torch 2.13) a rank can abort there ("terminate called without an active
        # exception", exit -6) about one run in ten after a successful run, failing the whole torchrun job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``dynamics evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="validation loss/perplexity and minimal-pair accuracy per checkpoint",
        description="Evaluate every checkpoint of a run: validation loss and perplexity, and minimal-pair "
        "accuracy per phenomenon on the built-in grammar's pairs and on BLiMP-format JSONL files.",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument(
        "--blimp",
        type=Path,
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="BLiMP-format minimal pairs (sentence_good, sentence_bad[, UID]); repeatable",
    )
    p.add_argument("--steps", type=int, nargs="+", help="only these checkpoint steps")
    p.add_argument("--out", type=Path, help="write the long table here (.csv or .parquet)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``dynamics evaluate``: the long table to ``--out`` (optional) and a metric x step view on stdout."""
    from trainer.evaluate import evaluate_run

    table = evaluate_run(args.run, blimp=args.blimp, steps=args.steps, device=args.device)
    if args.out is not None:
        write_table(table, args.out)
        print(f"wrote {args.out}")
    is_pair = table["metric"] == "pair_acc"
    col = table["metric"].where(~is_pair, table["source"] + ":" + table["phenomenon"].astype(str))
    wide = table.assign(col=col)
    wide = wide.pivot_table(index="col", columns="step", values="value", aggfunc="first")
    wide.index.name, wide.columns.name = "metric \\ step", None
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` atomically as ``.parquet`` or ``.csv`` (by suffix); another suffix is a ConfigError."""
    from trainer.atomic import atomic_write

    if path.suffix == ".parquet":
        atomic_write(path, lambda p: table.to_parquet(p, index=False))
    elif path.suffix == ".csv":
        atomic_write(path, lambda p: table.to_csv(p, index=False))
    else:
        raise ConfigError(f"--out must end in .csv or .parquet, got {str(path)!r}")


def add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``dynamics export``."""
    p = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face LlamaForCausalLM directory",
        description="Write one checkpoint as config.json + model.safetensors loadable by transformers' "
        "LlamaForCausalLM (ReLoRA runs: the effective weights W + s·B·A).",
    )
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="directory to create")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--to", choices=["hf"], default="hf", help="format (hf: Hugging Face LLaMA)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``dynamics export``: one checkpoint as a Hugging Face directory; exit status 0."""
    from trainer.hf import export_hf

    out = export_hf(args.run, args.out, step=args.step)
    print(f"exported {args.run} step {args.step if args.step is not None else 'latest'} to {out}")
    return 0


def add_batch_size(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``dynamics batch-size``."""
    p = sub.add_parser(
        "batch-size",
        help="largest micro-batch that fits on this GPU; batch_size/grad_accum for a target",
        description="Run real training steps of the configured model (ReLoRA-wrapped for --method relora, "
        "AdamW, bf16 autocast and torch.compile as the trainer would) on the CUDA device at "
        "growing micro-batches, doubling then bisecting, until memory runs out. Prints the "
        "largest micro-batch with its peak memory and the batch_size/grad_accum to use for "
        "--target-batch sequences per optimizer step. Needs a CUDA device.",
    )
    p.add_argument("--preset", choices=["micro", "tiny", "small"], default="tiny", help="model size (default tiny)")
    p.add_argument("--method", choices=["full", "relora"], help="full-rank or ReLoRA (default full)")
    p.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: the model's context, 2048 for tiny/small)"
    )
    p.add_argument(
        "--target-batch",
        type=int,
        default=1024,
        help="sequences per optimizer step to split into micro-batches (default 1024, the study's)",
    )
    p.add_argument("--limit", type=int, help="largest micro-batch to try (default: --target-batch)")
    p.add_argument("--config", type=Path, help="YAML or JSON file of settings")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting as in `dynamics train` (compile=false, relora.rank=8, precision=fp32 ...); repeatable",
    )
    p.set_defaults(func=cmd_batch_size)


def cmd_batch_size(args: argparse.Namespace) -> int:
    """Run ``dynamics batch-size`` on the CUDA device; exit status 0, or 1 when not even one sequence fits."""
    import torch

    from trainer.config import build_config

    if not torch.cuda.is_available():
        raise ConfigError(
            "dynamics batch-size measures GPU memory and needs a CUDA device; none is available on this "
            "machine (on a CPU memory is rarely the limit: keep the preset's batch_size)"
        )
    for flag, value in (("--target-batch", args.target_batch), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    cfg = build_config(
        preset=args.preset,
        file=args.config,
        cli={"method": args.method, "seq_len": args.seq_len},
        overrides=args.overrides,
    )
    from trainer.batch_size import GIB, measure_batch_size
    from trainer.runtime import resolve_device

    device = resolve_device(cfg.device)
    if device.type != "cuda":
        raise ConfigError(f"dynamics batch-size needs a CUDA device, got device={cfg.device!r}; drop that setting")

    def echo(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(
        f"trying micro-batches of {cfg.preset} {cfg.method} ({cfg.context} tokens per sequence) on {device}:",
        file=sys.stderr,
        flush=True,
    )
    try:
        r = measure_batch_size(cfg, target_batch=args.target_batch, limit=args.limit, device=device, echo=echo)
    except MemoryError as e:
        print(f"error: {e}; try a shorter --seq-len", file=sys.stderr)
        return 1

    def gib(n_bytes: int | None) -> str:
        return "?" if n_bytes is None else f"{n_bytes / GIB:.2f}"

    mode = f"{'bf16 autocast' if r.bf16 else 'float32'}, {'compiled' if r.compiled else 'eager'}"
    capped = " (the search limit; more may fit: raise --limit)" if r.max_micro_batch == r.limit else ""
    print(f"{r.device_name}, {r.total_bytes / GIB:.1f} GiB; {cfg.preset} {cfg.method}, seq_len {r.seq_len}, {mode}")
    print(f"largest micro-batch: {r.max_micro_batch} sequences{capped}, peak {gib(r.max_peak_bytes)} GiB allocated")
    print(
        f"for {r.target_batch} sequences per step: --set batch_size={r.target_batch} --set grad_accum={r.grad_accum} "
        f"(micro-batch {r.micro_batch}, peak {gib(r.peak_bytes)} GiB allocated)"
    )
    return 0
