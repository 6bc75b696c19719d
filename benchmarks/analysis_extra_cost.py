"""Cost of the issue-9 analyses: `dynamics analyze` of a tiny-preset pair with them off (--basic) and on, one process.

Usage: python benchmarks/analysis_extra_cost.py OUT_DIR [REPEATS]  (trains a 6-step tiny full-rank + ReLoRA pair there once)
"""

import shutil
import sys
import time
from pathlib import Path

from dynamics.analyze import AnalysisOptions, analyze_runs
from trainer.config import build_config
from trainer.train import train

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
base = [
    "steps=6",
    "checkpoint_interval=2",
    "eval_interval=6",
    "seq_len=64",
    "batch_size=4",
    "warmup_steps=1",
    "data.train_tokens=200000",
    "data.val_tokens=20000",
    "eval_batches=1",
]
runs = []
for method, extra in (
    ("full", []),
    ("relora", ["relora.rank=8", "relora.merge_every=2", "relora.lr_restart_warmup=1"]),
):
    d = root / method
    if not (d / "manifest.json").exists():
        train(build_config(preset="tiny", overrides=base + [f"method={method}"] + extra), d, progress=False)
    runs.append(d)
times = {}
for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    for name, opts in (("basic", AnalysisOptions.basic()), ("full", AnalysisOptions())):
        out = root / f"res_{name}.parquet"
        shutil.rmtree(root / f"res_{name}.parquet.cache", ignore_errors=True)
        t0 = time.perf_counter()
        table, errors = analyze_runs(runs, out, options=opts, progress=False)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        assert not errors, errors
        print(name, rep, f"{times[name][-1]:.1f}s", len(table), "rows", flush=True)
b, f = min(times["basic"]), min(times["full"])
print(f"basic {b:.1f}s  with new analyses {f:.1f}s  ratio {f / b:.3f} (+{100 * (f / b - 1):.0f}%)")
