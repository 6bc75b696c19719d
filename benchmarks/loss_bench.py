"""The fused, chunked LM-head cross-entropy against the plain loss over full logits: time and peak memory, one process.

    python benchmarks/loss_bench.py                                  # tiny's head (D 96, V 50 304), 8 192 tokens, this machine
    python benchmarks/loss_bench.py --device cuda --tokens 131072    # tiny at 64 x 2 048 tokens on a GPU (plain may OOM)
    python benchmarks/loss_bench.py --quick                          # seconds; smoke check

Both losses take final hidden states ``(N, D)``, the head weight ``(V, D)`` and
targets ``(N,)`` and run forward + backward: **plain** is
``F.cross_entropy((h @ Wᵀ).float(), y)`` (what ``loss_chunk_tokens=0`` runs),
**fused** is :func:`trainer.loss.linear_cross_entropy` (the trainer's default).
Repeats alternate plain, fused, fused, plain ... so drift hits both alike;
medians are reported and the headline is the ratio fused / plain.

Peak memory is the transient memory of one forward + backward above what was
allocated before it: on CUDA ``torch.cuda.max_memory_allocated``; on CPU, where
PyTorch keeps no such counter, the peak resident set size of a fresh child
process running one call (its ``VmHWM`` after the call minus before). The
loss values of both are printed too, with their relative difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    import trainer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from trainer.loss import auto_chunk_tokens, linear_cross_entropy

KINDS = ("plain", "fused")


def make_inputs(tokens: int, d_model: int, vocab: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Hidden ``(N, D)`` and weight ``(V, D)`` (leaf tensors needing gradients) and int64 targets ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d_model, generator=g).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, d_model, generator=g)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return hidden, weight, targets


def run_once(kind: str, hidden, weight, targets, chunk: int | None, bf16: bool) -> float:
    """One forward + backward of ``kind``; returns the loss (nats/token). Gradients are left in ``.grad``."""
    hidden.grad = weight.grad = None
    ctx = (
        torch.autocast(hidden.device.type, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(hidden.device.type, enabled=False)
    )
    with ctx:
        if kind == "plain":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        else:
            loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    loss.backward()
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_both(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds per forward + backward of each kind, interleaved; the losses; CUDA peak bytes."""
    hidden, weight, targets = make_inputs(args.tokens, args.d_model, args.vocab, device, torch.float32)
    seconds: dict[str, list[float]] = {k: [] for k in KINDS}
    losses: dict[str, float] = {}
    peaks: dict[str, int | str] = {}
    for kind in KINDS:  # warm up, measure the CUDA peak, and catch an out-of-memory once
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            losses[kind] = run_once(kind, hidden, weight, targets, args.chunk_tokens, args.bf16)
            if device.type == "cuda":
                _sync(device)
                peaks[kind] = torch.cuda.max_memory_allocated(device) - base
        except torch.cuda.OutOfMemoryError:
            hidden.grad = weight.grad = None
            peaks[kind] = "OOM"
    runnable = [k for k in KINDS if k in losses]
    for r in range(args.repeats):
        for kind in runnable if r % 2 == 0 else runnable[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            run_once(kind, hidden, weight, targets, args.chunk_tokens, args.bf16)
            _sync(device)
            seconds[kind].append(time.perf_counter() - t0)
    return {"seconds": {k: statistics.median(v) for k, v in seconds.items() if v}, "losses": losses, "peaks": peaks}


def cpu_peak_in_child(kind: str, args: argparse.Namespace) -> int:
    """Peak resident bytes added by one forward + backward of ``kind``, measured in a fresh Python process."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--tokens",
        str(args.tokens),
        "--d-model",
        str(args.d_model),
        "--vocab",
        str(args.vocab),
    ]
    if args.chunk_tokens is not None:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    if args.bf16:
        cmd.append("--bf16")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes.

    Not ``getrusage().ru_maxrss``: on Linux that survives ``exec`` and a child
    would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    hidden, weight, targets = make_inputs(args.tokens, args.d_model, args.vocab, torch.device("cpu"), torch.float32)
    before = _peak_rss_bytes()
    run_once(args.child, hidden, weight, targets, args.chunk_tokens, args.bf16)
    print(_peak_rss_bytes() - before)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loss_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="N, tokens per call (default 8192; --quick 512)")
    p.add_argument("--d-model", type=int, default=96, help="D (default 96: tiny)")
    p.add_argument("--vocab", type=int, help="V (default 50304; --quick 4096)")
    p.add_argument(
        "--chunk-tokens", type=int, help="the fused loss's chunk (default: the trainer's, 512 MiB of logits)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast, as the trainer does on CUDA")
    p.add_argument("--repeats", type=int, help="timed calls per kind (default 5; --quick 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke check")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (512 if args.quick else 8192)
    args.vocab = args.vocab or (4096 if args.quick else 50304)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.child:
        _child(args)
        return None
    if min(args.tokens, args.d_model, args.vocab, args.repeats) < 1 or (
        args.chunk_tokens is not None and args.chunk_tokens < 1
    ):
        parser.error("--tokens, --d-model, --vocab, --repeats and --chunk-tokens must be >= 1")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    res = time_both(args, device)
    if device.type == "cpu":
        res["peaks"] = {k: cpu_peak_in_child(k, args) for k in KINDS}
    chunk = args.chunk_tokens or auto_chunk_tokens(args.vocab)
    sec, peaks, losses = res["seconds"], res["peaks"], res["losses"]
    out = {
        "settings": {
            "tokens": args.tokens,
            "d_model": args.d_model,
            "vocab": args.vocab,
            "chunk_tokens": chunk,
            "device": str(device),
            "bf16": args.bf16,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "seconds": sec,
        "peak_bytes": peaks,
        "loss": losses,
        "time_ratio_fused_over_plain": sec["fused"] / sec["plain"] if len(sec) == 2 else None,
        "memory_ratio_fused_over_plain": (
            peaks["fused"] / peaks["plain"]
            if all(isinstance(peaks.get(k), int) and peaks[k] > 0 for k in KINDS)
            else None
        ),
        "loss_rel_diff": abs(losses["fused"] - losses["plain"]) / abs(losses["plain"]) if len(losses) == 2 else None,
    }
    print(format_table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def format_table(out: dict[str, Any]) -> str:
    st = out["settings"]
    lines = [
        f"loss_bench: N={st['tokens']} D={st['d_model']} V={st['vocab']} chunk={st['chunk_tokens']} tokens, "
        f"{st['device']} ({st['threads']} threads), {'bf16 autocast' if st['bf16'] else 'float32'}, torch {st['torch']}",
        f"{'kind':6} {'ms/call':>10} {'peak MiB':>10} {'loss':>12}",
    ]
    for k in KINDS:
        ms = f"{out['seconds'][k] * 1e3:.1f}" if k in out["seconds"] else "-"
        peak = out["peak_bytes"].get(k)
        peak_s = f"{peak / 2**20:.0f}" if isinstance(peak, int) else str(peak or "-")
        loss = f"{out['loss'][k]:.6f}" if k in out["loss"] else "-"
        lines.append(f"{k:6} {ms:>10} {peak_s:>10} {loss:>12}")
    for key, label in (
        ("time_ratio_fused_over_plain", "time fused/plain"),
        ("memory_ratio_fused_over_plain", "peak memory fused/plain"),
        ("loss_rel_diff", "loss rel. diff"),
    ):
        if out[key] is not None:
            lines.append(f"{label}: {out[key]:.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
