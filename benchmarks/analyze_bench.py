"""Benchmark: end-to-end ``dynamics analyze`` against the float64 ``svdvals`` floor of what it decomposes.

    python benchmarks/analyze_bench.py                      # trains a micro full-rank + ReLoRA pair, measures
    python benchmarks/analyze_bench.py --preset tiny        # a tiny-shaped pair (few steps, small batch)
    python benchmarks/analyze_bench.py --run RUN [--run RUN] --json bench.json
    python benchmarks/analyze_bench.py --profile            # also a cProfile top 20 (cumulative) of one analyze

In one process, on the same runs, with the same torch thread count:

* end to end -- ``dynamics.analyze.analyze_runs`` with the default options (everything on), a fresh cache
  each repeat (minimum over ``--repeats``);
* floor -- one float64 ``torch.linalg.svdvals`` of every matrix the analysis gives spectral-metric rows:
  every dense weight matrix of every checkpoint (``weight``), its updates against the previous checkpoint
  (``update``), the first (``update_cumulative``) and, for ReLoRA merge steps, the previous merge
  (``update_merge``), the captured gradients (``grad``) and the centred activations (``tokens × features``)
  of the default sites (``act``). The matrices are read with :mod:`dynamics.io` before timing (reading is
  not in the floor). Not in the floor: the per-head OV/QK circuits and LoRA updates (factored, tiny cores),
  the singular vectors of the subspace rows, the CCA and cross-run decompositions: those count as cost
  above the floor, as the issue's goal does;
* ratio -- end to end / floor (the issue's goal: <= 1.5);
* peak memory -- the process's resident-set high-water mark during one analyze (Linux ``VmHWM`` of
  ``/proc/self/status``, reset through ``/proc/self/clear_refs`` just before; elsewhere ``ru_maxrss``,
  which also counts what ran before), and the resident set before it.

``analyze_runs`` sets torch's thread count of the process to ``$DYNAMICS_WORKER_THREADS`` (default 1) in
each unit; the benchmark sets that variable and torch to ``--threads`` so both timings use the same count.
Not collected by pytest (not under tests/, not named test_*).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynamics.analyze import DEFAULT_ACT_SITES, AnalysisOptions, analyze_runs, merge_chain
from dynamics.io import open_run
from dynamics.validation import DynamicsError

#: Training settings per preset: a few checkpoints (and captures) of a short run, small batch.
PRESETS: dict[str, list[str]] = {
    "micro": [
        "steps=8",
        "checkpoint_interval=4",
        "eval_interval=4",
        "seq_len=32",
        "batch_size=8",
        "warmup_steps=1",
        "data.train_tokens=40000",
        "data.val_tokens=4000",
        "eval_batches=1",
    ],
    "tiny": [
        "steps=4",
        "checkpoint_interval=2",
        "eval_interval=4",
        "seq_len=64",
        "batch_size=4",
        "warmup_steps=1",
        "data.train_tokens=200000",
        "data.val_tokens=20000",
        "eval_batches=1",
    ],
}
RELORA = ["method=relora", "relora.rank=8", "relora.alpha=16", "relora.merge_every=2", "relora.lr_restart_warmup=1"]


def train_pair(preset: str, root: Path) -> list[Path]:
    """A full-rank and a ReLoRA run of ``preset`` under ``root`` (reused when already there)."""
    from trainer.config import build_config
    from trainer.train import train

    runs = []
    for method, extra in (("full", []), ("relora", RELORA)):
        d = root / f"{preset}_{method}"
        if not (d / "manifest.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            train(build_config(preset=preset, overrides=PRESETS[preset] + extra), d, progress=False)
        runs.append(d)
    return runs


def decomposed_matrices(runs: list[Path], act_sites: tuple[str, ...] = DEFAULT_ACT_SITES) -> list[np.ndarray]:
    """Every float64 matrix the floor decomposes (see the module docstring), read with :mod:`dynamics.io`."""
    mats: list[np.ndarray] = []
    for path in runs:
        run = open_run(path)
        steps, first = run.steps, run.steps[0]
        for i, step in enumerate(steps):
            names = [n for n in run.names("weight", step) if not n.endswith(("norm", ".lora_a", ".lora_b"))]
            merges = merge_chain(run, step)
            for name in names:
                w = run.weights(step, name)[name]
                if w.ndim != 2:
                    continue
                mats.append(w.astype(np.float64))
                for other in (steps[i - 1] if i else None, first if step != first else None, *merges[:1]):
                    if other is not None:
                        mats.append(w.astype(np.float64) - run.weights(other, name)[name].astype(np.float64))
            if step not in run.capture_steps:
                continue
            mats += [g.astype(np.float64) for g in run.get("grad", step).values()]
            for site in act_sites:
                kind, _, pattern = site.partition(":")
                try:
                    acts = run.get(kind, step, pattern)
                except DynamicsError:
                    continue  # site not captured
                for x in acts.values():
                    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                    mats.append(x - x.mean(axis=0, keepdims=True))
    return mats


def time_floor(mats: list[np.ndarray], repeats: int) -> float:
    """Minimum over ``repeats`` of the wall time of one float64 ``svdvals`` per matrix (seconds)."""
    tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in mats]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in tensors:
            torch.linalg.svdvals(t)
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") is not None


def analyze_once(runs: list[Path], out: Path) -> tuple[float, int]:
    """One ``analyze_runs`` with a fresh cache: (seconds, rows)."""
    shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
    t0 = time.perf_counter()
    table, errors = analyze_runs(runs, out, options=AnalysisOptions(), progress=False)
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"analyze failed: {errors}")
    return elapsed, len(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="micro", help="shape of the trained pair")
    ap.add_argument("--run", type=Path, action="append", help="analyse these run directories instead of training")
    ap.add_argument("--workdir", type=Path, help="where runs are trained and tables written (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of each timing (minimum taken)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both timings")
    ap.add_argument("--profile", action="store_true", help="print a cProfile top 20 (cumulative) of one analyze")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")

    os.environ["DYNAMICS_WORKER_THREADS"] = str(args.threads)  # what analyze_runs sets in each unit
    torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="analyze_bench_")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in args.run] if args.run else train_pair(args.preset, args.workdir)
    out = args.workdir / "bench_results.parquet"

    analyze_once(runs, out)  # warm-up: imports, first-call costs (not timed)
    rss_before = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    e2e, rows = analyze_once(runs, out)
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.repeats - 1):
        e2e = min(e2e, analyze_once(runs, out)[0])

    mats = decomposed_matrices(runs)
    floor = time_floor(mats, args.repeats)
    res: dict[str, Any] = {
        "runs": [str(r) for r in runs],
        "preset": None if args.run else args.preset,
        "threads": args.threads,
        "rows": rows,
        "matrices": len(mats),
        "matrix_entries": int(sum(m.size for m in mats)),
        "end_to_end_s": e2e,
        "floor_s": floor,
        "ratio": e2e / floor,
        "peak_rss_mib": None if peak is None else peak / 1024,
        "peak_rss_kind": "VmHWM (reset before analyze)" if exact_peak else "ru_maxrss (whole process)",
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "floor_matrices_mib": sum(m.nbytes for m in mats) / 2**20,
    }
    print(f"analyze_bench: {len(runs)} runs, {rows} rows, {len(mats)} matrices, {args.threads} torch threads")
    print(f"{'end to end':>22} {e2e:9.3f} s")
    print(f"{'float64 svdvals floor':>22} {floor:9.3f} s")
    print(f"{'ratio (goal <= 1.5)':>22} {e2e / floor:9.2f} x")
    if peak is not None:
        print(
            f"{'peak RSS':>22} {peak / 1024:9.1f} MiB ({res['peak_rss_kind']}; before: {res['rss_before_mib']:.1f} MiB)"
        )

    if args.profile:
        shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
        prof = cProfile.Profile()
        prof.enable()
        analyze_runs(runs, out, options=AnalysisOptions(), progress=False)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(20)
        print(buf.getvalue())
        res["profile_top20"] = buf.getvalue()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
