"""Per-head OV/QK circuits with GQA, SwiGLU and whole-layer views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamics
from dynamics import DynamicsError, ShapeError

D, H, G, HD, HIDDEN = 48, 6, 2, 8, 96


def weights(seed=0, d=D, h=H, g=G, hd=HD, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(h * hd, d, generator=gen, dtype=dtype),
        "k": torch.randn(g * hd, d, generator=gen, dtype=dtype),
        "v": torch.randn(g * hd, d, generator=gen, dtype=dtype),
        "o": torch.randn(d, h * hd, generator=gen, dtype=dtype),
        "gate": torch.randn(HIDDEN, d, generator=gen, dtype=dtype),
        "up": torch.randn(HIDDEN, d, generator=gen, dtype=dtype),
        "down": torch.randn(d, HIDDEN, generator=gen, dtype=dtype),
    }


def test_kv_head_index_gqa_mapping():
    assert [dynamics.kv_head_index(h, n_heads=12, n_kv_heads=4) for h in range(12)] == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
        3,
        3,
        3,
    ]
    assert dynamics.kv_head_index(5, n_heads=6, n_kv_heads=6) == 5  # MHA
    assert dynamics.kv_head_index(5, n_heads=6, n_kv_heads=1) == 0  # MQA
    with pytest.raises(DynamicsError, match="multiple"):
        dynamics.kv_head_index(0, n_heads=12, n_kv_heads=5)
    with pytest.raises(DynamicsError, match="< n_heads"):
        dynamics.kv_head_index(12, n_heads=12, n_kv_heads=4)


def test_ov_circuit_is_wo_times_wv_of_the_group():
    w = weights()
    for h in range(H):
        g = h // (H // G)
        expected = w["o"][:, h * HD : (h + 1) * HD] @ w["v"][g * HD : (g + 1) * HD, :]
        got = dynamics.ov_circuit(w["o"], w["v"], head=h, n_heads=H, n_kv_heads=G)
        assert got.shape == (D, D)
        torch.testing.assert_close(got, expected)


def test_qk_circuit_is_wq_transpose_times_wk_of_the_group():
    w = weights(1)
    for h in range(H):
        g = h // (H // G)
        expected = w["q"][h * HD : (h + 1) * HD, :].T @ w["k"][g * HD : (g + 1) * HD, :]
        got = dynamics.qk_circuit(w["q"], w["k"], head=h, n_heads=H, n_kv_heads=G)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("g", [1, 2, 3, 6])
def test_circuit_spectra_match_direct_route(g):
    w = weights(2, g=g)
    ov = dynamics.ov_circuit_spectra(w["o"], w["v"], n_heads=H, n_kv_heads=g)
    qk = dynamics.qk_circuit_spectra(w["q"], w["k"], n_heads=H, n_kv_heads=g)
    for spec in (ov, qk):
        assert spec.batch_shape == (H,) and spec.shape == (D, D) and spec.values.shape == (H, HD)
        assert spec.method == "factored"
    for h in range(H):
        dense_ov = dynamics.ov_circuit(w["o"], w["v"], head=h, n_heads=H, n_kv_heads=g)
        dense_qk = dynamics.qk_circuit(w["q"], w["k"], head=h, n_heads=H, n_kv_heads=g)
        for spec, dense in ((ov, dense_ov), (qk, dense_qk)):
            ref = dynamics.singular_values(dense, method="direct")
            np.testing.assert_allclose(spec.values[h], ref[:HD], rtol=1e-9)
            assert np.all(ref[HD:] <= 1e-10 * ref[0])
            assert spec[h].effective_rank() == pytest.approx(dynamics.effective_rank(dense), rel=1e-9)
            assert spec[h].numerical_rank() == dynamics.numerical_rank(dense) == HD


def test_ov_order_matters():
    """W_V^h W_O^h (hd x hd) is not the OV circuit: its spectrum differs."""
    w = weights(3)
    ov = dynamics.ov_circuit_spectra(w["o"], w["v"], n_heads=H, n_kv_heads=G)
    wrong = w["v"][:HD, :] @ w["o"][:, :HD]
    assert not np.allclose(ov.values[0], dynamics.singular_values(wrong), rtol=1e-3)


def test_gqa_heads_use_their_group():
    w = weights(4)
    v = w["v"].clone()
    v[HD:] *= 10.0  # KV head 1 is 10x larger -> query heads 3..5 scale by 10
    base = dynamics.ov_circuit_spectra(w["o"], w["v"], n_heads=H, n_kv_heads=G)
    scaled = dynamics.ov_circuit_spectra(w["o"], v, n_heads=H, n_kv_heads=G)
    np.testing.assert_allclose(scaled.values[:3], base.values[:3], rtol=1e-12)
    np.testing.assert_allclose(scaled.values[3:], 10 * base.values[3:], rtol=1e-12)


def test_circuit_spectra_batched_over_layers_and_dtype():
    ws = [weights(s, dtype=torch.float32) for s in range(3)]
    o = torch.stack([w["o"] for w in ws])
    v = torch.stack([w["v"] for w in ws])
    spec = dynamics.ov_circuit_spectra(o, v, n_heads=H, n_kv_heads=G)
    assert spec.batch_shape == (3, H) and spec.dtype == "float32"
    single = dynamics.ov_circuit_spectra(ws[1]["o"], ws[1]["v"], n_heads=H, n_kv_heads=G)
    np.testing.assert_allclose(spec.values[1], single.values, rtol=1e-12)
    assert spec.proportional_effective_rank().max() <= HD / D  # rank <= hd, PER divides by d
    assert np.all(spec.condition_number() == np.inf)
    assert np.all(np.isfinite(spec.truncated_condition_number()))


def test_circuit_shape_errors_state_expected_shape():
    w = weights()
    with pytest.raises(ShapeError, match=r"`w_v` must have shape \(n_kv_heads\*hd, d\)"):
        dynamics.ov_circuit_spectra(w["o"], w["v"][:-1], n_heads=H, n_kv_heads=G)
    with pytest.raises(ShapeError, match="multiple of the number of heads"):
        dynamics.qk_circuit_spectra(w["q"], w["k"], n_heads=5, n_kv_heads=1)
    with pytest.raises(DynamicsError, match="multiple of `n_kv_heads`"):
        dynamics.qk_circuit_spectra(w["q"], w["k"], n_heads=6, n_kv_heads=4)
    with pytest.raises(ShapeError):  # swapped factors: (d, H*hd) where (H*hd, d) expected
        dynamics.ov_circuit_spectra(w["v"], w["o"], n_heads=H, n_kv_heads=G)


def test_split_heads():
    w = weights()
    q = dynamics.split_heads(w["q"], n_heads=H)
    assert q.shape == (H, HD, D)
    torch.testing.assert_close(q[2], w["q"][2 * HD : 3 * HD])
    o = dynamics.split_heads(w["o"].numpy(), n_heads=H, axis="in")
    assert isinstance(o, np.ndarray) and o.shape == (H, D, HD)
    np.testing.assert_array_equal(o[4], w["o"].numpy()[:, 4 * HD : 5 * HD])
    with pytest.raises(DynamicsError, match="axis"):
        dynamics.split_heads(w["q"], n_heads=H, axis="rows")


def test_views():
    w = weights()
    att = dynamics.attention_views(w["q"], w["k"], w["v"], w["o"])
    assert att["qkv"].shape == ((H + 2 * G) * HD, D)
    torch.testing.assert_close(att["qkv"], torch.cat([w["q"], w["k"], w["v"]]))
    mlp = dynamics.mlp_views(w["gate"].numpy(), w["up"].numpy(), w["down"].numpy())
    assert isinstance(mlp["gate_up"], np.ndarray) and mlp["gate_up"].shape == (2 * HIDDEN, D)
    layer = dynamics.layer_views(*(w[k] for k in ("q", "k", "v", "o", "gate", "up", "down")))
    assert layer["read"].shape == ((H + 2 * G) * HD + 2 * HIDDEN, D)
    assert layer["write"].shape == (D, H * HD + HIDDEN)
    assert set(layer) == {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "read", "write"}
    m = dynamics.spectrum_metrics(layer["read"])
    assert 1 <= m["effective_rank"] <= D
    with pytest.raises(ShapeError, match="cannot concatenate"):
        dynamics.attention_views(w["q"], w["k"], w["v"].T, w["o"])
