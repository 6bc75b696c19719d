"""Smoke test of benchmarks/train_bench.py: its --quick mode runs end to end and reports sane numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"


def load_bench():
    """Import the benchmark by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_bench"] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def test_train_bench_quick(tmp_path, capsys):
    bench = load_bench()
    out_json = tmp_path / "bench.json"
    res = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--steps", "4", "--repeats", "2",
                      "--workdir", str(tmp_path), "--json", str(out_json)])
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
