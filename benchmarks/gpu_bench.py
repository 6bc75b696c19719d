"""GPU throughput (issue 11): tokens/s, MFU and peak memory of the trainer and of a bare reference loop, in one process.

    python benchmarks/gpu_bench.py                                    # tiny and small, full-rank and ReLoRA, on a CUDA GPU
    python benchmarks/gpu_bench.py --presets small --set compile=true --json gpu.json
    python benchmarks/gpu_bench.py --batch-size tiny=32,small=16     # other micro-batches per preset
    python benchmarks/gpu_bench.py --quick                            # seconds on a CPU: micro preset, smoke check

For every preset in ``--presets`` (default ``tiny,small``) and every method in
``--methods`` (``full``, ``relora``), three loops train the same model on the
same data at the same size (``--seq-len``, default the model's 2 048 tokens;
``--batch-size``, default 64 sequences for ``tiny`` and 32 for ``small``):

* **trainer, capture off** — :class:`trainer.train.Trainer` as
  ``benchmarks/train_bench.py`` times it (its ``TrainerLoop``): every step of
  ``Trainer.run``, with evaluation and checkpoint costs measured on the calls
  the loop makes and amortised over their intervals (100 steps each by
  default), and ``capture.enabled=false``;
* **trainer, capture every 100 steps** — the same with the dense dynamics
  capture on (``capture.every``, ``--capture-every``), its cost amortised the
  same way;
* **reference** — the bare loop the issue measured: the same model
  (ReLoRA-wrapped for ``relora``), fused AdamW with the trainer's settings,
  bf16 autocast, SDPA, compiled with ``torch.compile`` on CUDA
  (``--reference-compile``), and the plain loss over full float32 logits,
  ``F.cross_entropy(logits.float(), targets)``, whatever ``Decoder.loss`` does.

Trainer settings not named here are the trainer's defaults (``compile``,
``tf32``, capture sites ...); change them with ``--set key=value``, which
applies to every trainer loop (and to the reference's model and optimizer
settings). The loops of one preset are interleaved in counterbalanced order
(``train_bench.time_loops``); presets run one after the other, each freeing its
memory before the next. A configuration that runs out of GPU memory (while
being set up or timed) is reported as ``OOM`` and left out; the others go on.
(The issue found that the reference's full float32 logits do not fit tiny at 64
sequences: expect ``OOM`` there; ``--batch-size tiny=16`` compares at a size it fits.)

Reported per row: tokens/s, MFU (``train_bench.flops_per_token``: ``6·N +
12·L·d·T`` per token for full-rank, frozen ReLoRA bases at ``4·N``; against
``--peak-tflops``, 989 for an H100 SXM dense bf16), peak memory (parameters,
buffers and optimizer state plus the transient peak of a timed chunk, as
allocated by PyTorch; CUDA only), the ratio to the reference of the same
method, ReLoRA/full (same loop and capture setting), and the capture overhead
(trainer step time with capture over the one without, minus 1). A "goals"
section checks the issue's targets: small full-rank trainer >= 40% MFU;
ReLoRA >= 0.9x full-rank tokens/s; capture every 100 steps <= 5% overhead;
tiny trains at micro-batch >= 64 x 2 048 within 80 GiB.

Timings mean something only against the loops measured in the same process:
every ratio here is taken within one run, on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import train_bench as tb
except ImportError:  # loaded by path: train_bench sits next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_bench as tb

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import MODEL_PRESETS, TrainConfig
from trainer.data import prepare
from trainer.runtime import is_out_of_memory, release_memory, uses_bf16, uses_compile

PRESETS = ("tiny", "small")
#: Sequences per step when --batch-size does not say: the issue's reference sizes.
DEFAULT_BATCH = {"micro": 16, "tiny": 64, "small": 32}
QUICK_PRESET = "micro"

MFU_GOAL = 0.40  # small, full-rank trainer
RELORA_GOAL = 0.90  # ReLoRA tokens/s over full-rank tokens/s
CAPTURE_GOAL = 0.05  # capture every 100 steps: extra step time
TINY_MICRO_BATCH_GOAL, TINY_SEQ_GOAL, MEMORY_GOAL_GIB = 64, 2048, 80.0

OK, OOM = "ok", "OOM"


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_bench.py",
        description="Tokens/s, MFU and peak memory of the trainer (capture off / on) and of a bare compiled reference "
        "loop, per preset and method, in one process; checks the issue-11 goals.",
    )
    p.add_argument("--presets", help=f"comma-separated presets (default {','.join(PRESETS)}; --quick: {QUICK_PRESET})")
    p.add_argument(
        "--batch-size",
        dest="batch_sizes",
        metavar="N|PRESET=N,...",
        help="sequences per optimizer step, for every preset or per preset (default tiny=64, small=32; --quick: 8)",
    )
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context, 2048; --quick: 32)")
    p.add_argument(
        "--capture-every",
        type=int,
        default=100,
        help="capture interval of the capture-on trainer, a multiple of --checkpoint-interval (default 100)",
    )
    p.add_argument(
        "--reference-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the reference loop (auto: on CUDA only)",
    )
    tb.add_common_arguments(p)
    return p


def _parse_batch_sizes(text: str | None, presets: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    """``"32"`` → every preset 32; ``"tiny=64,small=16"`` → per preset; presets not named keep their default."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {p: int(text) for p in presets}
        out = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            out[name.strip()] = int(value)
    except ValueError:
        parser.error(f"--batch-size takes N or PRESET=N,... (e.g. tiny=64,small=32), got {text!r}")
    unknown = sorted(set(out) - set(MODEL_PRESETS))
    if unknown:
        parser.error(f"--batch-size: unknown preset(s) {', '.join(unknown)}; known: {', '.join(MODEL_PRESETS)}")
    return out


def resolve_presets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tb.Settings]:
    """One :class:`train_bench.Settings` per preset: the shared timing settings with that preset's sizes."""
    presets = [
        x.strip() for x in (args.presets or (QUICK_PRESET if args.quick else ",".join(PRESETS))).split(",") if x.strip()
    ]
    bad = [x for x in presets if x not in MODEL_PRESETS]
    if bad or not presets:
        parser.error(f"--presets must be a comma-separated subset of {','.join(MODEL_PRESETS)}, got {args.presets!r}")
    presets = list(dict.fromkeys(presets))
    if args.capture_every < 1:
        parser.error("--capture-every must be >= 1")
    # train_bench resolves timing, device and methods; sizes are set per preset below.
    base = tb.resolve_settings(argparse.Namespace(**{**vars(args), "preset": presets[0], "batch_size": None}), parser)
    batches = _parse_batch_sizes(args.batch_sizes, presets, parser)
    out = []
    for preset in presets:
        batch = batches.get(preset, base.batch_size if args.quick else DEFAULT_BATCH[preset])
        if batch < 1:
            parser.error(f"--batch-size must be >= 1, got {batch} for {preset}")
        out.append(dataclasses.replace(base, preset=preset, batch_size=batch, seq_len=base.seq_len))
    return out


# ---------------------------------------------------------------------------------------------
# The reference loop


class FullLogitsLoss(nn.Module):
    """Mean next-token cross-entropy over full float32 logits: ids ``(B, T)`` int64, targets ``(B, T)`` int64 → 0-d.

    The loss of the issue's bare reference: ``(B, T, V)`` logits, cast to float32, one ``F.cross_entropy``
    (no chunking), so it needs ``B·T·V·4`` bytes for the float32 logits alone (and as much for their gradient).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class ReferenceLoop(tb.BareLoop):
    """The issue's bare reference: ``train_bench.BareLoop`` with :class:`FullLogitsLoss`, compiled when asked."""

    def __init__(self, cfg, stream, device: torch.device, *, compiled: bool, name: str) -> None:
        super().__init__(cfg, stream, device, name=name, kind="reference")
        loss = FullLogitsLoss(self.model)
        # static shapes: every call has the same (B, T), as in the loop
        self.loss_fn = torch.compile(loss, dynamic=False) if compiled else loss


# ---------------------------------------------------------------------------------------------
# Running


def _oom(e: BaseException) -> str | None:
    return OOM if is_out_of_memory(e) else None


@dataclasses.dataclass
class Slot:
    """One configuration (a table row): what it is, its outcome, and its model's training FLOPs per token."""

    preset: str
    method: str
    loop_kind: str  # "trainer" or "reference"
    capture_every: int | None  # trainer: capture interval in steps, None when off; reference: None
    cfg: TrainConfig
    compiled: bool  # whether the loss runs through torch.compile
    status: str = OK  # or the failure ("OOM")
    flops: float | None = None
    flops_formula: str | None = None
    result: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def capture(self) -> str:
        if self.loop_kind == "reference":
            return "-"
        return "off" if self.capture_every is None else f"every {self.capture_every}"

    @property
    def name(self) -> str:
        return f"{self.preset}/{self.method}/{self.loop_kind}" + (
            f"/{self.capture}" if self.loop_kind == "trainer" else ""
        )


def _capture_overrides(every: int | None) -> list[str]:
    """``--set`` items for a trainer with capture off (``None``) or every ``every`` steps (applied after the user's)."""
    return ["capture.enabled=false"] if every is None else ["capture.enabled=true", f"capture.every={every}"]


def _model_of(loop: tb.Loop) -> nn.Module:
    return loop.trainer.model if isinstance(loop, tb.TrainerLoop) else loop.model  # type: ignore[attr-defined]


def bench_preset(s: tb.Settings, *, capture_every: int, reference_compile: str) -> list[Slot]:
    """Set up, time and summarise every configuration of one preset; memory is released before returning."""
    root = Path(tempfile.mkdtemp(prefix="gpu_bench.", dir=s.workdir))
    compile_ref = {"on": True, "off": False}.get(reference_compile, s.device.type == "cuda")
    slots: list[Slot] = []
    loops: list[tb.Loop] = []  # the only references to the loops, so a dropped one frees its memory
    try:
        for method in s.methods:
            for every in (None, capture_every):
                cfg = tb.trainer_config(
                    dataclasses.replace(s, overrides=s.overrides + _capture_overrides(every)), method
                )
                slots.append(Slot(s.preset, method, "trainer", every, cfg, compiled=uses_compile(cfg, s.device)))
            slots.append(Slot(s.preset, method, "reference", None, slots[-2].cfg, compiled=compile_ref))
        data = prepare(slots[0].cfg.data, root / "data")  # the reference's token stream: the trainers' data
        for i, slot in enumerate(slots):
            tb._log(f"[gpu_bench] setting up {slot.name} (not timed)")
            if slot.loop_kind == "trainer":
                build = functools.partial(tb.TrainerLoop, slot.cfg, root / f"run{i}", s.device, name=slot.name)
            else:
                build = functools.partial(
                    ReferenceLoop, slot.cfg, data.train, s.device, compiled=compile_ref, name=slot.name
                )
            loop, reason = tb.run_guarded(build, _oom)
            if reason is not None:
                tb._log(f"[gpu_bench] {slot.name}: {reason} while setting up; left out")
                slot.status = reason
                release_memory()
                continue
            slot.flops, slot.flops_formula = tb.flops_per_token(_model_of(loop), slot.cfg)
            loops.append(loop)
            del loop
        failed = tb.time_loops(loops, s, tag="gpu_bench", failure=_oom)
        alive = {loop.name: loop for loop in loops}
        for slot in slots:
            if slot.name in failed:
                slot.status = failed[slot.name]
            elif slot.name in alive:
                slot.result = _measure(slot, alive[slot.name], s)
        return slots
    finally:
        for loop in loops:
            loop.close()
        loops.clear()
        release_memory()
        torch.compiler.reset()  # the next preset compiles afresh, with static shapes
        shutil.rmtree(root, ignore_errors=True)


def _measure(slot: Slot, loop: tb.Loop, s: tb.Settings) -> dict[str, Any]:
    """Step time, tokens/s, MFU and peak memory of ``slot``'s timed ``loop`` (events amortised for the trainer)."""
    tokens_per_step = slot.cfg.tokens_per_step
    if isinstance(loop, tb.TrainerLoop):
        t = tb.trainer_step_time(loop)
        step, steps_only = t["trainer_step_s"], t["trainer_steps_only_step_s"]
    else:
        t = {}
        step = steps_only = tb._median(loop.step_s)
    rec: dict[str, Any] = {
        "step_s": step,
        "tokens_per_s": tokens_per_step / step,
        "steps_only_step_s": steps_only,
        "steps_only_tokens_per_s": tokens_per_step / steps_only,
        **{k: v for k, v in t.items() if k not in ("trainer_step_s", "trainer_steps_only_step_s")},
        "raw_step_s": list(loop.step_s),
    }
    if isinstance(loop, tb.TrainerLoop):
        rec["raw_events_s"] = {k: list(v) for k, v in loop.events.items()}
    if s.device.type == "cuda":
        peak = s.peak_tflops * 1e12
        rec["mfu"] = rec["tokens_per_s"] * slot.flops / peak
        rec["steps_only_mfu"] = rec["steps_only_tokens_per_s"] * slot.flops / peak
        rec["peak_gib"] = max(loop.peak_bytes) / 2**30
    return rec


# ---------------------------------------------------------------------------------------------
# Rows, ratios, goals


def build_rows(slots: list[Slot]) -> list[dict[str, Any]]:
    """One flat record per configuration, with the ratios between configurations of the same preset."""
    rows = []
    for slot in slots:
        rows.append(
            {
                "preset": slot.preset,
                "method": slot.method,
                "loop": slot.loop_kind,
                "capture": slot.capture,
                "capture_every": slot.capture_every,
                "status": slot.status,
                "batch_size": slot.cfg.batch_size,
                "micro_batch": slot.cfg.micro_batch_size,
                "seq_len": slot.cfg.context,
                "tokens_per_step": slot.cfg.tokens_per_step,
                "flops_per_token": slot.flops,
                "flops_formula": slot.flops_formula,
                "compiled": slot.compiled,
                "tokens_per_s": None,
                "mfu": None,
                "peak_gib": None,
                **slot.result,
                "vs_reference": None,
                "relora_vs_full": None,
                "capture_overhead": None,
                "capture_share": None,
            }
        )
    ok = {(r["preset"], r["method"], r["loop"], r["capture"]): r for r in rows if r["status"] == OK}
    for r in rows:
        if r["status"] != OK:
            continue
        ref = ok.get((r["preset"], r["method"], "reference", "-"))
        if ref is not None:
            r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        full = ok.get((r["preset"], "full", r["loop"], r["capture"]))
        if r["method"] == "relora" and full is not None:
            r["relora_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
        off = ok.get((r["preset"], r["method"], "trainer", "off"))
        if r["loop"] == "trainer" and r["capture"] != "off" and off is not None:
            r["capture_overhead"] = r["step_s"] / off["step_s"] - 1.0
            r["capture_share"] = r["capture_s"] / r["capture_every"] / off["step_s"]  # the amortised capture alone
    return rows


def _verdict(goal: str, items: list[tuple[str, bool]], unchecked: str | None = None) -> dict[str, Any]:
    if unchecked is not None or not items:
        return {"goal": goal, "status": "not checked", "detail": unchecked or "no configuration to check"}
    status = "met" if all(ok for _, ok in items) else "not met"
    return {"goal": goal, "status": status, "detail": "; ".join(text for text, _ in items)}


def check_goals(rows: list[dict[str, Any]], *, cuda: bool, capture_every: int) -> list[dict[str, Any]]:
    """The issue's four targets, each ``met``/``not met``/``not checked`` with the numbers behind it."""

    def pick(**where: str) -> list[dict[str, Any]]:
        return [r for r in rows if all(r[k] == v for k, v in where.items())]

    def label(r: dict[str, Any]) -> str:
        return f"{r['preset']} {r['method']} {r['loop']} capture {r['capture']}"

    goals = []
    g = f"small full-rank trainer MFU >= {MFU_GOAL:.0%}"
    rs = pick(preset="small", method="full", loop="trainer", capture="off")
    if not cuda or not rs:
        goals.append(_verdict(g, [], "MFU is measured on CUDA only" if not cuda else "the small preset was not run"))
    else:
        r = rs[0]
        goals.append(
            _verdict(
                g,
                [(f"{r['status']}", False)]
                if r["status"] != OK
                else [(f"{r['mfu']:.1%} (steps only {r['steps_only_mfu']:.1%})", r["mfu"] >= MFU_GOAL)],
            )
        )

    g = f"ReLoRA >= {RELORA_GOAL:g}x full-rank tokens/s (trainer, capture off)"
    items = []
    for r in pick(method="relora", loop="trainer", capture="off"):
        x = r["relora_vs_full"]
        items.append(
            (f"{r['preset']} {x:.2f}x", x >= RELORA_GOAL) if x is not None else (f"{r['preset']}: no pair (OOM)", False)
        )
    goals.append(_verdict(g, items))

    g = f"capture every {capture_every} steps <= {CAPTURE_GOAL:.0%} overhead"
    items = []
    for r in pick(loop="trainer", capture=f"every {capture_every}"):
        x = r["capture_overhead"]
        items.append(
            (f"{r['preset']} {r['method']} {x:+.1%} (capture alone {r['capture_share']:.1%})", x <= CAPTURE_GOAL)
            if x is not None
            else (f"{r['preset']} {r['method']}: no pair (OOM)", False)
        )
    goals.append(_verdict(g, items))

    g = f"tiny trains at micro-batch >= {TINY_MICRO_BATCH_GOAL}x{TINY_SEQ_GOAL} within {MEMORY_GOAL_GIB:g} GiB"
    rs = pick(preset="tiny", loop="trainer")
    unchecked = None
    if not cuda:
        unchecked = "peak memory is measured on CUDA only"
    elif not rs:
        unchecked = "the tiny preset was not run"
    elif rs[0]["micro_batch"] < TINY_MICRO_BATCH_GOAL or rs[0]["seq_len"] < TINY_SEQ_GOAL:
        unchecked = (
            f"run at micro-batch {rs[0]['micro_batch']}x{rs[0]['seq_len']}; "
            f"use --batch-size tiny={TINY_MICRO_BATCH_GOAL} --seq-len {TINY_SEQ_GOAL}"
        )
    items = [
        (f"{label(r)}: {r['status']}", False)
        if r["status"] != OK
        else (f"{label(r)}: {r['peak_gib']:.1f} GiB", r["peak_gib"] <= MEMORY_GOAL_GIB)
        for r in rs
    ]
    goals.append(_verdict(g, items, unchecked))
    return goals


def run(presets: list[tb.Settings], *, capture_every: int, reference_compile: str) -> dict[str, Any]:
    """Benchmark every preset; returns ``{"settings", "presets", "rows", "goals"}`` (JSON-serialisable)."""
    first = presets[0]
    cuda = first.device.type == "cuda"
    slots: list[Slot] = []
    info: dict[str, Any] = {}
    for s in presets:
        done = bench_preset(s, capture_every=capture_every, reference_compile=reference_compile)
        slots += done
        cfg = done[0].cfg
        info[s.preset] = {
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seq_len": cfg.context,
            "tokens_per_step": cfg.tokens_per_step,
            "flops_per_token": {sl.method: sl.flops_formula for sl in done if sl.flops_formula},
        }
    rows = build_rows(slots)
    return {
        "settings": {
            "device": str(first.device),
            "device_name": torch.cuda.get_device_name(first.device)
            if cuda
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if uses_bf16(slots[0].cfg, first.device) else "fp32",
            "methods": first.methods,
            "warmup_steps": first.warmup,
            "timed_steps_per_loop": first.chunk * first.repeats,
            "repeats": first.repeats,
            "steps_per_chunk": first.chunk,
            "eval_interval": first.eval_interval,
            "checkpoint_interval": first.checkpoint_interval,
            "capture_every": capture_every,
            "reference": "bare loop: fused AdamW, autocast as the trainer, SDPA, F.cross_entropy over full float32 "
            "logits"
            + (", torch.compile" if any(sl.compiled for sl in slots if sl.loop_kind == "reference") else ", eager"),
            "peak_tflops": first.peak_tflops if cuda else None,
            "overrides": first.overrides,
            "quick": first.quick,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "presets": info,
        "rows": rows,
        "goals": check_goals(rows, cuda=cuda, capture_every=capture_every),
    }


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = [
        f"gpu_bench: device={st['device']} ({st['device_name']}, {st['threads']} threads), {st['precision']}, "
        f"torch {st['torch']}, python {st['python']}",
        f"timed: {st['timed_steps_per_loop']} steps per loop in {st['repeats']} interleaved chunks of "
        f"{st['steps_per_chunk']} (after {st['warmup_steps']} warmup steps); medians over chunks",
        f"trainer: eval every {st['eval_interval']} and checkpoint every {st['checkpoint_interval']} steps, amortised; "
        f"reference: {st['reference']}",
    ]
    for preset, p in res["presets"].items():
        lines.append(
            f"{preset}: batch {p['batch_size']}x{p['seq_len']} = {p['tokens_per_step']} tokens/step"
            + (f" (grad_accum {p['grad_accum']})" if p["grad_accum"] > 1 else "")
        )
    lines.append("")
    head = ["preset", "method", "loop", "capture", "tok/s", "MFU", "peak GiB", "vs ref", "relora/full", "capture ovh"]
    table = [head]
    for r in res["rows"]:
        ok = r["status"] == OK
        table.append(
            [
                r["preset"],
                r["method"],
                r["loop"],
                r["capture"],
                f"{r['tokens_per_s']:,.0f}" if ok else r["status"],
                _fmt(r["mfu"], ".1%"),
                _fmt(r["peak_gib"], ".1f"),
                _fmt(r["vs_reference"], ".2f"),
                _fmt(r["relora_vs_full"], ".2f"),
                _fmt(r["capture_overhead"], "+.1%"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [
        "",
        "tok/s: trainer with eval/checkpoint (and capture) amortised over their intervals; vs ref: over the reference "
        "of the same method; relora/full: same loop and capture; capture ovh: step time with capture / without - 1",
    ]
    if st["peak_tflops"] is not None:
        lines.append(
            f"MFU against {st['peak_tflops']:g} TFLOP/s; FLOPs/token: "
            + "; ".join(f"{pr} {m}: {f}" for pr, p in res["presets"].items() for m, f in p["flops_per_token"].items())
        )
    lines += ["", "goals:"]
    width = max(len(g["status"]) for g in res["goals"]) + 2
    for g in res["goals"]:
        lines.append(f"  {'[' + g['status'] + ']':<{width}} {g['goal']}: {g['detail']}")
    lines.append("(timings are ratios against loops measured in this process; absolute tokens/s depend on the machine)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON; returns the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with tb.torch_threads(args.threads):
        presets = resolve_presets(args, parser)
        if presets[0].device.type != "cuda" and not args.quick:
            tb._log("[gpu_bench] no CUDA device: running on the CPU (slow at these sizes; MFU and memory not measured)")
        res = run(presets, capture_every=args.capture_every, reference_compile=args.reference_compile)
    print(format_table(res), flush=True)
    tb.write_json(args.json, res)
    return res


if __name__ == "__main__":
    tb.run_script(main)
