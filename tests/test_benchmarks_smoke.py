"""Smoke tests of benchmarks/train_bench.py, gpu_bench.py and analyze_bench.py: their quick modes run end to end and
report sane numbers; gpu_bench's out-of-memory handling and goal checks work on synthetic results."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"
GPU_BENCH = BENCH.with_name("gpu_bench.py")


def load_bench(path: Path = BENCH):
    """Import a benchmark by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_bench_quick(tmp_path, capsys):
    bench = load_bench()
    out_json = tmp_path / "bench.json"
    res = bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--steps",
            "4",
            "--repeats",
            "2",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out_json),
        ]
    )
    printed = capsys.readouterr().out

    assert set(res["methods"]) == {"full", "relora"}
    for method, r in res["methods"].items():
        assert r["trainer_tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0, method
        assert 0 < r["ratio"] < 2, (method, r["ratio"])
        assert r["eval_s"] > 0 and r["checkpoint_s"] > 0, method
        assert method in printed
    assert res["methods"]["full"]["step_time_vs_full"] == pytest.approx(1.0)
    assert res["methods"]["relora"]["step_time_vs_full"] > 0
    assert "trainer tok/s" in printed and "bare tok/s" in printed
    assert json.loads(out_json.read_text())["methods"].keys() == res["methods"].keys()
    assert list(tmp_path.glob("train_bench.*")) == []  # temporary run directories removed


@pytest.mark.slow
def test_gpu_bench_quick(tmp_path, capsys):
    gpu = load_bench(GPU_BENCH)
    out_json = tmp_path / "gpu.json"
    res = gpu.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out_json),
        ]
    )
    printed = capsys.readouterr().out

    configs = [
        (m, loop, cap)
        for m in ("full", "relora")
        for loop, cap in (("trainer", "off"), ("trainer", "every 100"), ("reference", "-"))
    ]
    rows = res["rows"]
    assert [(r["method"], r["loop"], r["capture"]) for r in rows] == configs
    for r in rows:
        assert r["preset"] == "micro" and r["status"] == "ok", r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert r["vs_reference"] > 0 and r["flops_per_token"] > 0
        assert r["mfu"] is None and r["peak_gib"] is None  # CUDA only
    by = {(r["method"], r["loop"], r["capture"]): r for r in rows}
    assert by[("relora", "trainer", "off")]["relora_vs_full"] > 0
    assert math.isfinite(by[("full", "trainer", "every 100")]["capture_overhead"])
    assert by[("full", "trainer", "every 100")]["capture_s"] > 0
    assert by[("full", "trainer", "off")]["capture_s"] is None  # capture disabled
    assert [g["status"] for g in res["goals"]][::3] == ["not checked", "not checked"]  # MFU and memory need CUDA

    table = [line for line in printed.splitlines() if line.startswith("micro ")]
    assert len(table) == 6 and all(("trainer" in line) or ("reference" in line) for line in table)
    assert "tok/s" in printed and "MFU" in printed and "goals:" in printed
    assert len(json.loads(out_json.read_text())["rows"]) == 6
    assert list(tmp_path.glob("gpu_bench.*")) == []  # temporary run directories removed


def test_time_loops_drops_a_loop_that_runs_out_of_memory():
    bench = load_bench()
    from trainer.batch_size import is_out_of_memory

    class Fake(bench.Loop):
        def __init__(self, name, fail_at=None):
            super().__init__(name=name, method="full", kind="bare")
            self.calls, self.fail_at, self.closed = 0, fail_at, False

        def chunk(self, start, n):
            self.calls += 1
            if self.calls == self.fail_at:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")
            return 0.0

        def resident(self):
            return 0

        def close(self):
            self.closed = True

    a, b, c = Fake("a"), Fake("b", fail_at=2), Fake("c")
    loops = [a, b, c]
    s = bench.Settings(
        preset="micro",
        device=torch.device("cpu"),
        methods=["full"],
        steps=4,
        warmup=1,
        repeats=2,
        batch_size=None,
        seq_len=None,
        eval_interval=100,
        checkpoint_interval=100,
        peak_tflops=1.0,
        overrides=[],
        quick=True,
        workdir=None,
    )
    failed = bench.time_loops(loops, s, failure=lambda e: "OOM" if is_out_of_memory(e) else None)
    assert failed == {"b": "OOM"} and loops == [a, c] and b.closed
    assert len(a.step_s) == len(c.step_s) == 2 and b.step_s == []
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an exception `failure` does not name ends the run
        bench.time_loops([Fake("d", fail_at=1)], s, failure=lambda e: None)


def test_gpu_bench_rows_and_goals_with_oom_and_cuda_numbers():
    gpu = load_bench(GPU_BENCH)
    from trainer.config import build_config

    def slot(preset, method, loop, every, status="ok", step=1.0, peak=30.0, batch=64):
        cfg = build_config(preset=preset, overrides=[f"method={method}", f"batch_size={batch}"])
        s = gpu.Slot(preset, method, loop, every, cfg, compiled=True, status=status, flops=1e9)
        if status == "ok":
            tps = cfg.tokens_per_step / step
            s.result = {
                "step_s": step,
                "tokens_per_s": tps,
                "steps_only_tokens_per_s": tps,
                "mfu": tps * 1e9 / 989e12,
                "steps_only_mfu": tps * 1e9 / 989e12,
                "peak_gib": peak,
                "capture_s": 0.5 if every else None,
            }
        return s

    slots = [
        slot("tiny", "full", "trainer", None),
        slot("tiny", "full", "trainer", 100, step=1.02),
        slot("tiny", "full", "reference", None, status="OOM"),
        slot("tiny", "relora", "trainer", None, step=1.25),
        slot("tiny", "relora", "trainer", 100, status="OOM"),
        slot("small", "full", "trainer", None, step=0.05, batch=32),
    ]
    rows = gpu.build_rows(slots)
    assert rows[1]["capture_overhead"] == pytest.approx(0.02) and rows[1]["capture_share"] == pytest.approx(0.005)
    assert rows[3]["relora_vs_full"] == pytest.approx(0.8) and rows[0]["vs_reference"] is None
    goals = {g["goal"].split()[0]: g for g in gpu.check_goals(rows, cuda=True, capture_every=100)}
    assert goals["small"]["status"] == "met"  # 32*2048/0.05 tok/s * 1e9 FLOPs = 1.3 PFLOP/s > 40% of 989 TFLOP/s
    assert goals["ReLoRA"]["status"] == "not met" and "0.80x" in goals["ReLoRA"]["detail"]
    assert goals["capture"]["status"] == "not met" and "OOM" in goals["capture"]["detail"]  # relora capture row
    assert goals["tiny"]["status"] == "not met" and "OOM" in goals["tiny"]["detail"]
    res = {
        "settings": {
            "device": "cuda",
            "device_name": "test",
            "threads": 1,
            "precision": "bf16 autocast",
            "torch": torch.__version__,
            "python": "3",
            "timed_steps_per_loop": 4,
            "repeats": 2,
            "steps_per_chunk": 2,
            "warmup_steps": 1,
            "eval_interval": 100,
            "checkpoint_interval": 100,
            "reference": "bare",
            "peak_tflops": 989.0,
        },
        "presets": {
            "tiny": {
                "batch_size": 64,
                "grad_accum": 1,
                "seq_len": 2048,
                "tokens_per_step": 131072,
                "flops_per_token": {"full": "6*N"},
            }
        },
        "rows": rows,
        "goals": list(goals.values()),
    }
    text = gpu.format_table(res)
    assert text.count("OOM") >= 2 and "[not met]" in text and "[met]" in text and "30.0" in text


@pytest.mark.slow
def test_loss_bench_quick(tmp_path, capsys):
    bench = load_bench(BENCH.with_name("loss_bench.py"))
    out_json = tmp_path / "loss.json"
    # 2 000 tokens at V 4 096: 31 MiB of float32 logits, 16 MiB per fused chunk of 1 000 tokens
    res = bench.main(
        ["--quick", "--device", "cpu", "--tokens", "2000", "--chunk-tokens", "1000", "--json", str(out_json)]
    )
    printed = capsys.readouterr().out
    assert set(res["seconds"]) == {"plain", "fused"} and all(v > 0 for v in res["seconds"].values())
    assert res["loss_rel_diff"] < 1e-5
    peaks = res["peak_bytes"]
    assert peaks["plain"] > 2 * 31 * 2**20  # logits and their gradient, at least
    assert 0 < res["memory_ratio_fused_over_plain"] < 0.8
    assert "fused/plain" in printed
    assert json.loads(out_json.read_text())["settings"]["chunk_tokens"] == 1000


@pytest.mark.slow
def test_analyze_bench_on_the_shared_pair(trained_pair, tmp_path, capsys):
    bench = load_bench(BENCH.with_name("analyze_bench.py"))
    out_json = tmp_path / "analyze.json"
    runs = [a for r in trained_pair for a in ("--run", str(r))]
    res = bench.main(
        runs + ["--repeats", "1", "--threads", "1", "--workdir", str(tmp_path), "--json", str(out_json), "--profile"]
    )
    printed = capsys.readouterr().out
    assert res["matrices"] > 0 and res["rows"] > 0
    assert 0 < res["floor_s"] < res["end_to_end_s"] and res["ratio"] == pytest.approx(
        res["end_to_end_s"] / res["floor_s"]
    )
    assert res["peak_rss_mib"] > 0
    assert "float64 svdvals floor" in printed and "ratio" in printed and "cumulative" in printed
    assert json.loads(out_json.read_text())["matrices"] == res["matrices"]


@pytest.mark.slow
def test_tokenize_bench_quick(tmp_path, capsys):
    bench = load_bench(BENCH.with_name("tokenize_bench.py"))
    argv = [
        "--mb",
        "0.3",
        "--bpe",
        "300",
        "--workers",
        "1,2",
        "--workdir",
        str(tmp_path),
        "--json",
        str(tmp_path / "t.json"),
    ]
    res = bench.main(argv)
    printed = capsys.readouterr().out
    runs = {(r["tokenizer"], r["workers"]): r for r in res["runs"]}
    assert set(runs) == {("bytes", 1), ("bytes", 2), ("bpe:300", 1), ("bpe:300", 2)}
    for key, r in runs.items():
        assert r["tokens_per_s"] > 0 and r["peak_mb"] >= r["rss_before_mb"] > 0, key
        assert r["same_tokens_as_workers_1"], key  # the token files do not depend on the worker count
    assert runs[("bytes", 1)]["tokens"] == round(res["corpus_mb"] * 1e6) + 1  # one file: its bytes + one end id
    assert 0 < runs[("bpe:300", 1)]["tokens"] < runs[("bytes", 1)]["tokens"]
    assert runs[("bpe:300", 1)]["speedup"] == 1.0 and runs[("bpe:300", 2)]["speedup"] > 0
    assert "speed-up" in printed and "bpe:300" in printed
    assert json.loads((tmp_path / "t.json").read_text())["runs"][0]["tokenizer"] == "bytes"
    assert list(tmp_path.glob("tokenize_bench.*")) == []  # the generated corpus and token files removed


@pytest.mark.slow
def test_analyze_bench_times_a_run_with_worker_processes(trained_pair, tmp_path):
    """--workers N: units run in other processes, so only the whole is timed (phase wrappers stay in this one)."""
    bench = load_bench(BENCH.with_name("analyze_bench.py"))
    seconds, rows, phases, units = bench.analyze_once(list(trained_pair), tmp_path / "t.parquet", workers=2)
    assert seconds > 0 and rows > 0 and units == []
    assert phases.pop("rest") == seconds and not any(phases.values())
