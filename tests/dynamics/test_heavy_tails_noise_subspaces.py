"""Known answers: power-law alpha, Marchenko–Pastur signal rank, principal angles, intruders, debiased CKA, seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import dynamics
from dynamics.heavy_tails import FIT_STATUS
from dynamics.validation import DynamicsError, NonFiniteError, ShapeError


def pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    """Samples with density ∝ x^(−alpha), x >= 1 (inverse CDF)."""
    return (1.0 - np.random.default_rng(seed).random(n)) ** (-1.0 / (alpha - 1.0))


# ------------------------------------------------------------------------------------------ heavy tails


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.5])
@pytest.mark.parametrize("n", [1000, 2500])
def test_pareto_eigenvalues_recover_alpha_within_10_percent(alpha, n):
    fit = dynamics.fit_power_law(pareto(alpha, n, seed=int(10 * alpha) + n))
    assert fit.status == "ok"
    assert abs(fit.alpha - alpha) <= 0.1 * alpha
    assert 0 < fit.ks < 1.36 / math.sqrt(fit.n_tail) and fit.n_tail >= 10 and fit.xmin >= 1.0


def test_xmin_is_found_above_a_non_power_law_body():
    rng = np.random.default_rng(3)
    body = rng.uniform(0.01, 1.0, 2000)  # not a power law below 1
    fit = dynamics.fit_power_law(np.r_[body, pareto(2.5, 1500, seed=4)])
    assert fit.status == "ok" and abs(fit.alpha - 2.5) <= 0.25 and fit.xmin >= 0.9


def test_esd_of_a_matrix_fits_sigma_squared():
    lam = pareto(3.0, 1200, seed=5)
    spec = dynamics.Spectrum(np.sort(np.sqrt(lam))[::-1], (1200, 1500))
    fit = dynamics.esd_power_law(spec)
    direct = dynamics.fit_power_law(lam)
    assert fit.status == "ok" and fit.alpha == pytest.approx(direct.alpha, rel=1e-9)
    assert fit.xmin == pytest.approx(direct.xmin, rel=1e-9)  # xmin in σ² units


def test_failed_fits_give_a_status_never_a_number():
    too_few = dynamics.fit_power_law(np.arange(1.0, 6.0))
    assert too_few.status == "too_few" and too_few.alpha is None and not too_few.fitted
    assert too_few.metrics() == {"alpha_status": FIT_STATUS["too_few"]}
    flat = dynamics.fit_power_law(np.ones(50))
    assert flat.status == "degenerate" and flat.alpha is None
    zero = dynamics.esd_power_law(np.zeros((20, 30)))
    assert zero.status == "too_few" and "alpha" not in zero.metrics()
    low_rank = dynamics.esd_power_law(np.outer(np.arange(1.0, 21.0), np.ones(30)))  # rank 1: one eigenvalue
    assert low_rank.status == "too_few"
    # an exponential law forced to fit over most of its range (min_tail) is flagged, with its numbers kept
    exponential = dynamics.fit_power_law(np.random.default_rng(0).exponential(size=3000) + 1.0, min_tail=1500)
    assert exponential.status == "poor_fit" and exponential.metrics()["alpha_status"] == FIT_STATUS["poor_fit"]
    with pytest.raises(NonFiniteError):
        dynamics.fit_power_law([1.0, np.nan, 2.0])
    with pytest.raises(ShapeError, match="1-D"):
        dynamics.fit_power_law(np.ones((3, 3)))


# ------------------------------------------------------------------------------------------ Marchenko–Pastur


def test_gaussian_matrix_has_almost_no_singular_values_above_the_mp_edge():
    rng = np.random.default_rng(0)
    counts = [dynamics.signal_rank(0.02 * rng.standard_normal((300, 120))).rank for _ in range(20)]
    assert sum(counts) <= 4 and max(counts) <= 1
    res = dynamics.signal_rank(rng.standard_normal((300, 120)))
    assert res.edge == pytest.approx(math.sqrt(300) + math.sqrt(120), rel=0.02)  # unit variance


@pytest.mark.parametrize("k", [1, 3, 6])
def test_planted_rank_k_signal_gives_k(k):
    rng = np.random.default_rng(k)
    m, n = 400, 200
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    strength = 4 * (math.sqrt(m) + math.sqrt(n)) * (1 + np.arange(k)[::-1] / k)
    res = dynamics.signal_rank(rng.standard_normal((m, n)) + u @ np.diag(strength) @ v.T)
    assert res.rank == k
    planted = float(np.sum(strength**2))
    assert res.energy == pytest.approx(planted / (planted + m * n), rel=0.15)  # the spikes' share of the energy
    assert res.metrics()["signal_rank"] == k


def test_signal_rank_edge_cases():
    zero = dynamics.signal_rank(np.zeros((5, 7)))
    assert (zero.rank, zero.energy, zero.edge) == (0, 0.0, 0.0)
    assert dynamics.mp_edge((100, 25), 4.0) == pytest.approx(2 * (10 + 5))
    with pytest.raises(DynamicsError, match="variance"):
        dynamics.mp_edge((3, 3), -1.0)
    with pytest.raises(ShapeError, match="batch"):
        dynamics.signal_rank(dynamics.spectrum(np.ones((2, 3, 3))))


# ------------------------------------------------------------------------------------------ subspaces


def test_identical_subspaces_overlap_1_and_orthogonal_0():
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((50, 10)))[0]
    a, b = q[:, :4], q[:, 4:8]
    assert dynamics.subspace_overlap(a, a @ rng.standard_normal((4, 4))) == pytest.approx(1.0, abs=1e-10)
    assert dynamics.subspace_overlap(a, b) == pytest.approx(0.0, abs=1e-12)
    angles = dynamics.principal_angles(a, np.c_[a[:, :2], b[:, :2]])
    np.testing.assert_allclose(angles, [0, 0, np.pi / 2, np.pi / 2], atol=1e-7)
    assert dynamics.subspace_overlap(a, np.c_[a[:, :2], b[:, :2]]) == pytest.approx(0.5)
    with pytest.raises(DynamicsError, match="linearly dependent"):
        dynamics.principal_angles(a, np.c_[a[:, :1], a[:, :1]])
    with pytest.raises(ShapeError, match="same number of rows"):
        dynamics.principal_angles(a, np.ones((49, 2)))


def test_random_subspaces_overlap_at_the_chance_level():
    rng = np.random.default_rng(1)
    vals = [dynamics.subspace_overlap(rng.standard_normal((200, 8)), rng.standard_normal((200, 8))) for _ in range(30)]
    assert np.mean(vals) == pytest.approx(dynamics.chance_overlap(200, 8), rel=0.25)


def test_update_overlap_same_and_disjoint_updates():
    rng = np.random.default_rng(2)
    q_out = np.linalg.qr(rng.standard_normal((40, 8)))[0]
    q_in = np.linalg.qr(rng.standard_normal((30, 8)))[0]
    d1 = q_out[:, :4] @ np.diag([4.0, 3, 2, 1]) @ q_in[:, :4].T
    d2 = q_out[:, :4] @ rng.standard_normal((4, 4)) @ q_in[:, :4].T  # same subspaces, mixed inside
    d3 = q_out[:, 4:] @ np.diag([4.0, 3, 2, 1]) @ q_in[:, 4:].T  # orthogonal subspaces
    same, other = dynamics.update_overlap(d1, d2, 4), dynamics.update_overlap(d1, d3, 4)
    assert same.mean == pytest.approx(1.0) and same.out_ == pytest.approx(1.0) and same.in_ == pytest.approx(1.0)
    assert other.mean == pytest.approx(0.0, abs=1e-12)
    assert dynamics.update_overlap(d1, d2, 16).k == 4  # reduced to the rank of the updates
    assert same.chance == pytest.approx((4 / 40 + 4 / 30) / 2)
    with pytest.raises(DynamicsError, match="zero"):
        dynamics.update_overlap(d1, np.zeros_like(d1), 4)


def test_intruder_dimensions():
    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.standard_normal((60, 60)))[0]
    v = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    s = np.linspace(10, 1, 40)
    w0 = u[:, :40] @ np.diag(s) @ v.T
    assert dynamics.intruder_dimensions(w0, w0) == 0
    assert dynamics.intruder_dimensions(1.5 * w0 + 0.01 * rng.standard_normal(w0.shape), w0) == 0
    # two strong new directions in the part of R^60 that W_0 does not span
    new = u[:, 40:42] @ np.diag([50.0, 40.0]) @ v[:, :2].T
    assert dynamics.intruder_dimensions(w0 + new, w0) == 2
    assert dynamics.intruder_dimensions(w0 + new, w0, k=1) == 1
    with pytest.raises(DynamicsError, match="threshold"):
        dynamics.intruder_dimensions(w0, w0, threshold=0)


# ------------------------------------------------------------------------------------------ debiased CKA


def test_debiased_cka_of_independent_features_is_near_zero_where_biased_is_not():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 500)), rng.standard_normal((64, 500))
    assert dynamics.linear_cka(x, y) > 0.8
    assert abs(dynamics.debiased_linear_cka(x, y)) < 0.1
    rot = np.linalg.qr(rng.standard_normal((500, 500)))[0]
    assert dynamics.debiased_linear_cka(x, 3.0 * x @ rot) == pytest.approx(1.0, abs=1e-9)


def test_debiased_cka_matches_the_n_by_n_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 7))
    y = x @ rng.standard_normal((7, 5)) + rng.standard_normal((30, 5))

    def hsic1(k, l_):
        n = k.shape[0]
        k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
        one = np.ones(n)
        return (
            np.trace(k @ l_) + one @ k @ one * (one @ l_ @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l_ @ one
        ) / (n * (n - 3))

    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T
    expected = hsic1(k, l_) / math.sqrt(hsic1(k, k) * hsic1(l_, l_))
    assert dynamics.debiased_linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    batch = dynamics.debiased_linear_cka(np.stack([x, x]), np.stack([y, 2.0 * y]))
    np.testing.assert_allclose(batch, [expected, expected], rtol=1e-10)
    with pytest.raises(DynamicsError, match="at least 4"):
        dynamics.debiased_linear_cka(x[:3], y[:3])
    with pytest.raises(DynamicsError, match="HSIC_1"):
        dynamics.debiased_linear_cka(np.ones((10, 3)), y[:10])


# ------------------------------------------------------------------------------------------ seeds


def _seed_table(effect: float, n_seeds: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for seed in range(n_seeds):
        base = rng.normal(0.5, 0.05)  # shared by the pair: a paired design removes it
        for method, shift in (("full", 0.0), ("relora", effect)):
            run = f"{method}-s{seed}"
            rows.append(
                dict(
                    run=run,
                    method=method,
                    step=0,
                    tokens=None,
                    layer=-1,
                    component="model",
                    kind="run",
                    metric="seed",
                    value=float(seed),
                )
            )
            for layer in range(2):
                rows.append(
                    dict(
                        run=run,
                        method=method,
                        step=10,
                        tokens=100,
                        layer=layer,
                        component="attn.q",
                        kind="weight",
                        metric="proportional_effective_rank",
                        value=base + shift + rng.normal(0, 0.005),
                    )
                )
    return pd.DataFrame(rows)


def test_seed_summary_intervals_and_paired_test():
    out = dynamics.seed_summary(_seed_table(0.05, 5))
    row = out.loc["attn.q"]
    assert row["test"].startswith("paired t-test") and row["relora n"] == 5
    assert row["p_value"] < 0.001 and row["difference"] == pytest.approx(0.05, abs=0.01)
    assert row["full ci95 low"] < row["full mean"] < row["full ci95 high"]
    null = dynamics.seed_summary(_seed_table(0.0, 5)).loc["attn.q"]
    assert null["p_value"] > 0.01
    one = dynamics.seed_summary(_seed_table(0.05, 1)).loc["attn.q"]
    assert one["p_value"] is None and one["full ci95 low"] is None and "need >= 2" in one["test"]
    unpaired = _seed_table(0.05, 4)
    unpaired = unpaired[unpaired.kind != "run"]  # no seed rows: Welch's test, named
    assert dynamics.seed_summary(unpaired).loc["attn.q", "test"].startswith("Welch")


# ------------------------------------------------------------------------------------------ figures


def _analysis_table() -> pd.DataFrame:
    """Two seeds per method; every metric the new figures read, on 2 layers × 3 steps."""
    rng = np.random.default_rng(0)
    comps = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
    rows = []

    def add(run, method, step, layer, comp, kind, metric, value):
        rows.append(
            dict(
                run=run,
                method=method,
                step=step,
                tokens=step * 100,
                layer=layer,
                component=comp,
                kind=kind,
                metric=metric,
                value=float(value),
            )
        )

    for seed in (0, 1):
        for method in ("full", "relora"):
            run = f"{method}-s{seed}"
            add(run, method, 0, -1, "model", "run", "seed", seed)
            for step in (0, 10, 20):
                add(run, method, step, -1, "model", "train", "loss", 5 - step / 10)
                for layer in (0, 1):
                    for comp in comps:
                        for kind in ("weight", "grad"):
                            add(run, method, step, layer, comp, kind, "alpha_status", 0 if layer == 0 else 2)
                            if layer == 0:
                                add(run, method, step, layer, comp, kind, "alpha", 3 + rng.random())
                            add(run, method, step, layer, comp, kind, "signal_rank", rng.integers(0, 5))
                            add(run, method, step, layer, comp, kind, "signal_energy", rng.random())
                            add(run, method, step, layer, comp, kind, "proportional_effective_rank", rng.random())
                        add(run, method, step, layer, comp, "weight", "intruders", rng.integers(0, 10))
                        if method == "relora" and step == 20:
                            add(run, method, step, layer, comp, "update_merge", "overlap_prev", rng.random())
                            add(run, method, step, layer, comp, "update_merge", "overlap_prev_chance", 0.1)
                        if method == "relora" and step > 0:
                            add(run, method, step, layer, comp, "cross_run", "update_overlap", rng.random())
                            add(run, method, step, layer, comp, "cross_run", "update_overlap_chance", 0.1)
                    if method == "relora":
                        for metric in ("cka", "cka_debiased"):
                            add(run, method, step, layer, "resid_post", "cross_run", metric, rng.random())
    return pd.DataFrame(rows)


def test_new_figures_are_drawn_and_registered():
    """What the figures show: one line per method and matrix over the table's steps, methods in the legend."""
    import matplotlib.pyplot as plt

    from dynamics import plots

    table = _analysis_table()
    fig = plots.plot_heavy_tails(table, x="step")
    drawn = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() == "o"]  # not the merge marks
    assert len(drawn) == 2 * 2 * 7  # 2 kinds × 7 components × 2 methods
    assert all(set(ln.get_xdata()) == {0, 10, 20} for ln in drawn)
    # alpha is drawn only where the fit is ok (layer 0): each point is the mean over seeds of layer 0's alpha
    weight_q = table[(table.kind == "weight") & (table.metric == "alpha") & (table.component == "attn.q")]
    expected = weight_q[weight_q.method == "full"].groupby("step")["value"].mean().to_numpy()
    assert any(np.allclose(ln.get_ydata(), expected) for ln in drawn)
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert any("full" in t.lower() for t in legend) and any("relora" in t.lower() for t in legend)
    plt.close(fig)
    plt.close(plots.plot_cross_run_cka(table))
    fig = plots.plot_seed_summary(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "mlp.gate",
        "mlp.up",
        "mlp.down",
    ]
    assert len(ax.patches) == 2 * 7  # one bar per method and component
    plt.close(fig)
    assert {"heavy_tails", "signal_rank", "update_subspaces", "intruders", "cross_run_cka", "seed_summary"} <= set(
        plots.REGISTRY
    )
    with pytest.raises(DynamicsError, match="weight/alpha"):
        plots.plot_heavy_tails(table[table.metric != "alpha"])
    with pytest.raises(DynamicsError, match=">= 2 runs"):
        plots.plot_seed_summary(table[~table.run.str.endswith("s1")])
    assert plt.get_fignums() == []
