"""Benchmark: end-to-end ``dynamics analyze`` against the float64 ``svdvals`` floor of what it decomposes.

    python benchmarks/analyze_bench.py                      # trains a micro full-rank + ReLoRA pair, measures
    python benchmarks/analyze_bench.py --preset tiny        # a tiny-shaped pair (few steps, small batch)
    python benchmarks/analyze_bench.py --run RUN [--run RUN] --json bench.json
    python benchmarks/analyze_bench.py --profile            # also a cProfile top 25 (cumulative and own time)
    python benchmarks/analyze_bench.py --preset small --repeats 1   # small-shaped, study-like checkpoints: s each
    python benchmarks/analyze_bench.py --preset tiny --compression  # capture compression: write, size, read

In one process, on the same runs, with the same torch thread count:

* end to end -- ``dynamics.analyze.analyze_runs`` with the default options (everything on), a fresh cache
  each repeat (minimum over ``--repeats``);
* floor -- one float64 ``torch.linalg.svdvals`` of every matrix the analysis gives spectral-metric rows:
  every dense weight matrix of every checkpoint (``weight``), its updates against the previous checkpoint
  (``update``), the first (``update_cumulative``) and, for ReLoRA merge steps, the previous merge
  (``update_merge``) -- once per checkpoint differenced against, since analyze computes kinds that coincide
  (the second checkpoint's update and cumulative update) once -- the captured gradients (``grad``) and the
  centred activations (``tokens × features``) of the default sites (``act``). The matrices are read with :mod:`dynamics.io` before timing (reading is
  not in the floor). Not in the floor: the per-head OV/QK circuits and LoRA updates (factored, tiny cores),
  the singular vectors of the subspace rows, the CCA and cross-run decompositions: those count as cost
  above the floor, as the issue's goal does;
* ratio -- end to end / floor (the issue's goal: <= 1.5);
* phases -- wall seconds of the timed analyze spent in the units' weight rows (spectra, sparsity, updates,
  subspaces, circuits), capture rows (gradients, activations, CKA/CCA), the checks of a unit's files (sha256 and
  finiteness; a cross-run unit's own finiteness check is counted here and in its phase), the cross-run units, and the rest (opening runs, cache keys, writing and assembling the tables); per unit: the
  slowest and the mean seconds of one checkpoint (the issue's ``small`` goal: one checkpoint <= 10 s);
* peak memory -- the process's resident-set high-water mark during one analyze (Linux ``VmHWM`` of
  ``/proc/self/status``, reset through ``/proc/self/clear_refs`` just before; elsewhere ``ru_maxrss``,
  which also counts what ran before), and the resident set before it.

``analyze_runs`` sets torch's thread count of the process to ``$DYNAMICS_WORKER_THREADS`` (default 1) in
each unit, and ``$DYNAMICS_LARGE_MATRIX_THREADS`` (default: the usable cores // workers): a unit's cores. With more
than one, a unit runs its weight components and its captures as tasks on that many threads, one torch thread each
(:func:`dynamics.analyze.unit_threads`); with one, one part after another. The benchmark sets both (``--threads``,
``--large-threads``); the floor decomposes each matrix with the same counts (times ``--workers``: the large
matrices with the unit's cores), and also on a pool of that many threads with one torch thread each, and takes
the faster.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynamics._malloc import one_arena

one_arena()  # as `dynamics analyze` does, before pandas is imported: every thread uses glibc's main arena
from dynamics.analyze import (  # noqa: E402
    DEFAULT_ACT_SITES,
    LARGE_MATRIX_ENTRIES,
    LARGE_THREADS_ENV,
    AnalysisOptions,
    analyze_runs,
    default_large_threads,
    merge_chain,
    unit_threads,
)
from dynamics.io import open_run  # noqa: E402
from dynamics.validation import DynamicsError  # noqa: E402

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
    "small": [  # like a study checkpoint: each later one differs from the previous, the first and the last merge
        "steps=8",
        "checkpoint_interval=2",
        "eval_interval=8",
        "seq_len=64",
        "batch_size=2",
        "warmup_steps=1",
        "data.train_tokens=100000",
        "data.val_tokens=10000",
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
RELORA = ["method=relora", "relora.rank=8", "relora.alpha=16", "relora.lr_restart_warmup=1"]
#: ReLoRA merge period per preset: ``small`` merges every other checkpoint, so that its merge units difference
#: against two earlier merges and its other units against checkpoints that differ, as in a study.
MERGE_EVERY = {"micro": 2, "tiny": 2, "small": 4}


def train_pair(preset: str, root: Path) -> list[Path]:
    """A full-rank and a ReLoRA run of ``preset`` under ``root`` (reused when already there)."""
    from trainer.config import build_config
    from trainer.train import train

    runs = []
    for method, extra in (("full", []), ("relora", [*RELORA, f"relora.merge_every={MERGE_EVERY[preset]}"])):
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
                # each checkpoint differenced against once: coinciding kinds (the second checkpoint's update and
                # cumulative update, a merge one checkpoint after the previous one) share one matrix in analyze too
                for other in dict.fromkeys(
                    (steps[i - 1] if i else None, first if step != first else None, *merges[:1])
                ):
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


def time_floor(mats: list[np.ndarray], repeats: int, threads: int, large_threads: int, pool: int = 1) -> float:
    """Minimum over ``repeats`` of the wall time of one float64 ``svdvals`` per matrix (seconds), with ``threads``
    torch threads, and ``large_threads`` for matrices of at least ``LARGE_MATRIX_ENTRIES`` entries (as analyze).
    A wide matrix is decomposed as its transpose (the same values; LAPACK is up to 3.9x faster on the tall form,
    and analyze does the same), so the floor is the cheapest plain ``svdvals`` call.

    With ``pool`` > 1 (analyze's units run their parts on that many threads, :func:`dynamics.analyze.unit_threads`)
    the matrices are also decomposed on a pool of ``pool`` threads with one torch thread each, the same cores used
    as analyze uses them; the floor is the faster of the two ways."""
    tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in mats]

    def one(t: torch.Tensor) -> None:
        torch.linalg.svdvals(t.mT if t.shape[-2] < t.shape[-1] else t)  # wide: as its (faster) transpose

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in tensors:
            torch.set_num_threads(large_threads if t.numel() >= LARGE_MATRIX_ENTRIES else threads)
            one(t)
        best = min(best, time.perf_counter() - t0)
        if pool > 1:
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=pool) as ex:
                list(ex.map(one, sorted(tensors, key=lambda t: -t.numel())))  # largest first: balanced
            best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return best


#: Capture-file compression settings measured by ``--compression`` (``capture.compression`` / ``compression_level``).
COMPRESSIONS: list[tuple[str, int | None]] = [("none", None), ("lzf", None), ("gzip", 1), ("gzip", 4), ("gzip", 9)]


def compression_table(files: list[Path], repeats: int) -> list[dict[str, Any]]:
    """Write cost, size and read cost of the datasets of real capture ``files`` under each of :data:`COMPRESSIONS`.

    Every dataset (probe, act, act_in, grad, weight groups) is rewritten as the capture writer does
    (:mod:`trainer.capture.store`: chunks of whole rows of about ``CHUNK_BYTES``, Fletcher-32, byte shuffle with a
    filter), into an in-memory HDF5 file (as the writer builds it) that is then written to disk; reading opens the
    file and reads every dataset back (what analysis does). Minimum over ``repeats``; page cache warm.
    """
    import h5py

    from trainer.capture.store import CHUNK_BYTES

    data: list[tuple[str, np.ndarray]] = []
    for f in files:
        with h5py.File(f, "r") as h:
            prefix = f"{f.parent.parent.name}/{f.stem}"
            h.visititems(lambda n, o: data.append((f"{prefix}/{n}", o[()])) if isinstance(o, h5py.Dataset) else None)
    raw = sum(a.nbytes for _, a in data)
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="compression_"))
    try:
        for comp, level in COMPRESSIONS:
            path = tmp / f"{comp}{level or ''}.h5"
            write_s = read_s = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                buf = io.BytesIO()
                with h5py.File(buf, "w") as h:
                    for name, a in data:
                        if a.ndim == 0:
                            h.create_dataset(name, data=a)
                            continue
                        rows = max(1, min(a.shape[0], CHUNK_BYTES // max(1, int(np.prod(a.shape[1:])) * a.itemsize)))
                        kw: dict[str, Any] = {"chunks": (rows, *a.shape[1:]), "fletcher32": True}
                        if comp != "none":
                            kw.update(compression=comp, shuffle=True)
                            if level is not None:
                                kw["compression_opts"] = level
                        h.create_dataset(name, data=a, **kw)
                path.write_bytes(buf.getbuffer())
                write_s = min(write_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                with h5py.File(path, "r") as h:
                    for name, _ in data:
                        h[name][()]
                read_s = min(read_s, time.perf_counter() - t0)
            size = path.stat().st_size
            out.append(
                {
                    "compression": comp if level is None else f"{comp} {level}",
                    "write_s": write_s,
                    "read_s": read_s,
                    "mib": size / 2**20,
                    "ratio_to_raw": size / raw,
                    "raw_mib": raw / 2**20,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


#: (module attribute, phase) timed by :func:`analyze_once`: the parts of a unit, and the cross-run unit.
PHASES = [
    ("_weight_rows", "weight rows"),
    ("_capture_rows", "capture rows"),
    ("_run_cross_cached", "cross-run units"),
]


def analyze_once(runs: list[Path], out: Path, workers: int = 1) -> tuple[float, int, dict[str, float], list[float]]:
    """One ``analyze_runs`` with a fresh cache: (seconds, rows, seconds per phase, seconds per checkpoint unit).

    Phases (:data:`PHASES`, plus ``file checks`` -- :meth:`_RunView.verify` and ``require_finite`` -- and ``rest``)
    are timed by wrapping those functions of :mod:`dynamics.analyze` for this call (one process: ``workers=1``;
    with more workers the units run in other processes and only ``rest`` -- everything -- is timed). They are busy
    seconds: a unit with a thread pool (:func:`dynamics.analyze.unit_threads`) runs its capture rows beside its
    weight rows, so phases may add up to more than the end-to-end time.
    """
    import dynamics.analyze as an

    phases = dict.fromkeys([p for _, p in PHASES] + ["file checks"], 0.0)
    units: list[float] = []
    saved = {name: getattr(an, name) for name, _ in PHASES}
    saved_unit = an.analyze_unit
    saved_checks = (an._RunView.verify, an._RunView.require_finite)

    def timed(fn: Any, phase: str, sink: list[float] | None = None) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                if sink is None:
                    phases[phase] += dt
                else:
                    sink.append(dt)

        return wrapper

    if workers <= 1:  # the wrappers cannot travel to worker processes (closures do not pickle)
        for name, phase in PHASES:
            setattr(an, name, timed(saved[name], phase))
        an.analyze_unit = timed(saved_unit, "", units)
        an._RunView.verify = timed(saved_checks[0], "file checks")
        an._RunView.require_finite = timed(saved_checks[1], "file checks")
    an._VERIFIED.clear()  # a fresh process would hash each file once: so does every timed call
    an._nonfinite_tensor.cache_clear()
    shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
    try:
        t0 = time.perf_counter()
        table, errors = analyze_runs(runs, out, options=AnalysisOptions(), progress=False, workers=workers)
        elapsed = time.perf_counter() - t0
    finally:
        for name, _ in PHASES:
            setattr(an, name, saved[name])
        an.analyze_unit = saved_unit
        an._RunView.verify, an._RunView.require_finite = saved_checks
    if errors:
        raise SystemExit(f"analyze failed: {errors}")
    # rest: what no unit did (opening runs, cache keys, writing and assembling the tables); the phases above are
    # busy seconds, and with a unit's thread pool its capture rows run beside its weight rows, so they overlap
    phases["rest"] = max(0.0, elapsed - sum(units) - phases["cross-run units"]) if units else elapsed
    return elapsed, len(table), phases, units


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="micro", help="shape of the trained pair")
    ap.add_argument("--run", type=Path, action="append", help="analyse these run directories instead of training")
    ap.add_argument("--workdir", type=Path, help="where runs are trained and tables written (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of each timing (minimum taken)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both timings")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="analyze's worker processes (--threads each); the floor then runs with workers x threads torch threads",
    )
    ap.add_argument(
        "--large-threads",
        type=int,
        help="a unit's cores (default: what analyze picks, the usable cores // --workers): its thread pool, or with 1 "
        "the torch threads of matrices of >= LARGE_MATRIX_ENTRIES entries; the floor uses the same",
    )
    ap.add_argument(
        "--profile", action="store_true", help="print a cProfile top 25 (cumulative, own time) of one analyze"
    )
    ap.add_argument(
        "--compression", action="store_true", help="also measure capture compression (write, size, read) on the runs"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.workers < 1:
        ap.error("--repeats, --threads and --workers must be >= 1")

    os.environ["DYNAMICS_WORKER_THREADS"] = str(args.threads)  # what analyze_runs sets in each unit
    if args.large_threads is None:  # analyze's own choice
        args.large_threads = default_large_threads(args.workers)
    os.environ[LARGE_THREADS_ENV] = str(args.large_threads)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="analyze_bench_")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in args.run] if args.run else train_pair(args.preset, args.workdir)
    out = args.workdir / "bench_results.parquet"

    analyze_once(runs, out, args.workers)  # warm-up: imports, first-call costs (not timed)
    rss_before = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    e2e, rows, phases, units = analyze_once(runs, out, args.workers)
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.repeats - 1):
        again = analyze_once(runs, out, args.workers)
        if again[0] < e2e:
            e2e, rows, phases, units = again

    mats = decomposed_matrices(runs)
    # the floor uses the cores analyze used: workers x threads, workers x large_threads for large matrices
    pool = unit_threads(None) * args.workers  # every unit runs its parts on a pool of threads (analyze.unit_threads)
    floor = time_floor(mats, args.repeats, args.threads * args.workers, args.large_threads * args.workers, pool)
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {
        "runs": [str(r) for r in runs],
        "preset": None if args.run else args.preset,
        "threads": args.threads,
        "large_threads": args.large_threads,
        "workers": args.workers,
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
        "phases_s": phases,
        "unit_max_s": max(units) if units else None,
        "unit_mean_s": sum(units) / len(units) if units else None,
        "units": len(units),
    }
    print(
        f"analyze_bench: {len(runs)} runs, {rows} rows, {len(mats)} matrices, {args.workers} worker(s) x "
        f"{args.threads} torch threads, {args.large_threads} for large matrices (floor: the same)"
    )
    print(f"{'end to end':>22} {e2e:9.3f} s")
    print(f"{'float64 svdvals floor':>22} {floor:9.3f} s")
    print(f"{'ratio (goal <= 1.5)':>22} {e2e / floor:9.2f} x")
    if peak is not None:
        print(
            f"{'peak RSS':>22} {peak / 1024:9.1f} MiB ({res['peak_rss_kind']}; before: {res['rss_before_mib']:.1f} MiB)"
        )
    for phase, seconds in phases.items():
        print(f"{phase:>22} {seconds:9.3f} s  ({seconds / floor:5.2f} x floor)")
    if units:  # timed in this process (workers=1)
        print(
            f"{'one checkpoint':>22} {max(units):9.3f} s slowest, {sum(units) / len(units):.3f} s mean of {len(units)}"
        )

    if args.profile:
        shutil.rmtree(out.with_name(out.name + ".cache"), ignore_errors=True)
        prof = cProfile.Profile()
        prof.enable()
        analyze_runs(runs, out, options=AnalysisOptions(), progress=False)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue())
        res["profile_top25"] = buf.getvalue()
    if args.compression:
        files = sorted(f for r in runs for f in (r / "dynamics").glob("step_*.h5"))
        table = compression_table(files, args.repeats)
        res["compression"] = table
        print(f"capture compression: {len(files)} files, {table[0]['raw_mib']:.1f} MiB of datasets")
        print(f"{'compression':>12} {'write s':>9} {'read s':>9} {'MiB':>9} {'of raw':>7}")
        for row in table:
            print(
                f"{row['compression']:>12} {row['write_s']:9.3f} {row['read_s']:9.3f} {row['mib']:9.1f} "
                f"{row['ratio_to_raw']:7.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
