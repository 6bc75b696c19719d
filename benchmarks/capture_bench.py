"""Capture overhead and disk bytes per checkpoint (a script, not collected by pytest).

    .venv/bin/python benchmarks/capture_bench.py                  # tiny, seq_len 128, batch 8, capture every 100 steps
    .venv/bin/python benchmarks/capture_bench.py --end-to-end     # also two whole 100-step runs per repeat, A/B
    .venv/bin/python benchmarks/capture_bench.py --seq-len 2048 --batch-size 16 --set device=cuda

Default (interleaved) mode, robust on a shared machine: one trainer, in this
process; each repeat times ``--block`` training steps, then one synchronous
capture (pass + HDF5 write + sha256 + manifest update, ``Capturer.capture``),
then one capture as the trainer makes it (``Capturer.submit``: the pass in the
training thread, the write on the background writer) followed by training
steps until the write is done. Overhead of capturing every ``--every`` steps:
synchronous = median capture time / (``--every`` × median step time);
background = (training-thread time of the submission + the steps' slowdown
while the write runs + any wait at the next checkpoint, if the write outlasts
``--every`` steps) / (``--every`` × median step time).
``--end-to-end`` also trains the same ``--every``-step run with capture off and
on (one capture at the end), interleaved, and compares ``Trainer.run`` times
(the training thread's time: the end capture's background write finishes in
``cleanup``, outside it).
Also prints the measured file size and the uncompressed bytes per capture file
of the default settings at each preset (``trainer.capture.estimate_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.capture import estimate_bytes
from trainer.config import build_config
from trainer.train import Trainer


def timed_run(overrides: list[str], out: Path) -> tuple[float, Trainer]:
    t = Trainer(build_config(overrides=overrides), out, progress=False, echo=lambda s: None)
    t.setup()
    t0 = time.perf_counter()
    t.run()
    elapsed = time.perf_counter() - t0
    t.cleanup()
    return elapsed, t


def interleaved(base: list[str], out: Path, *, every: int, block: int, repeats: int) -> dict[str, object]:
    t = Trainer(build_config(overrides=base), out, progress=False, echo=lambda s: None)
    t.setup()  # includes the step-0 checkpoint and capture (warm-up)
    # Capturer.submit lists at the trainer's step, which has no checkpoint entry here: the file stays unlisted
    warnings.filterwarnings("ignore", message="capture at step .* has no checkpoint entry")
    steps, captures, submits, writes, during, waits = [], [], [], [], [], []
    for _ in range(repeats):
        for _ in range(block):
            t0 = time.perf_counter()
            t.train_step()
            steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        record = t.capturer.capture(t.model, t.training_state(), t.device)
        # the manifest update, as on a checkpoint (entry 0 exists)
        t.capturer._list(dataclasses.replace(record, step=0))
        captures.append(time.perf_counter() - t0)
        # as the trainer does it: the pass here, the write in the background while training goes on
        t0 = time.perf_counter()
        t.capturer.submit(t.model, t.training_state(), t.device)
        t1 = time.perf_counter()
        submits.append(t1 - t0)
        n_during = 0
        while t.capturer._writer.running and n_during < every:
            s0 = time.perf_counter()
            t.train_step()
            during.append(time.perf_counter() - s0)
            n_during += 1
        t2 = time.perf_counter()
        t.capturer.flush()  # what the next checkpoint would wait (0 unless the write outlasts `every` steps)
        waits.append(time.perf_counter() - t2)
        writes.append(time.perf_counter() - t1)
    t.cleanup()
    step_s, capture_s = statistics.median(steps), statistics.median(captures)
    submit_s, wait_s = statistics.median(submits), statistics.median(waits)
    slowdown = (statistics.median(during) - step_s) if during else 0.0  # per step run alongside the write
    steps_per_write = len(during) / repeats
    background = submit_s + slowdown * steps_per_write + wait_s
    return {
        "step_s": step_s,
        "capture_s": capture_s,
        "overhead": capture_s / (every * step_s),
        "submit_s": submit_s,
        "write_s": statistics.median(writes),
        "slowdown_s": slowdown,
        "steps_per_write": steps_per_write,
        "wait_s": wait_s,
        "overhead_background": background / (every * step_s),
        "bytes": record.bytes,
        "steps": steps,
        "captures": captures,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--every", type=int, default=100, help="capture interval in steps (default 100)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block", type=int, default=5, help="training steps timed between two captures")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--end-to-end", action="store_true", help="also time whole runs with capture off and on")
    p.add_argument("--set", dest="extra", action="append", default=[], help="more key=value settings")
    args = p.parse_args(argv)

    base = [
        f"preset={args.preset}",
        f"steps={args.every}",
        f"seq_len={args.seq_len}",
        f"batch_size={args.batch_size}",
        f"checkpoint_interval={args.every}",
        f"eval_interval={args.every}",
        "eval_batches=2",
        "data.train_tokens=400000",
        "data.val_tokens=40000",
    ] + args.extra
    cfg = build_config(overrides=base)
    print(f"settings: {' '.join(base)}  (torch threads: {__import__('torch').get_num_threads()})")
    print(f"capture: {cfg.capture}")
    with tempfile.TemporaryDirectory() as tmp:
        r = interleaved(base, Path(tmp) / "interleaved", every=args.every, block=args.block, repeats=args.repeats)
        print(f"\n| measured (median of {len(r['steps'])} steps, {len(r['captures'])} captures) | seconds |")
        print("|---|---|")
        print(f"| one training step | {r['step_s']:.3f} |")
        print(f"| one capture, synchronous (pass + write + hash + manifest) | {r['capture_s']:.3f} |")
        print(f"| one capture, background: training thread (pass + hand-off) | {r['submit_s']:.3f} |")
        print(f"| background write (wall, while {r['steps_per_write']:.1f} steps train) | {r['write_s']:.3f} |")
        print(f"| slowdown of a step trained during the write | {r['slowdown_s']:+.3f} |")
        print(f"| {args.every} steps + one capture: capture overhead, synchronous | {100 * r['overhead']:.1f}% |")
        print(
            f"| {args.every} steps + one capture: capture overhead, background | "
            f"{100 * r['overhead_background']:.1f}% |"
        )
        print(
            f"| capture file on disk | {r['bytes'] / 1e6:.2f} MB (uncompressed estimate "
            f"{estimate_bytes(cfg)['total'] / 1e6:.2f} MB) |"
        )
        if args.end_to_end:
            times: dict[str, list[float]] = {"off": [], "on": []}
            for i in range(2):
                for mode in ("off", "on"):
                    elapsed, _ = timed_run(
                        base + [f"capture.enabled={'true' if mode == 'on' else 'false'}"], Path(tmp) / f"{mode}{i}"
                    )
                    times[mode].append(elapsed)
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            print(
                f"\nend to end, {args.every} steps + checkpoint: no capture {off:.1f} s {times['off']}, "
                f"capture {on:.1f} s {times['on']}: {100 * (on - off) / off:+.1f}%"
            )
    print(
        "\n| preset (default capture settings, full context) | activations MB | gradients MB | total MB | 200 checkpoints GB |"
    )
    print("|---|---|---|---|---|")
    for preset in ("micro", "tiny", "small"):
        e = estimate_bytes(build_config(preset=preset))
        print(
            f"| {preset} | {e['act'] / 1e6:.1f} | {e['grad'] / 1e6:.1f} | {e['total'] / 1e6:.1f} | {200 * e['total'] / 1e9:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
