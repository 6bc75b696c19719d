"""The micro-batch finder: exact search over a fake out-of-memory threshold, the real training-step probe on CPU,
and `dynamics batch-size` (CUDA only: a one-line refusal on CPU; its output from a stubbed measurement)."""

from __future__ import annotations

import pytest
import torch

from dynamics.cli import main
from trainer import batch_size as bs
from trainer.config import build_config


def fake_step(
    threshold: int, *, error: type[BaseException] = torch.cuda.OutOfMemoryError, tried: list[int] | None = None
):
    """A try_step that runs out of memory above ``threshold`` sequences, recording every size tried."""

    def try_step(b: int) -> None:
        if tried is not None:
            tried.append(b)
        if b > threshold:
            raise error(f"CUDA out of memory. Tried to allocate {b} GiB")

    return try_step


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 7, 8, 9, 40, 63, 64, 65, 255, 256, 1000])
@pytest.mark.parametrize("start", [1, 4])
def test_finds_the_exact_largest_size(threshold, start):
    tried: list[int] = []
    assert bs.find_micro_batch(fake_step(threshold, tried=tried), start=start, limit=256) == min(threshold, 256)
    assert max(tried) <= 256 and len(tried) == len(set(tried))  # never past the limit, never twice the same size
    assert len(tried) <= 20  # doubling then bisection: logarithmic


def test_a_runtime_error_saying_out_of_memory_counts_too():
    assert bs.find_micro_batch(fake_step(12, error=RuntimeError), limit=100) == 12


def test_the_limit_is_respected():
    tried: list[int] = []
    assert bs.find_micro_batch(fake_step(10**6, tried=tried), start=1, limit=37) == 37
    assert tried == [1, 2, 4, 8, 16, 32, 37]


def test_other_errors_propagate():
    def try_step(b: int) -> None:
        if b >= 8:
            raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        bs.find_micro_batch(try_step, limit=64)
    with pytest.raises(RuntimeError, match="device-side assert"):
        bs.find_micro_batch(lambda b: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert")), limit=4)


@pytest.mark.parametrize("start, limit", [(0, 8), (4, 2), (1.5, 8)])
def test_bad_arguments(start, limit):
    with pytest.raises(ValueError, match="find_micro_batch"):
        bs.find_micro_batch(fake_step(4), start=start, limit=limit)


def test_is_out_of_memory():
    assert bs.is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert bs.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not bs.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert not bs.is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize(
    "max_micro, target, expected",
    [(80, 1024, (64, 16)), (2000, 1024, (1024, 1)), (7, 1000, (5, 200)), (1, 16, (1, 16)), (48, 96, (48, 2))],
)
def test_split_batch(max_micro, target, expected):
    micro, accum = bs.split_batch(max_micro, target)
    assert (micro, accum) == expected and micro * accum == target


@pytest.mark.parametrize("method", ["full", "relora"])
def test_real_step_probe_runs_on_cpu(method):
    cfg = build_config(preset="micro", overrides=[f"method={method}", "seq_len=32", "relora.rank=4"])
    probe = bs.TrainStepProbe(cfg, "cpu", steps=1)
    before = {n: p.detach().clone() for n, p in probe.model.named_parameters() if p.requires_grad}
    probe(3)
    after = dict(probe.model.named_parameters())
    assert any(not torch.equal(after[n], w) for n, w in before.items())  # an optimizer step happened
    assert all(p.grad is None for p in probe.model.parameters())
    assert probe.peaks == {} and not probe.compiled and not probe.bf16  # CPU: float32, eager, no CUDA peak
    if method == "relora":
        assert hasattr(probe.model.layers[0].attn.q, "lora_a")
    with pytest.raises(ValueError, match="CUDA"):
        bs.measure_batch_size(cfg, target_batch=8, device="cpu")


def test_probe_falls_back_to_eager_when_compile_fails_but_not_on_oom(monkeypatch):
    cfg = build_config(preset="micro", overrides=["seq_len=16", "compile=true"])
    probe = bs.TrainStepProbe(cfg, "cpu", steps=1)
    assert probe.compiled

    def failing_compile(error):
        def compile_(fn, **kwargs):
            def run(*args):
                raise error

            return run

        return compile_

    monkeypatch.setattr(torch, "compile", failing_compile(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # out of memory is the answer, not a compiler failure
        probe(2)
    assert probe.compiled
    monkeypatch.setattr(torch, "compile", failing_compile(RuntimeError("InductorError: no C++ compiler")))
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*without compile"):
        probe(2)
    assert not probe.compiled


def test_cli_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["batch-size", "--preset", "tiny"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_prints_the_suggestion(monkeypatch, capsys):
    seen = {}

    def fake_measure(cfg, *, target_batch, limit, device, echo):
        seen.update(preset=cfg.preset, method=cfg.method, seq=cfg.context, device=str(device), limit=limit)
        echo("micro-batch 1: fits")
        return bs.BatchSizeReport(
            device_name="Fake GPU",
            total_bytes=80 * bs.GIB,
            seq_len=cfg.context,
            max_micro_batch=80,
            limit=target_batch,
            max_peak_bytes=70 * bs.GIB,
            target_batch=target_batch,
            micro_batch=64,
            grad_accum=target_batch // 64,
            peak_bytes=57 * bs.GIB,
            compiled=True,
            bf16=True,
        )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bs, "measure_batch_size", fake_measure)
    assert main(["batch-size", "--preset", "small", "--method", "relora", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert seen == {"preset": "small", "method": "relora", "seq": 1024, "device": "cuda", "limit": None}
    assert "largest micro-batch: 80 sequences, peak 70.00 GiB" in out
    assert "--set batch_size=1024 --set grad_accum=16" in out and "micro-batch 64" in out
    assert main(["batch-size", "--target-batch", "0"]) == 2  # a bad flag is one error line too
