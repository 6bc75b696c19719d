"""Keyed dropout: masks are a function of (seed, step, global row, module), whatever the split of the batch."""

from __future__ import annotations

import pytest
import torch

from trainer.keyed_dropout import RowKeys, keyed_dropout, module_key, row_keys, uniform_from_keys

Q = module_key("layers.0.attn.q")


def _drop(x: torch.Tensor, *, seed: int, step: int, first_row: int, p: float = 0.1, key: int = Q) -> torch.Tensor:
    rows = RowKeys()
    rows.set(seed, step, first_row, x.shape[0], x.device)
    return keyed_dropout(x, p, rows=rows, key=key, training=True)


def test_any_split_of_the_batch_gives_every_row_the_same_mask():
    x = torch.randn(8, 16, 24)
    whole = _drop(x, seed=3, step=7, first_row=0)
    for parts in ([4, 4], [2, 2, 2, 2], [1, 3, 4]):
        start, pieces = 0, []
        for n in parts:
            pieces.append(_drop(x[start : start + n], seed=3, step=7, first_row=start))
            start += n
        assert torch.equal(torch.cat(pieces), whole)


def test_masks_differ_across_steps_seeds_rows_and_modules():
    x = torch.ones(4, 8, 32)
    base = _drop(x, seed=0, step=1, first_row=0)
    assert not torch.equal(base, _drop(x, seed=0, step=2, first_row=0))
    assert not torch.equal(base, _drop(x, seed=1, step=1, first_row=0))
    assert not torch.equal(base, _drop(x, seed=0, step=1, first_row=0, key=module_key("layers.0.attn.k")))
    assert not torch.equal(base[0], base[1])


def test_drop_rate_and_scaling_match_dropout():
    x = torch.ones(16, 64, 64)
    y = _drop(x, seed=0, step=0, first_row=0, p=0.25)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.01  # 65 536 Bernoulli draws: 5 standard deviations is 0.0085
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))


def test_uniforms_are_uniform_and_in_range():
    u = uniform_from_keys(torch.arange(1 << 18, dtype=torch.int64))
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 60  # 15 degrees of freedom: p < 1e-6 beyond 60


def test_row_keys_are_pure_and_distinct():
    assert row_keys(5, 9, range(3)) == row_keys(5, 9, range(3))
    keys = row_keys(5, 9, range(1000))
    assert len(set(keys)) == 1000
    assert all(-(1 << 63) <= k < (1 << 63) for k in keys)


def test_gradient_flows_through_kept_entries_only():
    x = torch.randn(4, 8, 16, requires_grad=True)
    y = _drop(x, seed=0, step=0, first_row=0, p=0.5)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert torch.all(x.grad[~kept] == 0)


def test_identity_in_eval_and_plain_dropout_without_keys():
    x = torch.randn(4, 8, 16)
    assert keyed_dropout(x, 0.1, rows=RowKeys(), key=Q, training=False) is x
    assert keyed_dropout(x, 0.0, rows=None, key=Q, training=True) is x
    torch.manual_seed(0)
    y = keyed_dropout(x, 0.5, rows=RowKeys(), key=Q, training=True)  # no keys: plain dropout
    assert ((y == 0).float().mean() - 0.5).abs() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_equal_cpu_masks():
    x = torch.randn(4, 8, 16)
    assert torch.equal(_drop(x.cuda(), seed=1, step=2, first_row=3).cpu(), _drop(x, seed=1, step=2, first_row=3))


@pytest.mark.slow
def test_dropout_bench_quick(tmp_path, capsys):
    """benchmarks/dropout_bench.py --quick runs end to end: positive times, both kinds, masks equal across devices."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "dropout_bench.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = bench
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--json", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["settings"]["rows"] == 2
    for workload in ("op", "layer"):
        assert all(out["seconds"][workload][k] > 0 for k in ("plain", "keyed"))
        assert out["time_ratio_keyed_over_plain"][workload] > 0
        assert out["saved_bytes"][workload]["keyed"] > 0
    assert out["masks_agree"] == {"device_equals_cpu": True}
    assert "keyed/plain, layer: time" in capsys.readouterr().out
