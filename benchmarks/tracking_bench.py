"""Cost of experiment tracking at checkpoints and steps, as ratios (a script, not collected by pytest).

    .venv/bin/python benchmarks/tracking_bench.py                        # micro and tiny, full and relora, CPU
    .venv/bin/python benchmarks/tracking_bench.py --presets tiny small --set device=cuda

For each preset and method, one trainer in this process (capture off, no tracker) alternates,
``--repeats`` times: one training step, one checkpoint (``Trainer.save_checkpoint``: weights,
optimizer, RNG, manifest, hashes), and the weight-PER summary the trackers log at a checkpoint
(:func:`trainer.tracking.weight_per`: one batched ``svdvals`` per projection). Reported: the
medians and ``per / checkpoint`` (the summary's cost relative to the checkpoint it rides on) and
``per / step``. Also the cost of logging one step's record to TensorBoard
(:meth:`trainer.tracking.Trackers.log_record`) relative to a training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import tracking
from trainer.config import build_config
from trainer.relora import dense_state_dict
from trainer.train import Trainer


def measure(
    preset: str, method: str, *, repeats: int, seq_len: int, batch_size: int, extra: list[str], tmp: Path
) -> dict[str, Any]:
    overrides = [
        f"preset={preset}",
        f"method={method}",
        "steps=1000",
        f"seq_len={seq_len}",
        f"batch_size={batch_size}",
        "checkpoint_interval=1000",
        "eval_interval=1000",
        "eval_batches=1",
        "capture.enabled=false",
        "data.train_tokens=200000",
        "data.val_tokens=20000",
        *(["relora.merge_every=500"] if method == "relora" else []),
        *extra,
    ]
    t = Trainer(build_config(overrides=overrides), tmp / f"{preset}-{method}", progress=False, echo=lambda s: None)
    t.setup()  # writes the step-0 checkpoint (warm-up of the writer)
    tb = tracking.Trackers([tracking.TensorBoardTracker(tmp / f"{preset}-{method}-tb")])
    steps, saves, pers, logs = [], [], [], []
    n_layers = t.cfg.model.n_layers
    tracking.weight_per(dense_state_dict(t.model), n_layers)  # warm-up (first SVD call loads the LAPACK kernels)
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            record = t.train_step()
            t1 = time.perf_counter()
            t.save_checkpoint()
            t2 = time.perf_counter()
            dense = dense_state_dict(t.model)  # the checkpoint computed these already: not part of the PER cost
            tp = time.perf_counter()
            tracking.weight_per(dense, n_layers)
            t3 = time.perf_counter()
            tb.log_record(record)
            t4 = time.perf_counter()
            steps.append(t1 - t0)
            saves.append(t2 - t1)
            pers.append(t3 - tp)
            logs.append(t4 - t3)
    finally:
        tb.close()
        t.cleanup()
    step, save, per, log = (statistics.median(x) for x in (steps, saves, pers, logs))
    return {"preset": preset, "method": method, "step_s": step, "checkpoint_s": save, "per_s": per, "log_s": log}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    p.add_argument("--methods", nargs="+", default=["full", "relora"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--set", dest="extra", action="append", default=[], help="more key=value settings")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for method in args.methods:
                results.append(
                    measure(
                        preset,
                        method,
                        repeats=args.repeats,
                        seq_len=args.seq_len,
                        batch_size=args.batch_size,
                        extra=args.extra,
                        tmp=Path(tmp),
                    )
                )
    print(f"medians of {args.repeats}; seq_len {args.seq_len}, batch {args.batch_size}")
    print("| preset | method | step s | checkpoint s | weight PER s | PER / checkpoint | PER / step | TB log / step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['preset']} | {r['method']} | {r['step_s']:.4f} | {r['checkpoint_s']:.4f} | {r['per_s']:.4f} "
            f"| {r['per_s'] / r['checkpoint_s']:.3f} | {r['per_s'] / r['step_s']:.3f} | {r['log_s'] / r['step_s']:.4f} |"
        )
    return results


if __name__ == "__main__":
    main()
