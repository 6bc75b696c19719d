"""Comparisons across seeds: intervals, paired and unpaired tests, effect sizes, multiple-comparison control.

Each seed is one observation per method (SPEC §5, "Comparisons across seeds").
For a quantity measured on runs of two methods ``a`` (full-rank) and ``b``
(ReLoRA):

* **per method**: the mean and its 95 % Student-t interval
  ``x̄ ± t_{0.975, n−1} · s / √n`` (``s`` the sample standard deviation,
  ``ddof = 1``); no interval with one run.
* **paired by seed** (both methods have the same seeds): the differences
  ``dᵢ = bᵢ − aᵢ``; the difference is ``d̄`` with the t-interval of the ``dᵢ``;
  the test is the **paired t-test** (``t = d̄ / (s_d/√n)``, ``n − 1`` degrees of
  freedom; :func:`scipy.stats.ttest_rel`) for 2 ≤ n < 6 pairs and the
  **Wilcoxon signed-rank test** (:func:`scipy.stats.wilcoxon`, exact null
  distribution for small n without ties) for n ≥ 6 pairs; the effect size is
  **Cohen's d_z** ``= d̄ / s_d`` (Cohen 1988, §2.3.5).
* **unpaired** (seeds differ or are unknown): the difference of means
  ``b̄ − ā`` with the Welch–Satterthwaite interval
  ``± t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b)``,
  ``ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))``;
  **Welch's t-test** (:func:`scipy.stats.ttest_ind`, ``equal_var=False``); the
  effect size is **Hedges' g** ``= J · (b̄ − ā) / s_p`` with the pooled
  ``s_p = √(((n_a−1)s_a² + (n_b−1)s_b²)/(n_a+n_b−2))`` and the small-sample
  correction ``J = 1 − 3 / (4(n_a+n_b) − 9)`` (Hedges 1981).
* **many comparisons at once**: :func:`adjust_pvalues` — Holm's step-down
  procedure (family-wise error; Holm 1979) or Benjamini–Hochberg (false
  discovery rate; Benjamini & Hochberg 1995).

With fewer than two runs of a method (or two seed pairs) nothing is tested: the
result says "not testable" and carries no p-value, interval or effect size,
never a made-up number. All tests are two-sided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from dynamics.validation import DynamicsError

__all__ = [
    "PAIRED_T",
    "WILCOXON",
    "WELCH",
    "WILCOXON_MIN_PAIRS",
    "ADJUSTMENTS",
    "Comparison",
    "mean_interval",
    "compare",
    "paired_test",
    "adjust_pvalues",
    "compare_methods",
    "describe",
    "verdict",
    "format_p",
]

#: Test names, as the results and the report write them.
PAIRED_T = "paired t-test"
WILCOXON = "Wilcoxon signed-rank test"
WELCH = "Welch's t-test"
#: From this many seed pairs on, the paired comparison uses the Wilcoxon signed-rank test (SPEC §5).
WILCOXON_MIN_PAIRS = 6
#: Multiple-comparison procedures of :func:`adjust_pvalues`: key → name as the report writes it.
ADJUSTMENTS: dict[str, str] = {"holm": "Holm", "bh": "Benjamini–Hochberg"}


def _finite(values: npt.ArrayLike, caller: str) -> npt.NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise DynamicsError(f"{caller}: values must be finite, got {x[~np.isfinite(x)][:3].tolist()} among them")
    return x


def _half_width(sd: float, n: int, df: float, confidence: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df) * sd / math.sqrt(n))


def mean_interval(values: npt.ArrayLike, confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)``: the mean and its Student-t interval ``x̄ ± t_{(1+c)/2, n−1} · s/√n``.

    ``values``: one finite number per seed (any shape, flattened). ``low`` and
    ``high`` are ``None`` with fewer than 2 values (no interval from one run).
    Raises :class:`DynamicsError` for no values, a non-finite value or a
    ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise DynamicsError(f"mean_interval(): confidence must be in (0, 1), got {confidence}")
    x = _finite(values, "mean_interval()")
    if x.size == 0:
        raise DynamicsError("mean_interval(): no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = _half_width(float(x.std(ddof=1)), int(x.size), x.size - 1, confidence)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Comparison:
    """Method ``b`` against method ``a`` on one quantity (:func:`compare`).

    ``difference`` is ``b − a`` (mean of the paired differences, or difference
    of means); ``low``/``high`` its interval. ``test`` names the test, or starts
    with ``"not testable"`` and says why; then ``statistic``, ``p_value``,
    ``low``/``high`` and ``effect_size`` are ``None``.
    """

    mean_a: float
    low_a: float | None
    high_a: float | None
    n_a: int
    mean_b: float
    low_b: float | None
    high_b: float | None
    n_b: int
    paired: bool
    difference: float
    low: float | None
    high: float | None
    test: str
    statistic: float | None
    p_value: float | None
    effect_size: float | None
    effect_name: str

    @property
    def testable(self) -> bool:
        """Whether a test was run (there is a p-value)."""
        return self.p_value is not None


def _untested(base: dict[str, Any], reason: str, effect: str) -> Comparison:
    return Comparison(
        **base,
        low=None,
        high=None,
        test=f"not testable: {reason}",
        statistic=None,
        p_value=None,
        effect_size=None,
        effect_name=effect,
    )


def compare(a: npt.ArrayLike, b: npt.ArrayLike, *, paired: bool, confidence: float = 0.95) -> Comparison:
    """Compare ``b`` with ``a`` (one value per seed each): interval, test, p-value and effect size.

    ``paired``: ``a[i]`` and ``b[i]`` come from the same seed (equal lengths);
    paired t-test below :data:`WILCOXON_MIN_PAIRS` pairs, Wilcoxon signed-rank
    from there on, effect size Cohen's d_z. Otherwise Welch's t-test with
    Hedges' g. See the module docstring for the formulas. Not testable (no
    p-value) with fewer than 2 pairs / 2 runs of a method, or when the values
    leave nothing to test (every paired difference equal; no variation in
    either method).
    """
    from scipy import stats

    xa, xb = _finite(a, "compare()"), _finite(b, "compare()")
    if xa.size == 0 or xb.size == 0:
        raise DynamicsError(f"compare(): each method needs at least one value, got {xa.size} and {xb.size}")
    ma, la, ha = mean_interval(xa, confidence)
    mb, lb, hb = mean_interval(xb, confidence)
    base: dict[str, Any] = dict(
        mean_a=ma, low_a=la, high_a=ha, n_a=int(xa.size), mean_b=mb, low_b=lb, high_b=hb, n_b=int(xb.size)
    )
    if paired:
        if xa.shape != xb.shape:
            raise DynamicsError(f"compare(): paired values need equal lengths, got {xa.size} and {xb.size}")
        d = xb - xa
        n = int(d.size)
        base.update(paired=True, difference=float(d.mean()))
        effect = "Cohen's d_z"
        if n < 2:
            return _untested(base, f"{n} seed pair (need >= 2)", effect)
        sd = float(d.std(ddof=1))
        if sd == 0.0:
            return _untested(base, f"the difference is the same ({d[0]:+.4g}) in all {n} seed pairs", effect)
        half = _half_width(sd, n, n - 1, confidence)
        if n >= WILCOXON_MIN_PAIRS:
            res = stats.wilcoxon(xb, xa)
            name = WILCOXON
        else:
            res = stats.ttest_rel(xb, xa)
            name = PAIRED_T
        return Comparison(
            **base,
            low=float(d.mean()) - half,
            high=float(d.mean()) + half,
            test=name,
            statistic=float(res.statistic),
            p_value=float(res.pvalue),
            effect_size=float(d.mean()) / sd,
            effect_name=effect,
        )
    na, nb = int(xa.size), int(xb.size)
    base.update(paired=False, difference=mb - ma)
    effect = "Hedges' g"
    if min(na, nb) < 2:
        return _untested(base, f"{min(na, nb)} run of a method (need >= 2)", effect)
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    if va == 0.0 and vb == 0.0:
        return _untested(base, "no variation within either method", effect)
    se2 = va / na + vb / nb
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(se2))
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    res = stats.ttest_ind(xb, xa, equal_var=False)
    return Comparison(
        **base,
        low=mb - ma - half,
        high=mb - ma + half,
        test=WELCH,
        statistic=float(res.statistic),
        p_value=float(res.pvalue),
        effect_size=(1 - 3 / (4 * (na + nb) - 9)) * (mb - ma) / pooled,
        effect_name=effect,
    )


def paired_test(a: npt.ArrayLike, b: npt.ArrayLike, *, paired: bool = True) -> dict[str, Any]:
    """Test ``mean(b − a) = 0`` as :func:`compare` does; a plain dict (kept for callers of the first version).

    Returns ``{"test": name or why none, "n": pairs or (n_a, n_b), "statistic": float | None,
    "p_value": float | None}``.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired and xa.shape != xb.shape:
        raise DynamicsError(f"paired_test(): paired samples need equal lengths, got {xa.size} and {xb.size}")
    c = compare(xa, xb, paired=paired)
    n: int | tuple[int, int] = int(xa.size) if paired else (int(xa.size), int(xb.size))
    return {"test": c.test, "n": n, "statistic": c.statistic, "p_value": c.p_value}


def adjust_pvalues(p_values: Sequence[float | None] | npt.ArrayLike, method: str = "holm") -> npt.NDArray[np.float64]:
    """p-values adjusted for testing them together; NaN (or ``None``) entries stay NaN and are not counted.

    With the ``m`` finite p-values sorted ``p₍₁₎ ≤ … ≤ p₍ₘ₎``:

    * ``"holm"`` (Holm 1979, family-wise error): ``p̃₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1) p₍ⱼ₎)``;
    * ``"bh"`` (Benjamini & Hochberg 1995, false discovery rate):
      ``p̃₍ᵢ₎ = min_{j ≥ i} min(1, m p₍ⱼ₎ / j)``.

    A difference "survives" at level α when its adjusted p-value is below α.
    Returns a float64 array in the input's order. Raises :class:`DynamicsError`
    for an unknown ``method`` or a p-value outside [0, 1].
    """
    if method not in ADJUSTMENTS:
        raise DynamicsError(f"adjust_pvalues(): method must be one of {sorted(ADJUSTMENTS)}, got {method!r}")
    p = np.array([np.nan if v is None else v for v in np.asarray(p_values, dtype=object).ravel()], dtype=np.float64)
    ok = np.isfinite(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise DynamicsError(f"adjust_pvalues(): p-values must be in [0, 1], got {p[ok & ((p < 0) | (p > 1))].tolist()}")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(ok)
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    ranked = p[order]
    i = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - i + 1) * ranked))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, m * ranked / i)[::-1])[::-1]
    out[order] = adj
    return out


def _pairable(sa: Sequence[Any], sb: Sequence[Any]) -> bool:
    """Whether two methods' runs pair by seed: the same seeds, each once, all known (not −1 / NaN)."""
    known = all(s is not None and not (isinstance(s, float) and math.isnan(s)) and s != -1 for s in [*sa, *sb])
    return known and len(set(sa)) == len(sa) and sorted(sa) == sorted(sb)


def compare_methods(
    values: pd.DataFrame,
    *,
    methods: tuple[str, str] = ("full", "relora"),
    adjust: str = "bh",
    alpha: float = 0.05,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One :func:`compare` per quantity, and the p-values adjusted across all of them (:func:`adjust_pvalues`).

    ``values``: a long table with columns ``quantity``, ``method``, ``seed``,
    ``value`` (one row per run and quantity; ``seed`` −1 or NaN when unknown).
    A quantity is paired by seed when both methods have the same seeds, each
    once; otherwise Welch. Quantities that lack a method are left out.

    Returns one row per quantity (in order of first appearance; index
    ``quantity``) with ``<method> mean``, ``<method> low``, ``<method> high``,
    ``<method> n`` for both methods, ``difference`` (``methods[1] − methods[0]``),
    ``difference low``, ``difference high``, ``test``, ``statistic``,
    ``p_value``, ``effect size``, ``effect name``, ``p_adjusted`` (``adjust``
    over the quantities with a test), ``significant`` (``p_adjusted < alpha``;
    ``None`` when not tested), and ``paired``. Empty cells are ``None``.
    """
    need = {"quantity", "method", "seed", "value"}
    if not isinstance(values, pd.DataFrame) or not need <= set(values.columns):
        have = list(values.columns) if isinstance(values, pd.DataFrame) else type(values).__name__
        raise DynamicsError(f"compare_methods(): expected a DataFrame with columns {sorted(need)}, got {have}")
    if adjust not in ADJUSTMENTS:
        raise DynamicsError(f"compare_methods(): adjust must be one of {sorted(ADJUSTMENTS)}, got {adjust!r}")
    a_name, b_name = methods
    rows: list[dict[str, Any]] = []
    for quantity, g in values.groupby("quantity", sort=False):
        a = g[g["method"] == a_name].sort_values("seed")
        b = g[g["method"] == b_name].sort_values("seed")
        if a.empty or b.empty:
            continue
        sa, sb = a["seed"].tolist(), b["seed"].tolist()
        paired = _pairable(sa, sb)
        if paired:
            b = b.set_index("seed").loc[sa].reset_index()
        c = compare(a["value"].to_numpy(float), b["value"].to_numpy(float), paired=paired, confidence=confidence)
        rows.append(
            {
                "quantity": quantity,
                f"{a_name} mean": c.mean_a,
                f"{a_name} low": c.low_a,
                f"{a_name} high": c.high_a,
                f"{a_name} n": c.n_a,
                f"{b_name} mean": c.mean_b,
                f"{b_name} low": c.low_b,
                f"{b_name} high": c.high_b,
                f"{b_name} n": c.n_b,
                "difference": c.difference,
                "difference low": c.low,
                "difference high": c.high,
                "test": c.test,
                "statistic": c.statistic,
                "p_value": c.p_value,
                "effect size": c.effect_size,
                "effect name": c.effect_name,
                "paired": c.paired,
            }
        )
    if not rows:
        raise DynamicsError(f"compare_methods(): no quantity has values of both methods {list(methods)}")
    out = pd.DataFrame(rows).set_index("quantity").astype(object)
    out = out.where(out.notna(), None)  # a missing number is None, never NaN (pandas turns mixed None into NaN)
    adjusted = adjust_pvalues(out["p_value"].to_numpy(), adjust)
    out["p_adjusted"] = [None if np.isnan(v) else float(v) for v in adjusted]
    out["significant"] = [None if np.isnan(v) else bool(v < alpha) for v in adjusted]
    out.attrs.update(adjust=adjust, alpha=alpha, confidence=confidence, methods=methods)
    return out


def format_p(p: float | None) -> str:
    """A p-value as the report writes it: ``0.004``, ``0.31``, ``< 0.001``; ``–`` for none."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}" if p >= 0.01 else f"{p:.3f}"


def _num(x: float | None, digits: int) -> str:
    """``x`` with ``digits`` significant digits and a typographic minus; ``–`` for none."""
    return "–" if x is None else f"{x:.{digits}g}".replace("-", "−")


def describe(
    row: pd.Series | dict[str, Any],
    *,
    name: str = "ReLoRA",
    higher: str = "higher",
    lower: str = "lower",
    adjust: str = "bh",
    digits: int = 3,
) -> str:
    """A row of :func:`compare_methods` in words that follow the statistics.

    ``"ReLoRA lower (Δ = −0.05 [−0.08, −0.02], paired t-test, p = 0.004, BH-adjusted 0.03)"`` when the
    adjusted p-value is below α; ``"no detectable difference (…)"`` otherwise; ``"not testable (…)"``
    without a test (one seed): never a direction from untested numbers.
    """
    r = dict(row)
    diff, lo, hi = r.get("difference"), r.get("difference low"), r.get("difference high")
    test, p, padj = str(r.get("test", "")), r.get("p_value"), r.get("p_adjusted")
    if p is None:
        return f"not testable ({test.removeprefix('not testable: ')})"
    label = "Holm" if adjust == "holm" else "BH"
    p_text = format_p(p)
    detail = (
        f"Δ = {_num(diff, digits)} [{_num(lo, digits)}, {_num(hi, digits)}], {test}, "
        f"p {p_text if p_text.startswith('<') else '= ' + p_text}, {label}-adjusted {format_p(padj)}"
    )
    if r.get("significant"):
        return f"{name} {higher if (diff or 0.0) > 0 else lower} ({detail})"
    return f"no detectable difference ({detail})"


def verdict(row: pd.Series | dict[str, Any], expected_sign: int, *, significant: bool | None = None) -> str:
    """A claim's verdict from a :func:`compare_methods` row: the claim says ``sign(b − a) = expected_sign``.

    ``supported`` (significant, in the claimed direction), ``contradicted``
    (significant, opposite), ``inconclusive`` (tested, not significant) or
    ``not testable``. ``significant`` overrides the row's own flag (e.g. after
    adjusting over a different family).
    """
    r = dict(row)
    if r.get("p_value") is None:
        return "not testable"
    sig = r.get("significant") if significant is None else significant
    if not sig:
        return "inconclusive"
    diff = float(r.get("difference") or 0.0)
    return "supported" if np.sign(diff) == np.sign(expected_sign) else "contradicted"
