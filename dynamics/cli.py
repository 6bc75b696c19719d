"""The ``dynamics`` command line.

``dynamics train``   train a run (full-rank or ReLoRA) into a run directory
``dynamics demo``    the main job: a tiny full-rank and ReLoRA pair on the built-in corpus

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamics", description="Learning dynamics of full-rank vs ReLoRA pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynamics`` console script; returns the exit status."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
