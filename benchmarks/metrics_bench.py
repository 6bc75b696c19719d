"""Benchmark: the full metric set for every matrix of a `small`-preset model.

    python benchmarks/metrics_bench.py            # full: 12 layers + 50304 x 384 embed / lm_head
    python benchmarks/metrics_bench.py --quick    # 2 layers, vocab 8192: a smoke run in seconds

Random float32 matrices with the shapes of the `small` preset (d_model 384, 12
query heads, 4 KV heads, head_dim 32, MLP hidden 1536, vocab 50304, untied
lm_head) are timed three ways, in the same process:

* floor  -- one ``torch.linalg.svdvals`` per matrix, on the float32 matrix as
  given (the least any metric code can do);
* ours   -- ``dynamics.spectrum_metrics(M)``: validation (finiteness), one
  singular-value computation (float64; Gram route for strongly rectangular
  matrices) and every metric;
* naive  -- a full SVD with vectors (``torch.linalg.svd``, reduced) per metric,
  as some analysis tools do.

Targets: ours <= 1.3x the floor, and >= 5x faster than naive.  Each timing is
the minimum over repeats.  Not collected by pytest (not under tests/, not
named test_*).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dynamics

D_MODEL, N_HEADS, N_KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 384, 12, 4, 32, 1536, 50304


def small_preset_matrices(*, layers: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 matrices with the small preset's shapes, keyed by canonical name."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {"embed": (vocab, D_MODEL)}
    for i in range(layers):
        shapes[f"layers.{i}.attn.q"] = (N_HEADS * HEAD_DIM, D_MODEL)
        shapes[f"layers.{i}.attn.k"] = (N_KV_HEADS * HEAD_DIM, D_MODEL)
        shapes[f"layers.{i}.attn.v"] = (N_KV_HEADS * HEAD_DIM, D_MODEL)
        shapes[f"layers.{i}.attn.o"] = (D_MODEL, N_HEADS * HEAD_DIM)
        shapes[f"layers.{i}.mlp.gate"] = (HIDDEN, D_MODEL)
        shapes[f"layers.{i}.mlp.up"] = (HIDDEN, D_MODEL)
        shapes[f"layers.{i}.mlp.down"] = (D_MODEL, HIDDEN)
    shapes["lm_head"] = (vocab, D_MODEL)
    return {name: torch.randn(*shape, generator=g) / math.sqrt(shape[1]) for name, shape in shapes.items()}


def floor(mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.linalg.svdvals(m) for name, m in mats.items()}


def ours(mats: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {name: dynamics.spectrum_metrics(m) for name, m in mats.items()}


def _naive_metric(metric: str, m: torch.Tensor) -> float:
    _, s, _ = torch.linalg.svd(m, full_matrices=False)  # vectors computed, then thrown away
    k = min(m.shape)
    if metric in ("effective_rank", "proportional_effective_rank", "spectral_entropy"):
        p = s / s.sum()
        h = -(p * torch.log(p)).sum()
        if metric == "spectral_entropy":
            return float(h / math.log(k))
        er = float(torch.exp(h))
        return er / k if metric == "proportional_effective_rank" else er
    if metric == "stable_rank":
        return float((s**2).sum() / s[0] ** 2)
    if metric == "numerical_rank":
        return int((s > s[0] * max(m.shape) * torch.finfo(m.dtype).eps).sum())
    if metric == "condition_number":
        return float(s[0] / s[-1])
    if metric == "log10_condition_number":
        return float(torch.log10(s[0] / s[-1]))
    raise KeyError(metric)


NAIVE_METRICS = (
    "effective_rank",
    "proportional_effective_rank",
    "stable_rank",
    "numerical_rank",
    "condition_number",
    "log10_condition_number",
    "spectral_entropy",
)


def naive(mats: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {name: {metric: _naive_metric(metric, m) for metric in NAIVE_METRICS} for name, m in mats.items()}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, vocab 8192, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (min is reported)")
    ap.add_argument("--naive-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    layers, vocab = (2, 8192) if args.quick else (12, VOCAB)
    repeats = args.repeats or (2 if args.quick else 3)

    mats = small_preset_matrices(layers=layers, vocab=vocab)
    n_params = sum(m.numel() for m in mats.values())
    print(
        f"{len(mats)} float32 matrices ({layers} layers, vocab {vocab}, {n_params / 1e6:.1f}M "
        f"entries); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    # warm-up (first-call overheads) and a correctness check against the floor
    ref, got = floor(mats), ours(mats)
    worst = max(
        abs(
            got[n]["effective_rank"]
            - dynamics.effective_rank(dynamics.Spectrum(ref[n].double().numpy(), tuple(mats[n].shape), "float32"))
        )
        / got[n]["effective_rank"]
        for n in mats
    )
    routes = sorted({dynamics.spectrum(m).method for m in mats.values()})
    print(f"routes used: {routes}; max relative effective-rank difference vs float32 floor: {worst:.1e}")

    # per matrix, interleaved floor/ours, so drifts in machine load hit both;
    # each matrix keeps its minimum over the repeats
    per_floor = {n: math.inf for n in mats}
    per_ours = {n: math.inf for n in mats}
    for _ in range(repeats):
        for n, m in mats.items():
            per_floor[n] = min(per_floor[n], best_time(lambda: torch.linalg.svdvals(m), 1))
            per_ours[n] = min(per_ours[n], best_time(lambda: dynamics.spectrum_metrics(m), 1))
    t_floor, t_ours = sum(per_floor.values()), sum(per_ours.values())
    t_naive = best_time(lambda: naive(mats), args.naive_repeats)

    by_shape: dict[tuple[int, int], list[float]] = {}
    for n, m in mats.items():
        row = by_shape.setdefault(tuple(m.shape), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += per_floor[n]
        row[2] += per_ours[n]
    print(f"{'shape':>14} {'count':>5} {'floor s':>9} {'ours s':>9} {'ratio':>6}")
    for shape, (count, f, o) in by_shape.items():
        print(f"{str(shape):>14} {count:>5} {f:9.3f} {o:9.3f} {o / f:6.2f}")
    print(f"floor (svdvals float32, 1 per matrix): {t_floor:8.3f} s")
    print(f"ours  (spectrum_metrics, all metrics): {t_ours:8.3f} s")
    print(f"naive (svd with vectors per metric x{len(NAIVE_METRICS)}): {t_naive:8.3f} s")
    r_floor, r_naive = t_ours / t_floor, t_naive / t_ours
    print(f"ours / floor = {r_floor:.2f}x   (target <= 1.3x)")
    print(f"naive / ours = {r_naive:.1f}x   (target >= 5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
