"""dynamics.stats: known answers for intervals, tests, effect sizes and multiple-comparison adjustment."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from dynamics.stats import (
    PAIRED_T,
    WELCH,
    WILCOXON,
    adjust_pvalues,
    compare,
    compare_methods,
    describe,
    format_p,
    mean_interval,
    verdict,
)
from dynamics.validation import DynamicsError

# ------------------------------------------------------------------------------------------ intervals


def test_t_interval_by_hand():
    # x = [1, 2, 3, 4]: mean 2.5; s² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; s/√n = √(5/12) = 0.645497;
    # t_{0.975, 3} = 3.182446 (tables); half width 3.182446 · 0.645497 = 2.054261
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert lo == pytest.approx(2.5 - 2.054261, abs=1e-5) and hi == pytest.approx(2.5 + 2.054261, abs=1e-5)
    # 90 %: t_{0.95, 3} = 2.353363 → half width 2.353363 · 0.645497 = 1.519090
    _, lo90, hi90 = mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.9)
    assert hi90 - 2.5 == pytest.approx(1.519090, abs=1e-5)


def test_interval_needs_two_values_and_finite_input():
    assert mean_interval([3.0]) == (3.0, None, None)
    with pytest.raises(DynamicsError, match="no values"):
        mean_interval([])
    with pytest.raises(DynamicsError, match="finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(DynamicsError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=95)


# ------------------------------------------------------------------------------------------ tests

A = np.array([2.10, 2.31, 1.95, 2.40, 2.05])
B = np.array([2.21, 2.38, 2.11, 2.43, 2.20])


def test_paired_t_matches_scipy_and_the_hand_formulas():
    c = compare(A, B, paired=True)
    ref = sp.ttest_rel(B, A)
    assert c.test == PAIRED_T and c.paired
    assert c.statistic == pytest.approx(ref.statistic) and c.p_value == pytest.approx(ref.pvalue)
    d = B - A
    assert c.difference == pytest.approx(d.mean())
    half = sp.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (c.low, c.high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert c.effect_name == "Cohen's d_z" and c.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    # the paired t statistic is d_z · √n
    assert c.statistic == pytest.approx(c.effect_size * math.sqrt(5))


def test_welch_matches_scipy_and_the_hand_formulas():
    a, b = A, np.array([2.6, 2.2, 2.9, 2.45])
    c = compare(a, b, paired=False)
    ref = sp.ttest_ind(b, a, equal_var=False)
    assert c.test == WELCH and not c.paired
    assert c.statistic == pytest.approx(ref.statistic) and c.p_value == pytest.approx(ref.pvalue)
    va, vb = a.var(ddof=1), b.var(ddof=1)
    se = math.sqrt(va / 5 + vb / 4)
    df = (va / 5 + vb / 4) ** 2 / ((va / 5) ** 2 / 4 + (vb / 4) ** 2 / 3)
    assert c.statistic == pytest.approx((b.mean() - a.mean()) / se)
    assert c.high - c.difference == pytest.approx(sp.t.ppf(0.975, df) * se)
    pooled = math.sqrt((4 * va + 3 * vb) / 7)
    assert c.effect_name == "Hedges' g"
    assert c.effect_size == pytest.approx((1 - 3 / (4 * 9 - 9)) * (b.mean() - a.mean()) / pooled)


def test_wilcoxon_from_six_pairs():
    rng = np.random.default_rng(3)
    a = rng.normal(size=6)
    b = a + np.array([0.5, 0.7, 0.2, 0.9, 0.4, 0.6])
    c = compare(a, b, paired=True)
    assert c.test == WILCOXON
    # all six differences positive: exact two-sided p = 2 / 2⁶ = 0.03125
    assert c.p_value == pytest.approx(2 / 64)
    assert compare(a[:5], b[:5], paired=True).test == PAIRED_T


def test_single_seed_is_not_testable():
    c = compare([2.9], [2.95], paired=True)
    assert not c.testable and c.test.startswith("not testable") and "need >= 2" in c.test
    assert c.p_value is None and c.low is None and c.effect_size is None and c.statistic is None
    assert c.low_a is None and c.difference == pytest.approx(0.05)
    assert describe(_row(c)).startswith("not testable")
    assert verdict(_row(c), +1) == "not testable"
    unpaired = compare([1.0, 2.0], [1.5], paired=False)
    assert unpaired.p_value is None and "need >= 2" in unpaired.test


def test_degenerate_inputs():
    same = compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], paired=True)  # every difference 0.5: no variance to test
    assert same.p_value is None and "same" in same.test
    with pytest.raises(DynamicsError, match="equal lengths"):
        compare([1.0, 2.0], [1.0], paired=True)
    with pytest.raises(DynamicsError, match="finite"):
        compare([1.0, np.inf], [1.0, 2.0], paired=True)


def _row(c) -> dict:
    return {
        "difference": c.difference,
        "difference low": c.low,
        "difference high": c.high,
        "test": c.test,
        "p_value": c.p_value,
        "p_adjusted": c.p_value,
        "significant": None if c.p_value is None else c.p_value < 0.05,
    }


# ------------------------------------------------------------------------------------------ adjustment


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm, m = 4: sorted 0.005, 0.01, 0.03, 0.04 times (4, 3, 2, 1) = 0.02, 0.03, 0.06, 0.04;
    # running maximum 0.02, 0.03, 0.06, 0.06; back in input order:
    assert adjust_pvalues(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p · m / rank = 0.005·4/1, 0.01·4/2, 0.03·4/3, 0.04·4/4 = 0.02, 0.02, 0.04, 0.04;
    # running minimum from the largest rank down: 0.02, 0.02, 0.04, 0.04; in input order:
    assert adjust_pvalues(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust_pvalues(p, "bh") == pytest.approx(sp.false_discovery_control(p, method="bh"))


def test_adjustment_is_nan_safe_and_capped():
    p = [0.01, None, float("nan"), 0.04, 0.9]
    holm = adjust_pvalues(p, "holm")  # m = 3 finite p-values
    assert np.isnan(holm[1]) and np.isnan(holm[2])
    assert holm[[0, 3, 4]] == pytest.approx([0.03, 0.08, 0.9])
    assert adjust_pvalues([0.6, 0.7], "holm") == pytest.approx([1.0, 1.0])  # capped at 1
    assert np.isnan(adjust_pvalues([None, None], "bh")).all()
    with pytest.raises(DynamicsError, match="method"):
        adjust_pvalues([0.1], "bonferroni")
    with pytest.raises(DynamicsError, match=r"\[0, 1\]"):
        adjust_pvalues([1.2], "bh")


# ------------------------------------------------------------------------------------------ a results table


def _values(effect: float, n_seeds: int = 3, n_quantities: int = 12, noise: float = 0.01) -> pd.DataFrame:
    """``n_quantities`` quantities per run; ReLoRA = full-rank + ``effect`` + noise, paired by seed."""
    rng = np.random.default_rng(11)
    rows = []
    for q in range(n_quantities):
        for seed in range(n_seeds):
            base = rng.normal(1.0, 0.1)
            rows.append(dict(quantity=f"q{q}", method="full", seed=seed, value=base + rng.normal(0, noise)))
            rows.append(dict(quantity=f"q{q}", method="relora", seed=seed, value=base + effect + rng.normal(0, noise)))
    return pd.DataFrame(rows)


def test_no_true_difference_nothing_significant():
    out = compare_methods(_values(0.0), adjust="bh")
    assert (out["test"] == PAIRED_T).all() and out["p_value"].notna().all()
    assert not out["significant"].any()
    assert all(describe(r).startswith("no detectable difference") for _, r in out.iterrows())
    assert out.attrs["adjust"] == "bh"


def test_large_planted_difference_found():
    out = compare_methods(_values(-0.2), adjust="holm")
    assert out["significant"].all()
    assert (out["difference"].astype(float) < 0).all()
    row = out.iloc[0]
    assert row["difference low"] < -0.2 < row["difference high"]
    text = describe(row, adjust="holm")
    assert text.startswith("ReLoRA lower (Δ = −0.") and "paired t-test" in text and "Holm-adjusted" in text
    assert verdict(row, -1) == "supported" and verdict(row, +1) == "contradicted"


def test_unpairable_seeds_use_welch_and_one_seed_tests_nothing():
    v = _values(-0.2)
    v.loc[v["method"] == "relora", "seed"] += 10  # different seeds: cannot pair
    out = compare_methods(v)
    assert (out["test"] == WELCH).all() and (out["effect name"] == "Hedges' g").all()
    one = compare_methods(_values(-0.2, n_seeds=1))
    assert one["p_value"].isna().all() and one["p_adjusted"].isna().all()
    assert one["significant"].isna().all() and one["full low"].isna().all()
    assert all(verdict(r, -1) == "not testable" for _, r in one.iterrows())


def test_compare_methods_input_errors():
    with pytest.raises(DynamicsError, match="columns"):
        compare_methods(pd.DataFrame({"quantity": ["a"], "value": [1.0]}))
    v = _values(0.0)
    with pytest.raises(DynamicsError, match="both methods"):
        compare_methods(v[v["method"] == "full"])
    with pytest.raises(DynamicsError, match="adjust"):
        compare_methods(v, adjust="none")


def test_format_p():
    assert format_p(0.0004) == "< 0.001" and format_p(0.004) == "0.004" and format_p(0.312) == "0.31"
    assert format_p(None) == "–"
