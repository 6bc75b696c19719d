"""Keyed dropout (split-invariant masks) against ``torch.nn.functional.dropout``: time and saved memory, one process.

    python benchmarks/dropout_bench.py                          # tiny's largest adapter input: 8 x 2048 x 384, CPU
    python benchmarks/dropout_bench.py --device cuda            # the same on a GPU (eager)
    python benchmarks/dropout_bench.py --device cuda --compile  # both compiled, as the trainer runs on CUDA
    python benchmarks/dropout_bench.py --quick                  # seconds; smoke check

Two workloads, each forward + backward, on an input ``x`` ``(rows, seq, features)``
float32 (``--bf16``: bfloat16):

* **op**: the dropout alone, ``y = drop(x)``, ``y.backward(g)``;
* **layer**: a :class:`trainer.relora.ReLoRALinear` (``features → out``, rank
  ``--rank``) forward + backward, default shapes the tiny preset's ``mlp.down``
  (384 → 96, rank 16) at micro-batch 8 × 2048 tokens, the largest adapter input
  of tiny. The same module runs both ways: with its row keys set (keyed) and
  cleared (then it calls ``F.dropout``, which is what ``nn.Dropout`` ran before).

**plain** is ``torch.nn.functional.dropout`` (the old ``nn.Dropout``), **keyed**
is :func:`trainer.keyed_dropout.keyed_dropout`. Calls alternate plain, keyed,
keyed, plain ... so drift hits both alike; medians are reported and the
headline is the ratio keyed / plain per workload. Also reported: the bytes each
saves for the backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``,
eager only; the same on every device), on CUDA the peak allocated bytes of one
call, and the cost of filling the row keys (:meth:`RowKeys.set`, once per
micro-batch for the whole model, not per layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import trainer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from trainer.keyed_dropout import RowKeys, keyed_dropout, module_key
from trainer.relora import ReLoRALinear

KINDS = ("plain", "keyed")
WORKLOADS = ("op", "layer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_calls(args: argparse.Namespace, device: torch.device) -> dict[tuple[str, str], Callable[[], None]]:
    """``(workload, kind)`` → a function running one forward + backward (gradients left in ``.grad``)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.seq, args.features, generator=g).to(device, dtype).requires_grad_()
    grad_x = torch.randn(args.rows, args.seq, args.features, generator=g).to(device, dtype)
    grad_out = torch.randn(args.rows, args.seq, args.out_features, generator=g).to(device, dtype)
    keys = RowKeys()
    keys.set(seed=0, step=1, first_row=0, n_rows=args.rows, device=device)
    key = module_key("layers.0.mlp.down")

    layer = ReLoRALinear(
        nn.Linear(args.features, args.out_features, bias=False),
        rank=args.rank,
        alpha=2.0 * args.rank,
        dropout=args.p,
        generator=torch.Generator().manual_seed(1),
        name="layers.0.mlp.down",
    ).to(device, dtype)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(2))
    layer.train()
    no_keys = RowKeys()  # never set: the layer falls back to F.dropout, what nn.Dropout ran

    def op_plain(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, args.p, training=True)

    def op_keyed(x: torch.Tensor) -> torch.Tensor:
        return keyed_dropout(x, args.p, rows=keys, key=key, training=True)

    def layer_forward(x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    fns: dict[tuple[str, str], Callable[[torch.Tensor], torch.Tensor]] = {
        ("op", "plain"): op_plain,
        ("op", "keyed"): op_keyed,
        ("layer", "plain"): layer_forward,
        ("layer", "keyed"): layer_forward,
    }
    if args.compile:  # the layer's two kinds share a compiled function, with one graph per RowKeys it reads
        fns = {k: torch.compile(f, dynamic=False) for k, f in fns.items()}

    def call(workload: str, kind: str) -> Callable[[], None]:
        fn = fns[(workload, kind)]

        def run() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            if workload == "layer":
                layer.rows = keys if kind == "keyed" else no_keys
            y = fn(x)
            y.backward(grad_x if workload == "op" else grad_out)

        return run

    return {(w, k): call(w, k) for w in WORKLOADS for k in KINDS}


def masks_agree(args: argparse.Namespace, device: torch.device) -> dict[str, bool]:
    """Whether the keyed masks on ``device`` equal those on CPU, and (``--compile``) the compiled ones the eager ones.

    The README's claim that masks are bit-identical across devices and under
    ``torch.compile`` (integer hashing, wrapping modulo 2**64 everywhere), checked
    at the benchmark's own shapes.
    """
    x = torch.ones(args.rows, args.seq, args.features)
    key = module_key("layers.0.mlp.down")

    def mask(x: torch.Tensor, fn: Callable[..., torch.Tensor] = keyed_dropout) -> torch.Tensor:
        keys = RowKeys()
        keys.set(seed=0, step=1, first_row=0, n_rows=x.shape[0], device=x.device)
        return (fn(x, args.p, rows=keys, key=key, training=True) == 0).cpu()

    cpu = mask(x)
    out = {"device_equals_cpu": bool(torch.equal(mask(x.to(device)), cpu))}
    if args.compile:
        out["compiled_equals_eager"] = bool(torch.equal(mask(x.to(device), torch.compile(keyed_dropout)), cpu))
    return out


def saved_bytes(run: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one call (eager; storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds per call, saved bytes and CUDA peaks of every (workload, kind), and the key-fill time."""
    calls = make_calls(args, device)
    seconds: dict[str, dict[str, list[float]]] = {w: {k: [] for k in KINDS} for w in WORKLOADS}
    peaks: dict[str, dict[str, int]] = {w: {} for w in WORKLOADS}
    saved: dict[str, dict[str, int]] = {w: {} for w in WORKLOADS}
    for (w, k), run in calls.items():  # warm up (and compile), then the CUDA peak of one call
        run()
        _sync(device)
        if not args.compile:
            saved[w][k] = saved_bytes(run)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            _sync(device)
            peaks[w][k] = torch.cuda.max_memory_allocated(device) - base
    for r in range(args.repeats):
        for w in WORKLOADS:
            for k in KINDS if r % 2 == 0 else KINDS[::-1]:
                _sync(device)
                t0 = time.perf_counter()
                calls[(w, k)]()
                _sync(device)
                seconds[w][k].append(time.perf_counter() - t0)
    keys = RowKeys()
    fills = []
    for step in range(max(args.repeats, 5)):
        _sync(device)
        t0 = time.perf_counter()
        keys.set(seed=0, step=step, first_row=0, n_rows=args.rows, device=device)
        _sync(device)
        fills.append(time.perf_counter() - t0)
    return {
        "seconds": {w: {k: statistics.median(v) for k, v in seconds[w].items()} for w in WORKLOADS},
        "saved_bytes": saved,
        "peak_bytes": peaks,
        "key_fill_seconds": statistics.median(fills),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dropout_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="sequences per micro-batch (default 8; --quick 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; --quick 64)")
    p.add_argument("--features", type=int, default=384, help="the adapter's input width (default 384: tiny's d_mlp)")
    p.add_argument("--out-features", type=int, default=96, help="the layer's output width (default 96: tiny's d_model)")
    p.add_argument("--rank", type=int, default=16, help="ReLoRA rank (default 16, the study's)")
    p.add_argument("--p", type=float, default=0.1, help="drop probability (default 0.1, the study's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", action="store_true", help="bfloat16 inputs and layer")
    p.add_argument("--compile", action="store_true", help="torch.compile both (as the trainer does on CUDA)")
    p.add_argument("--repeats", type=int, help="timed calls per kind and workload (default 7; --quick 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke check")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.rows = args.rows or (2 if args.quick else 8)
    args.seq = args.seq or (64 if args.quick else 2048)
    args.repeats = args.repeats or (2 if args.quick else 7)
    if min(args.rows, args.seq, args.features, args.out_features, args.rank, args.repeats) < 1:
        parser.error("--rows, --seq, --features, --out-features, --rank and --repeats must be >= 1")
    if args.rank > min(args.features, args.out_features):
        parser.error(f"--rank {args.rank} exceeds min(--features, --out-features)")
    if not 0 < args.p < 1:
        parser.error(f"--p must be in (0, 1), got {args.p}")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args, device)
    res["masks_agree"] = masks_agree(args, device)
    sec, saved, peaks = res["seconds"], res["saved_bytes"], res["peak_bytes"]
    out = {
        "settings": {
            "rows": args.rows,
            "seq": args.seq,
            "features": args.features,
            "out_features": args.out_features,
            "rank": args.rank,
            "p": args.p,
            "device": str(device),
            "dtype": "bfloat16" if args.bf16 else "float32",
            "compile": args.compile,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        **res,
        "time_ratio_keyed_over_plain": {w: sec[w]["keyed"] / sec[w]["plain"] for w in WORKLOADS},
        "saved_ratio_keyed_over_plain": {
            w: saved[w]["keyed"] / saved[w]["plain"] for w in WORKLOADS if saved[w].get("plain")
        },
        "peak_ratio_keyed_over_plain": {
            w: peaks[w]["keyed"] / peaks[w]["plain"] for w in WORKLOADS if peaks[w].get("plain")
        },
    }
    print(format_table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def format_table(out: dict[str, Any]) -> str:
    st = out["settings"]
    lines = [
        f"dropout_bench: x {st['rows']}x{st['seq']}x{st['features']} ({st['dtype']}), layer {st['features']}->"
        f"{st['out_features']} rank {st['rank']}, p={st['p']}, {st['device']} ({st['threads']} threads)"
        f"{', compiled' if st['compile'] else ''}, torch {st['torch']}",
        f"{'workload':8} {'kind':6} {'ms/call':>10} {'saved MiB':>10} {'peak MiB':>10}",
    ]
    for w in WORKLOADS:
        for k in KINDS:
            saved = out["saved_bytes"][w].get(k)
            peak = out["peak_bytes"][w].get(k)
            lines.append(
                f"{w:8} {k:6} {out['seconds'][w][k] * 1e3:>10.2f} "
                f"{'-' if saved is None else f'{saved / 2**20:.1f}':>10} {'-' if peak is None else f'{peak / 2**20:.1f}':>10}"
            )
    for w in WORKLOADS:
        parts = [f"time {out['time_ratio_keyed_over_plain'][w]:.2f}"]
        if w in out["saved_ratio_keyed_over_plain"]:
            parts.append(f"saved for backward {out['saved_ratio_keyed_over_plain'][w]:.2f}")
        if w in out["peak_ratio_keyed_over_plain"]:
            parts.append(f"peak {out['peak_ratio_keyed_over_plain'][w]:.2f}")
        lines.append(f"keyed/plain, {w}: " + ", ".join(parts))
    lines.append(f"row-key fill (once per micro-batch): {out['key_fill_seconds'] * 1e6:.0f} us")
    lines.append("keyed masks equal: " + ", ".join(f"{k} {v}" for k, v in out["masks_agree"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
