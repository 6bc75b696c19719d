"""Streaming tokenisation of a generated text corpus: tokens/s, peak memory, and the speed-up of data.workers.

    python benchmarks/tokenize_bench.py                       # 100 MB corpus, bytes and bpe:8192, workers 1, 2 (, cores)
    python benchmarks/tokenize_bench.py --mb 20 --workers 1,2,4
    python benchmarks/tokenize_bench.py --mb 0.2 --bpe 300    # seconds; smoke check

The corpus is generated deterministically into a temporary directory: files of
about 4 MB, each a document of lines of words drawn from a Zipf-distributed
vocabulary of 20 000 pseudo-words (seed 0). Each measurement runs
:func:`trainer.data.prepare` (``data.source=text``) into a fresh directory in
a **fresh child process**, so its peak resident set size is its own:
``rss_before`` is the child's peak after its imports (torch included, as in the
trainer), ``peak`` its peak after tokenising (``VmHWM``), ``workers_peak`` the
largest peak among its worker processes (``RUSAGE_CHILDREN``; forked workers
share the parent's pages, which are counted in both). Time is the wall time of
``prepare`` alone (reading, encoding, writing, hashing, fsync); ``cpu s`` the CPU
time it used (this process and its workers) and ``load`` the 1-minute load
average when it started: on a shared machine a speed-up needs idle cores, which
the load shows.

The BPE (``bpe:N``) is learnt once, beforehand, on the first ~10 MB of the
corpus (its training time is reported separately) and passed to the
measurements as a ``tokenizer.json`` file, so they time encoding only.
Headline: the speed-up ``tok/s(workers=N) / tok/s(workers=1)`` of each
tokenizer, measured in the same invocation; the token files must be identical
(same sha256) for every worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import trainer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

FILE_MB = 4.0  # size of one generated file (one document)
BPE_SAMPLE_MB = 10.0  # text the BPE learns from


def generate_corpus(directory: Path, mb: float, seed: int = 0) -> int:
    """Write about ``mb`` MB of text into ``directory`` (files ``doc_00000.txt`` ...); the number of bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    lengths = rng.integers(1, 11, size=20_000)
    words = np.array(["".join(rng.choice(letters, size=n, p=freq / freq.sum())) for n in lengths])
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    zipf /= zipf.sum()
    directory.mkdir(parents=True, exist_ok=True)
    target, written, k = int(mb * 1e6), 0, 0
    while written < target:
        size = min(int(FILE_MB * 1e6), target - written)
        n_words = max(1, size // 6)
        chosen = words[rng.choice(len(words), size=n_words, p=zipf)]
        line_len = 12
        lines = [" ".join(chosen[i : i + line_len]) + "." for i in range(0, n_words, line_len)]
        data = "\n".join(lines).encode()[:size]  # ASCII: any cut is a character boundary
        (directory / f"doc_{k:05d}.txt").write_bytes(data)
        written += len(data)
        k += 1
    return written


def _peak_mb() -> float:
    """This process's peak resident set size (``VmHWM``), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(args: dict[str, Any]) -> dict[str, Any]:
    """One measurement (runs in a fresh process): prepare() the corpus, return time, tokens, memory, hashes."""
    from trainer.config import DataConfig
    from trainer.data import prepare

    before = _peak_mb()
    cfg = DataConfig(source="text", path=args["corpus"], tokenizer=args["tokenizer"], workers=args["workers"])
    load = os.getloadavg()[0]
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    s = prepare(cfg, Path(args["out"]), progress=False)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "cpu_s": _cpu_s() - cpu0,
        "load_before": load,
        "tokens": int(len(s.train) + len(s.val)),
        "rss_before_mb": before,
        "peak_mb": _peak_mb(),
        "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "sha256": s.meta["sha256"],
    }


def measure(corpus: Path, tokenizer: str, workers: int, out: Path) -> dict[str, Any]:
    payload = json.dumps({"corpus": str(corpus), "tokenizer": tokenizer, "workers": workers, "out": str(out)})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", payload], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({tokenizer}, workers={workers}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_workers() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, 2, *([min(cores, 8)] if cores > 2 else [])})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    ap.add_argument("--bpe", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default 1,2 and min(cores, 8))")
    ap.add_argument("--workdir", default=None, help="where the temporary corpus goes (default: the system temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        res = child(json.loads(args.child))
        print(json.dumps(res))
        return res

    workers = [int(w) for w in args.workers.split(",")] if args.workers else default_workers()
    if 1 not in workers:
        workers = [1, *workers]
    tmp = Path(tempfile.mkdtemp(prefix="tokenize_bench.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        corpus = tmp / "corpus"
        n_bytes = generate_corpus(corpus, args.mb)
        print(
            f"corpus: {n_bytes / 1e6:.1f} MB in {len(list(corpus.iterdir()))} files ({time.perf_counter() - t0:.1f} s)"
        )

        from trainer.hf_data import TextFiles
        from trainer.tokenizer import build_tokenizer

        files = TextFiles.under(str(corpus))
        sample = TextFiles(files.files[: max(1, int(BPE_SAMPLE_MB / FILE_MB))])
        t0 = time.perf_counter()
        tok = build_tokenizer(f"bpe:{args.bpe}", sample.texts, seed=0)
        bpe_s = time.perf_counter() - t0
        tok_file = tmp / "tokenizer.json"
        text = tok.to_json()
        assert text is not None
        tok_file.write_text(text)
        print(
            f"bpe:{args.bpe}: learnt from {sample.total_bytes() / 1e6:.1f} MB in {bpe_s:.1f} s ({tok.vocab_size} ids)"
        )

        results: dict[str, Any] = {
            "corpus_mb": n_bytes / 1e6,
            "bpe_vocab": tok.vocab_size,
            "bpe_train_s": bpe_s,
            "cpu_count": os.cpu_count(),
            "runs": [],
        }
        header = (
            f"{'tokenizer':>12} {'workers':>7} {'tokens':>12} {'seconds':>8} {'tok/s':>12} {'MB/s':>7} "
            f"{'rss before':>10} {'peak':>8} {'worker peak':>11} {'cpu s':>7} {'load':>5} {'speed-up':>8}"
        )
        print(header)
        for name, spec in (("bytes", "bytes"), (f"bpe:{args.bpe}", str(tok_file))):
            base = None
            for w in workers:
                r = measure(corpus, spec, w, tmp / f"out_{w}")
                r.update(tokenizer=name, workers=w, tokens_per_s=r["tokens"] / r["seconds"])
                r["mb_per_s"] = n_bytes / 1e6 / r["seconds"]
                if w == 1:
                    base = r
                assert base is not None
                r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["same_tokens_as_workers_1"] = r["sha256"] == base["sha256"]
                results["runs"].append(r)
                print(
                    f"{name:>12} {w:>7} {r['tokens']:>12,} {r['seconds']:>8.2f} {r['tokens_per_s']:>12,.0f} "
                    f"{r['mb_per_s']:>7.1f} {r['rss_before_mb']:>8.0f}MB {r['peak_mb']:>6.0f}MB "
                    f"{r['workers_peak_mb']:>9.0f}MB {r['cpu_s']:>7.1f} {r['load_before']:>5.1f} {r['speedup']:>7.2f}x"
                    + ("" if r["same_tokens_as_workers_1"] else "  TOKENS DIFFER")
                )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
