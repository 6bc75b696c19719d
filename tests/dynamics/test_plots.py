"""dynamics.plots on small synthetic results tables (fast; no training).

The tests read what a figure shows (the plotted x/y data against the table,
axis scales, which panels, legend entries for the methods present), not its
titles or wording; and the registry's rule: a figure without data is skipped,
a programming error propagates.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # tests never open windows

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

import dynamics.plots.registry as registry
from dynamics import plots
from dynamics.seeds import mean_interval
from dynamics.validation import DynamicsError

STEPS = (0, 10, 20)
LAYERS = (0, 1)
COMPS = ("attn.q", "mlp.down")
SITES = ("resid_pre", "resid_post")
TOKENS_PER_STEP = 256
MERGE_EVERY = 10
METHODS = ("full", "relora")


def _row(
    run: str, method: str, step: int, layer: int, component: str, kind: str, metric: str, value: float
) -> dict[str, Any]:
    return dict(
        run=run,
        method=method,
        step=step,
        tokens=step * TOKENS_PER_STEP,
        layer=layer,
        component=component,
        kind=kind,
        metric=metric,
        value=float(value),
    )


def make_table(methods: tuple[str, ...] = METHODS) -> pd.DataFrame:
    """3 checkpoints × 2 layers × 2 projections per method; values differ by method, layer, component and step."""
    rows = []
    for method in methods:
        run = f"{method}-run"
        gap = 0.1 if method == "relora" else 0.0
        for step in STEPS:
            for layer in LAYERS:
                for ci, comp in enumerate(COMPS):
                    per = 0.9 - 0.005 * step - gap - 0.02 * layer - 0.1 * ci
                    cond = 2 + 0.1 * step + 0.5 * layer + gap
                    for kind, shift in (("weight", 0.0), ("grad", -0.3)):
                        rows += [
                            _row(run, method, step, layer, comp, kind, "proportional_effective_rank", per + shift),
                            _row(run, method, step, layer, comp, kind, "log10_condition_number", cond + shift),
                            _row(run, method, step, layer, comp, kind, "condition_number", 10 ** (cond + shift)),
                        ]
                    if step > 0:
                        rows.append(
                            _row(run, method, step, layer, comp, "update", "proportional_effective_rank", per / 2)
                        )
                        rows.append(
                            _row(
                                run,
                                method,
                                step,
                                layer,
                                comp,
                                "update_cumulative",
                                "proportional_effective_rank",
                                per / 1.5,
                            )
                        )
                    if method == "relora":
                        rows.append(
                            _row(
                                run,
                                method,
                                step,
                                layer,
                                comp,
                                "lora",
                                "proportional_effective_rank",
                                0.05 + 0.01 * layer,
                            )
                        )
                        if step > 0 and step % MERGE_EVERY == 0:
                            rows.append(
                                _row(
                                    run,
                                    method,
                                    step,
                                    layer,
                                    comp,
                                    "update_merge",
                                    "proportional_effective_rank",
                                    0.06 + 0.01 * layer + 0.001 * step,
                                )
                            )
                        # ReLoRA's adapter-factor gradients: never compared with full-rank matrices
                        rows.append(
                            _row(run, method, step, layer, f"{comp}.lora_a", "grad", "log10_condition_number", np.inf)
                        )
                        rows.append(
                            _row(
                                run, method, step, layer, f"{comp}.lora_a", "grad", "proportional_effective_rank", 0.01
                            )
                        )
                for h in range(2):
                    rows.append(
                        _row(
                            run,
                            method,
                            step,
                            layer,
                            f"attn.ov.h{h}",
                            "weight",
                            "proportional_effective_rank",
                            0.2 + 0.1 * h + 0.01 * layer,
                        )
                    )
                for si, site in enumerate(SITES):
                    rows.append(
                        _row(
                            run,
                            method,
                            step,
                            layer,
                            site,
                            "act",
                            "proportional_effective_rank",
                            0.5 + 0.1 * si + 0.01 * layer,
                        )
                    )
                    rows.append(_row(run, method, step, layer, site, "act", "anisotropy", 0.3))
                    if step > 0:
                        rows.append(
                            _row(
                                run,
                                method,
                                step,
                                layer,
                                site,
                                "act",
                                "cka_prev",
                                0.8 - gap - 0.01 * layer - 0.05 * si + 0.001 * step,
                            )
                        )
                    if step < STEPS[-1]:
                        rows.append(_row(run, method, step, layer, site, "act", "cka_final", 0.7))
            for comp in ("embed", "lm_head"):
                rows.append(_row(run, method, step, -1, comp, "weight", "proportional_effective_rank", 0.95 - gap))
        for step in range(0, STEPS[-1] + 1):
            if step > 0:
                rows.append(_row(run, method, step, -1, "model", "train", "loss", 6 - 0.1 * step + gap))
                lr = 0.0 if step == 1 or (method == "relora" and (step - 1) % MERGE_EVERY == 0) else 1e-3
                rows.append(_row(run, method, step, -1, "model", "train", "lr", lr))
            if step in STEPS:
                rows.append(_row(run, method, step, -1, "model", "train", "val_loss", 6 - 0.09 * step + gap))
                rows.append(_row(run, method, step, -1, "model", "train", "pair_acc", 0.5 + 0.01 * step))
    return pd.DataFrame(rows, columns=list(plots.COLUMNS))


def make_spectra(methods: tuple[str, ...] = METHODS) -> pd.DataFrame:
    rows = []
    for method in methods:
        for step in STEPS:
            for layer in LAYERS:
                values = np.linspace(1.0 + step / 10 + layer, 0.1, 16)
                values[-1] = 0.0  # a zero singular value cannot be drawn on a log axis: must be skipped
                rows.append(
                    dict(
                        run=f"{method}-run",
                        method=method,
                        step=step,
                        layer=layer,
                        component="mlp.down",
                        kind="weight",
                        shape=[16, 32],
                        values=values.tolist(),
                    )
                )
    return pd.DataFrame(rows, columns=list(plots.SPECTRA_COLUMNS))


def make_analyses_table(targets: tuple[str, ...] = ("attn.q", "attn.v")) -> pd.DataFrame:
    """Two seeds per method; ReLoRA wrapped only ``targets``: its wrapped-only rows exist for those alone."""
    rng = np.random.default_rng(0)
    comps = ("attn.q", "attn.k", "attn.v", "mlp.down")
    rows = []
    for seed in (0, 1):
        for method in METHODS:
            run = f"{method}-s{seed}"
            rows.append(_row(run, method, 0, -1, "model", "run", "seed", seed))
            for step in STEPS:
                for layer in LAYERS:
                    for comp in comps:
                        for kind in ("weight", "grad"):
                            ok = layer == 0
                            rows.append(_row(run, method, step, layer, comp, kind, "alpha_status", 0 if ok else 2))
                            rows.append(
                                _row(run, method, step, layer, comp, kind, "alpha", 3 + rng.random() if ok else 99.0)
                            )
                            rows.append(
                                _row(run, method, step, layer, comp, kind, "proportional_effective_rank", rng.random())
                            )
                        rows.append(_row(run, method, step, layer, comp, "weight", "intruders", rng.integers(0, 10)))
                    if method != "relora":
                        continue
                    for comp in targets:
                        if step > 0:
                            rows.append(
                                _row(run, method, step, layer, comp, "update_merge", "overlap_prev", rng.random())
                            )
                            rows.append(
                                _row(run, method, step, layer, comp, "update_merge", "overlap_prev_chance", 0.1)
                            )
                            rows.append(
                                _row(run, method, step, layer, comp, "cross_run", "update_overlap", rng.random())
                            )
                            rows.append(_row(run, method, step, layer, comp, "cross_run", "update_overlap_chance", 0.2))
                    for metric in ("cka", "cka_debiased"):
                        rows.append(_row(run, method, step, layer, "resid_post", "cross_run", metric, rng.random()))
    return pd.DataFrame(rows, columns=list(plots.COLUMNS))


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_table()


@pytest.fixture(scope="module")
def spectra() -> pd.DataFrame:
    return make_spectra()


@pytest.fixture(scope="module")
def analyses() -> pd.DataFrame:
    return make_analyses_table()


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------------ reading a figure


def _panels(fig: Figure, ncols: int | None = None) -> np.ndarray:
    """Data axes (not colour bars, not hidden spares) as a grid ``[row, column]``."""
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    return np.array(axes, dtype=object).reshape(-1, ncols or len(axes))


def _data_lines(ax: Axes) -> list:
    """Lines drawn in data coordinates, without the dotted merge marks and dashed references (validation, chance)."""
    return [ln for ln in ax.get_lines() if ln.get_transform() is ax.transData and ln.get_linestyle() not in (":", "--")]


def _xy(line: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (
        tuple(np.round(np.asarray(line.get_xdata(), dtype=float), 9)),
        tuple(np.round(np.asarray(line.get_ydata(), dtype=float), 9)),
    )


def _merge_marks(ax: Axes) -> list[float]:
    return [float(ln.get_xdata()[0]) for ln in ax.get_lines() if ln.get_linestyle() == ":"]


def _legend_labels(fig: Figure) -> list[str]:
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)  # one legend per figure
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _line_of(ax: Axes, colour: Any) -> Any:
    """The one data line drawn in ``colour``."""
    (line,) = [ln for ln in _data_lines(ax) if matplotlib.colors.same_color(ln.get_color(), colour)]
    return line


def _rows(table: pd.DataFrame, **eq: Any) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for col, v in eq.items():
        mask &= (table[col] == v).to_numpy()
    return table[mask]


def _curve(rows: pd.DataFrame, x: str = "tokens") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean value per x of ``rows``, as the (x, y) a line should show."""
    s = rows.groupby(x)["value"].mean().sort_index()
    return tuple(np.round(s.index.to_numpy(dtype=float), 9)), tuple(np.round(s.to_numpy(dtype=float), 9))


def _band(ax: Axes, colour: Any) -> dict[float, tuple[float, float]]:
    """x → (low, high) of the shaded band drawn in ``colour``."""
    (coll,) = [c for c in ax.collections if matplotlib.colors.same_color(c.get_facecolor()[0][:3], colour)]
    out: dict[float, list[float]] = {}
    for x, y in coll.get_paths()[0].vertices:
        out.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in out.items()}


# ------------------------------------------------------------------------------------------ spectral metrics


def test_rank_over_training_one_line_per_layer_with_the_table_values(table):
    fig = plots.plot_rank_over_training(table)
    grid = _panels(fig, ncols=2)
    assert grid.shape == (len(COMPS), len(METHODS))  # rows: the components the table holds; columns: methods
    for i, comp in enumerate(COMPS):
        for j, method in enumerate(METHODS):
            want = {
                _curve(
                    _rows(
                        table,
                        kind="weight",
                        metric="proportional_effective_rank",
                        component=comp,
                        method=method,
                        layer=layer,
                    )
                )
                for layer in LAYERS
            }
            assert {_xy(ln) for ln in _data_lines(grid[i, j])} == want
    assert grid[-1, 0].get_xlabel() == plots.X_LABELS["tokens"]
    assert grid[-1, 0].get_ylabel() == plots.SHORT_LABELS["proportional_effective_rank"]
    # the merge after update 10 is marked in ReLoRA's column only, at that step's token count
    assert all(_merge_marks(ax) == [10 * TOKENS_PER_STEP] for ax in grid[:, 1])
    assert all(_merge_marks(ax) == [] for ax in grid[:, 0])
    assert _legend_labels(fig) == [str(layer) for layer in LAYERS] + ["ReLoRA merge"]


def test_rank_over_training_grad_by_step_leaves_out_adapter_factors(table):
    fig = plots.plot_rank_over_training(table, kind="grad", x="step")
    grid = _panels(fig, ncols=2)
    assert grid.shape == (len(COMPS), 2)
    assert grid[-1, 0].get_xlabel() == plots.X_LABELS["step"]
    lines = _data_lines(grid[0, 1])
    want = {
        _curve(
            _rows(
                table,
                kind="grad",
                metric="proportional_effective_rank",
                component="attn.q",
                method="relora",
                layer=layer,
            ),
            x="step",
        )
        for layer in LAYERS
    }
    assert {_xy(ln) for ln in lines} == want
    assert all(min(ln.get_ydata()) > 0.01 for ax in grid.flat for ln in _data_lines(ax))  # no lora_a (0.01) line


def test_rank_over_training_circuits_are_the_mean_over_heads(table):
    fig = plots.plot_rank_over_training(table, components=["attn.ov"])
    grid = _panels(fig, ncols=2)
    assert grid.shape == (1, 2)
    for ax in grid.flat:
        ys = sorted({round(float(y), 9) for ln in _data_lines(ax) for y in ln.get_ydata()})
        assert ys == [0.25, 0.26]  # heads 0.2 and 0.3 (+0.01 in layer 1) → their mean per layer


def test_rank_over_training_activation_sites_in_residual_order(table):
    fig = plots.plot_rank_over_training(table, kind="act")
    grid = _panels(fig, ncols=2)
    assert grid.shape == (len(SITES), 2)
    for i in range(len(SITES)):
        want = {round(0.5 + 0.1 * i + 0.01 * layer, 9) for layer in LAYERS}
        assert {round(float(y), 9) for ln in _data_lines(grid[i, 0]) for y in ln.get_ydata()} == want


def test_components_are_those_the_table_holds(table):
    """No assumed projection list: a kind present for two matrices draws two; a table with one draws one."""
    only_q = table[~table.component.isin(["mlp.down", "mlp.down.lora_a"])]
    fig = plots.plot_rank_over_training(only_q, kind="grad")
    assert _panels(fig, ncols=2).shape == (1, 2)
    more = pd.concat([table, table[table.component == "attn.q"].assign(component="attn.v")], ignore_index=True)
    fig = plots.plot_condition_numbers(more)
    assert len(_panels(fig).flat) == 3  # q, v, down: in COMPONENT_ORDER
    first = _panels(fig)[0, 1]
    pal = plots.method_palette(["full", "relora"])
    assert _xy(_line_of(first, pal["full"])) == _curve(
        _rows(more, kind="grad", metric="log10_condition_number", component="attn.v", method="full")
    )


def test_condition_numbers_method_lines_bands_and_scales(table):
    fig = plots.plot_condition_numbers(table)
    panels = _panels(fig)
    assert panels.shape == (1, len(COMPS))
    pal = plots.method_palette(METHODS)
    for ax, comp in zip(panels.flat, COMPS):
        assert ax.get_yscale() == "linear"
        assert ax.get_xlabel() == plots.X_LABELS["tokens"]  # each column's bottom panel
        for method in METHODS:
            rows = _rows(table, kind="grad", metric="log10_condition_number", component=comp, method=method)
            assert _xy(_line_of(ax, pal[method])) == _curve(rows)
            band = _band(ax, pal[method])  # range over layers
            for t, g in rows.groupby("tokens"):
                assert band[float(t)] == pytest.approx((g.value.min(), g.value.max()))
    assert _legend_labels(fig)[:2] == [plots.METHOD_LABELS[m] for m in METHODS]
    raw = plots.plot_condition_numbers(table, metric="condition_number")
    assert all(ax.get_yscale() == "log" for ax in _panels(raw).flat)


def test_condition_numbers_leave_out_infinite_values(table):
    t = table.copy()
    inf = (t.kind == "grad") & (t.metric == "log10_condition_number") & (t.component == "attn.q") & (t.step == 20)
    t.loc[inf, "value"] = np.inf
    fig = plots.plot_condition_numbers(t)
    ax = _panels(fig)[0, 0]
    for line in _data_lines(ax):
        assert 20.0 * TOKENS_PER_STEP not in line.get_xdata() and np.isfinite(line.get_ydata()).all()
    assert any(str(int(inf.sum())) in tx.get_text() for tx in ax.texts)  # the count is shown in the panel


def test_condition_numbers_wrap_into_columns(table):
    many = pd.concat(
        [
            table.assign(component=table.component.str.replace("attn.q", c, regex=False))
            for c in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate")
        ],
        ignore_index=True,
    )
    fig = plots.plot_condition_numbers(many, col_wrap=4)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6
    assert len(fig.axes) == 8  # 2 × 4 grid, two hidden


def test_spectra_draw_the_singular_values(spectra):
    fig = plots.plot_spectra(spectra)
    panels = _panels(fig)
    assert panels.shape == (1, 2)
    assert all(ax.get_yscale() == "log" for ax in panels.flat)
    for ax, method in zip(panels.flat, METHODS):
        lines = _data_lines(ax)
        assert len(lines) == len(STEPS)
        for line, step in zip(lines, STEPS):
            values = _rows(spectra, method=method, step=step, layer=1)["values"].iloc[0]  # middle layer
            assert list(line.get_ydata()) == pytest.approx(values[:-1])  # the zero is not drawn
            assert list(line.get_xdata()) == list(range(1, 16))
    assert all(str(s) in text for s, text in zip(STEPS, _legend_labels(fig)))
    fig = plots.plot_spectra(spectra, steps=[20], layer=0, normalize=True)
    (line,) = _data_lines(_panels(fig)[0, 0])
    assert line.get_ydata()[0] == pytest.approx(1.0)


def test_spectra_errors_name_what_is_there(spectra):
    with pytest.raises(plots.NoDataError, match=r"component='attn.q'.*\['mlp.down'\]"):
        plots.plot_spectra(spectra, component="attn.q")
    with pytest.raises(plots.NoDataError, match=r"layer 7.*\[0, 1\]"):
        plots.plot_spectra(spectra, layer=7)
    with pytest.raises(plots.NoDataError, match=r"\[5\].*\[0, 10, 20\]"):
        plots.plot_spectra(spectra, steps=[5])
    with pytest.raises(DynamicsError, match="values"):
        plots.plot_spectra(spectra.drop(columns=["values"]))


# ------------------------------------------------------------------------------------------ updates


def test_update_rank_one_panel_per_kind_with_method_means(table):
    fig = plots.plot_update_rank(table)
    panels = _panels(fig)
    assert panels.shape == (1, len(plots.UPDATE_KINDS))
    pal = plots.method_palette(METHODS)
    for ax, kind in zip(panels.flat, plots.UPDATE_KINDS):
        assert _merge_marks(ax) == [10 * TOKENS_PER_STEP]
        for method in METHODS:
            rows = _rows(table, kind=kind, metric="proportional_effective_rank", method=method)
            rows = rows[~rows.component.str.contains("lora_")]
            if rows.empty:  # update_merge and lora: ReLoRA only
                assert not [ln for ln in _data_lines(ax) if matplotlib.colors.same_color(ln.get_color(), pal[method])]
            else:
                assert _xy(_line_of(ax, pal[method])) == _curve(rows)
    assert _legend_labels(fig) == [plots.METHOD_LABELS[m] for m in METHODS] + ["ReLoRA merge"]


def test_update_rank_reads_legacy_update_restart_rows(table):
    legacy = table.assign(kind=table.kind.replace("update_merge", "update_restart"))
    new, old = _panels(plots.plot_update_rank(table)), _panels(plots.plot_update_rank(legacy))
    assert old.shape == new.shape
    for a, b in zip(new.flat, old.flat):
        assert [_xy(ln) for ln in _data_lines(a)] == [_xy(ln) for ln in _data_lines(b)]
    only = _panels(plots.plot_update_rank(legacy, kinds=["update_restart"]))
    assert [_xy(ln) for ln in _data_lines(only[0, 0])] == [_xy(ln) for ln in _data_lines(new[0, 2])]
    per_layer = _panels(plots.plot_rank_over_training(legacy, kind="update_restart"), ncols=1)  # ReLoRA only
    want = {_curve(_rows(table, kind="update_merge", component="mlp.down", layer=layer)) for layer in LAYERS}
    assert {_xy(ln) for ln in _data_lines(per_layer[1, 0])} == want


def test_update_rank_without_relora_has_no_merge_marks(table, caplog):
    with caplog.at_level(logging.INFO, logger="dynamics.plots"):
        fig = plots.plot_update_rank(table[table.method == "full"])
    panels = _panels(fig)
    assert panels.shape == (1, 2)  # update, update_cumulative
    assert all(_merge_marks(ax) == [] for ax in panels.flat)
    assert _legend_labels(fig) == [plots.METHOD_LABELS["full"]]
    assert "merge" in caplog.text


def test_merge_steps(table):
    assert plots.merge_steps(table) == [10]  # 20 is a boundary at the run's end: no update 20, no merge
    assert plots.merge_steps(table[table.kind != "update_merge"]) == [10]  # from lr = 0 at logged step 11
    assert plots.merge_steps(table.assign(kind=table.kind.replace("update_merge", "update_restart"))) == [10]
    assert plots.merge_steps(table[table.method == "full"]) == []
    assert plots.restart_steps is plots.merge_steps  # the former name


def test_subspaces_show_only_the_wrapped_matrices(analyses):
    """ReLoRA wrapped q and v: the overlap figure has q and v columns, whatever else the table holds."""
    fig = plots.plot_subspaces(analyses, x="step")
    grid = _panels(fig, ncols=2)
    assert grid.shape == (2, 2)  # rows: cycle overlap, cross-run overlap; columns: attn.q, attn.v
    pal = plots.method_palette(METHODS)
    for i, (kind, metric, chance) in enumerate(
        [("update_merge", "overlap_prev", 0.1), ("cross_run", "update_overlap", 0.2)]
    ):
        for j, comp in enumerate(("attn.q", "attn.v")):
            ax = grid[i, j]
            rows = _rows(analyses, kind=kind, metric=metric, component=comp)
            per_run = rows.groupby(["run", "step"], as_index=False)["value"].mean()
            assert _xy(_line_of(ax, pal["relora"])) == _curve(per_run, x="step")
            band = _band(ax, pal["relora"])  # two seeds: the 95 % t-interval of the per-run layer means
            for step, g in per_run.groupby("step"):
                _, lo, hi = mean_interval(g.value.tolist())
                assert band[float(step)] == pytest.approx((lo, hi))
            refs = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
            assert [float(ln.get_ydata()[0]) for ln in refs] == pytest.approx([chance])
    assert _legend_labels(fig)[0] == plots.METHOD_LABELS["relora"]
    # update_restart rows (the former kind) draw the same figure
    legacy = analyses.assign(kind=analyses.kind.replace("update_merge", "update_restart"))
    again = _panels(plots.plot_subspaces(legacy, x="step"), ncols=2)
    assert [_xy(ln) for ln in _data_lines(again[0, 0])] == [_xy(ln) for ln in _data_lines(grid[0, 0])]


def test_heavy_tails_draw_only_status_ok_fits(analyses):
    fig = plots.plot_heavy_tails(analyses, x="step")
    grid = _panels(fig, ncols=4)
    assert grid.shape == (2, 4)  # weight and grad alpha × every matrix the table holds
    pal = plots.method_palette(METHODS)
    for i, kind in enumerate(("weight", "grad")):
        for j, comp in enumerate(("attn.q", "attn.k", "attn.v", "mlp.down")):
            for method in METHODS:
                ok = _rows(analyses, kind=kind, metric="alpha", component=comp, method=method, layer=0)
                per_run = ok.groupby(["run", "step"], as_index=False)["value"].mean()
                assert _xy(_line_of(grid[i, j], pal[method])) == _curve(per_run, x="step")
    assert max(y for ax in grid.flat for ln in _data_lines(ax) for y in ln.get_ydata()) < 99  # failed fits left out


def test_intruders_range_over_layers_with_one_run_per_method(analyses):
    one = analyses[analyses.run.str.endswith("s0")]
    fig = plots.plot_intruders(one, x="step")
    grid = _panels(fig, ncols=4)
    assert grid.shape == (1, 4)
    pal = plots.method_palette(METHODS)
    rows = _rows(one, kind="weight", metric="intruders", component="attn.k", method="full")
    band = _band(grid[0, 1], pal["full"])
    for step, g in rows.groupby("step"):
        assert band[float(step)] == pytest.approx((g.value.min(), g.value.max()))


# ------------------------------------------------------------------------------------------ activations


def test_cka_heatmaps_hold_the_table_values(table):
    fig = plots.plot_cka(table)
    grid = _panels(fig, ncols=2)
    assert grid.shape == (len(SITES), len(METHODS))
    assert len(fig.axes) == grid.size + 1  # one shared colour bar
    for i, site in enumerate(SITES):
        for j, method in enumerate(METHODS):
            image = grid[i, j].get_images()[0].get_array()
            want = _rows(table, kind="act", metric="cka_prev", component=site, method=method).pivot_table(
                index="layer", columns="step", values="value"
            )
            assert image.shape == (len(LAYERS), 2)  # cka_prev exists at steps 10 and 20
            np.testing.assert_allclose(image.filled(np.nan), want.to_numpy())
            assert [t.get_text() for t in grid[i, j].texts] == [f"{v:.2f}" for v in want.to_numpy().ravel()]
    fig = plots.plot_cka(table, metric="cka_final", sites="resid_post")
    assert _panels(fig, ncols=2).shape == (1, 2)


def test_cross_run_cka_heatmaps(analyses):
    fig = plots.plot_cross_run_cka(analyses)
    grid = _panels(fig, ncols=2)
    assert grid.shape == (1, 2)  # one site; debiased and biased CKA
    for ax, metric in zip(grid.flat, ("cka_debiased", "cka")):
        want = _rows(analyses, kind="cross_run", metric=metric, component="resid_post").pivot_table(
            index="layer", columns="step", values="value", aggfunc="mean"
        )
        np.testing.assert_allclose(ax.get_images()[0].get_array().filled(np.nan), want.to_numpy())


# ------------------------------------------------------------------------------------------ training, components


def test_loss_lines_are_the_logged_values(table):
    fig = plots.plot_loss(table, x="step")
    panels = _panels(fig)
    assert panels.shape == (1, 2)  # loss; minimal-pair accuracy
    pal = plots.method_palette(METHODS)
    loss_ax, acc_ax = panels.flat
    for method in METHODS:
        lines = [ln for ln in loss_ax.get_lines() if matplotlib.colors.same_color(ln.get_color(), pal[method])]
        train = [ln for ln in lines if ln.get_linestyle() == "-"]
        val = [ln for ln in lines if ln.get_linestyle() == "--"]
        assert [_xy(ln) for ln in train] == [_curve(_rows(table, metric="loss", method=method), x="step")]
        assert [_xy(ln) for ln in val] == [_curve(_rows(table, metric="val_loss", method=method), x="step")]
        assert _xy(_line_of(acc_ax, pal[method])) == _curve(_rows(table, metric="pair_acc", method=method), x="step")
    assert _merge_marks(loss_ax) == [10.0]
    assert _legend_labels(fig)[:2] == [plots.METHOD_LABELS[m] for m in METHODS]
    assert _panels(plots.plot_loss(table[table.metric != "pair_acc"])).shape == (1, 1)


def test_loss_smooths_long_logs(table):
    long = pd.concat([table[table.metric == "loss"].assign(step=table.step + 100 * k) for k in range(3)])
    long = long.assign(tokens=long.step * TOKENS_PER_STEP)
    fig = plots.plot_loss(long, x="step", smooth=5)
    ax = _panels(fig)[0, 0]
    pal = plots.method_palette(METHODS)
    full = [ln for ln in ax.get_lines() if matplotlib.colors.same_color(ln.get_color(), pal["full"])]
    raw, smooth = sorted(full, key=lambda ln: ln.get_linewidth())  # raw faint, smoothed bold
    rows = _rows(long, method="full").sort_values("step")
    np.testing.assert_allclose(raw.get_ydata(), rows.value)
    np.testing.assert_allclose(smooth.get_ydata(), rows.value.rolling(5, min_periods=1).mean())


def test_component_summary_bars_are_final_step_layer_means(table):
    fig = plots.plot_component_summary(table)
    (ax,) = _panels(fig).flat
    comps = [t.get_text() for t in ax.get_xticklabels()]
    assert comps == ["attn.q", "mlp.down", "attn.ov", "embed", "lm_head"]  # shared by both methods, in order
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == len(METHODS)
    weights = table[(table.kind == "weight") & (table.metric == "proportional_effective_rank") & (table.step == 20)]
    weights = weights.assign(component=weights.component.str.replace(r"\.h\d+$", "", regex=True))
    for container, method in zip(bars, METHODS):
        per_layer = _rows(weights, method=method).groupby(["component", "layer"]).value.mean()
        want = [per_layer[c].mean() for c in comps]
        assert [p.get_height() for p in container] == pytest.approx(want)
    assert [t.split(" ")[0] for t in _legend_labels(fig)] == [plots.METHOD_LABELS[m] for m in METHODS]
    grad = plots.plot_component_summary(table, kind="grad", step=10)
    (ax,) = _panels(grad).flat
    assert [t.get_text() for t in ax.get_xticklabels()] == list(COMPS)  # no lora factors


def test_seed_summary_bars_are_the_seed_means(analyses):
    from dynamics.seeds import seed_summary

    fig = plots.plot_seed_summary(analyses)
    (ax,) = _panels(fig).flat
    summary = seed_summary(analyses)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(summary.index)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for container, method in zip(bars, METHODS):
        assert [p.get_height() for p in container] == pytest.approx(summary[f"{method} mean"].astype(float).tolist())
    with pytest.raises(plots.NoDataError, match=">= 2"):
        plots.plot_seed_summary(analyses[~analyses.run.str.endswith("s1")])


# ------------------------------------------------------------------------------------------ seeds: bands across seeds


def make_seed_table(n_seeds: int = 3) -> pd.DataFrame:
    """:func:`make_table` for ``n_seeds`` seeds of each method: every finite value shifted by seed-level noise."""
    rng = np.random.default_rng(4)
    base = make_table()
    frames = []
    for seed in range(n_seeds):
        t = base.copy()
        t["run"] = t["run"] + f"-s{seed}"
        finite = np.isfinite(t["value"].to_numpy(dtype=float))
        t.loc[finite, "value"] = t.loc[finite, "value"] + rng.normal(0, 0.03, size=int(finite.sum()))
        seeds = t.drop_duplicates("run").assign(step=0, layer=-1, component="model", kind="run", metric="seed")
        frames += [t, seeds.assign(value=float(seed))]
    return pd.concat(frames, ignore_index=True)


def _seed_band(rows: pd.DataFrame, x: str = "tokens") -> dict[float, tuple[float, float]]:
    """x → the 95 % t-interval across runs of each run's mean at x (what a seed band should show)."""
    out = {}
    for xv, g in rows.groupby(x):
        _, lo, hi = mean_interval(g.groupby("run")["value"].mean().to_numpy())
        out[round(float(xv), 9)] = (lo, hi)
    return out


@pytest.fixture(scope="module")
def seed_table() -> pd.DataFrame:
    return make_seed_table()


def test_condition_numbers_band_is_the_interval_across_seeds(seed_table):
    fig = plots.plot_condition_numbers(seed_table)
    pal = plots.method_palette(METHODS)
    for ax, comp in zip(_panels(fig).flat, COMPS):
        for method in METHODS:
            rows = _rows(seed_table, kind="grad", metric="log10_condition_number", component=comp, method=method)
            assert _xy(_line_of(ax, pal[method])) == _curve(rows)  # mean over seeds of the layer mean
            band, want = _band(ax, pal[method]), _seed_band(rows)
            assert band.keys() == want.keys()
            for xv, (lo, hi) in want.items():
                assert band[xv] == pytest.approx((lo, hi))
                assert hi - lo > 0
    assert "across seeds" in fig._suptitle.get_text()


def test_update_rank_and_loss_bands_across_seeds(seed_table):
    pal = plots.method_palette(METHODS)
    fig = plots.plot_update_rank(seed_table, kinds=["update_cumulative"])
    (ax,) = _panels(fig).flat
    rows = _rows(seed_table, kind="update_cumulative", metric="proportional_effective_rank", method="relora")
    want = _seed_band(rows)
    for xv, (lo, hi) in _band(ax, pal["relora"]).items():
        assert (lo, hi) == pytest.approx(want[xv])
    loss = plots.plot_loss(seed_table, x="step")
    acc_ax = _panels(loss)[0, 1]
    acc = _rows(seed_table, metric="pair_acc", method="full")
    assert _xy(_line_of(acc_ax, pal["full"])) == _curve(acc, x="step")  # one line per method, not per run
    for xv, (lo, hi) in _band(acc_ax, pal["full"]).items():
        assert (lo, hi) == pytest.approx(_seed_band(acc, x="step")[xv])


def test_rank_over_training_has_a_band_per_layer_with_seeds(seed_table):
    fig = plots.plot_rank_over_training(seed_table, components="attn.q")
    ax = _panels(fig, ncols=2)[0, 0]  # full-rank · attn.q
    assert len(_data_lines(ax)) == len(LAYERS) and len(ax.collections) == len(LAYERS)
    rows = _rows(seed_table, kind="weight", metric="proportional_effective_rank", component="attn.q", method="full")
    pal = sorted(_data_lines(ax), key=lambda ln: np.asarray(ln.get_ydata())[0])
    layer0 = _rows(rows, layer=0)
    assert any(_xy(ln) == _curve(layer0) for ln in pal)


def test_component_summary_whiskers_are_the_interval_across_seeds(seed_table):
    fig = plots.plot_component_summary(seed_table, kind="grad")
    (ax,) = _panels(fig).flat
    comps = [t.get_text() for t in ax.get_xticklabels()]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    final = seed_table[(seed_table.kind == "grad") & (seed_table.metric == "proportional_effective_rank")]
    final = final[final.step == 20]
    for container, method in zip(bars, METHODS):
        per_run = _rows(final, method=method).groupby(["component", "run"]).value.mean()
        want = [per_run[c].mean() for c in comps]
        assert [p.get_height() for p in container] == pytest.approx(want)
    from matplotlib.container import ErrorbarContainer

    whiskers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    for container, method in zip(whiskers, METHODS):
        per_run = _rows(final, method=method).groupby(["component", "run"]).value.mean()
        (segments,) = [lc.get_segments() for lc in container.lines[2]]
        for seg, comp in zip(segments, comps):
            _, lo, hi = mean_interval(per_run[comp].to_numpy())
            assert (seg[0][1], seg[1][1]) == pytest.approx((lo, hi))
    assert "95% t-interval across seeds" in ax.get_title(loc="left")


def test_seed_summary_marks_what_survives_the_adjustment(seed_table):
    fig = plots.plot_seed_summary(seed_table)
    (ax,) = _panels(fig).flat
    texts = [t.get_text() for t in ax.texts]
    assert all(t.startswith("p=") and "BH " in t for t in texts)
    from dynamics.seeds import seed_summary

    summary = seed_summary(seed_table)
    assert [("✓" in t) for t in texts] == [bool(v) for v in summary["significant"]]


# ------------------------------------------------------------------------------------------ conventions


def test_same_method_colours_everywhere(table):
    full_only = plots.method_palette(["full"])
    relora_only = plots.method_palette(["relora"])
    both = plots.method_palette(["full", "relora"])
    assert full_only["full"] == both["full"] and relora_only["relora"] == both["relora"]
    assert both["full"] != both["relora"]
    fig = plots.plot_loss(table[table.method == "relora"])
    handle = fig.legends[0].legend_handles[0]
    assert handle.get_label() == plots.METHOD_LABELS["relora"] and handle.get_color() == both["relora"]


def test_theme_does_not_leak(table):
    before = dict(matplotlib.rcParams)
    plots.plot_rank_over_training(table)
    plots.plot_cka(table)
    after = dict(matplotlib.rcParams)
    assert {k: v for k, v in after.items() if before.get(k) != v and k != "backend"} == {}


def test_missing_data_is_a_no_data_error_naming_what_is_there(table):
    with pytest.raises(plots.NoDataError) as err:
        plots.plot_condition_numbers(table[table.kind != "grad"])
    assert "'grad'" in str(err.value) and "'act'" in str(err.value)  # asked for, and what the table has
    with pytest.raises(plots.NoDataError, match="sigma_max"):
        plots.plot_rank_over_training(table, metric="sigma_max")
    with pytest.raises(plots.NoDataError, match=r"\['mlp.up'\].*'attn.q'"):
        plots.plot_rank_over_training(table, components=["mlp.up"])
    with pytest.raises(plots.NoDataError):
        plots.plot_cka(table[table.kind != "act"])
    with pytest.raises(plots.NoDataError):
        plots.plot_update_rank(table[~table.kind.isin(plots.UPDATE_KINDS)])
    with pytest.raises(plots.NoDataError):
        plots.plot_loss(table[~table.metric.isin(["loss", "val_loss"])])
    factors_only = table[(table.kind != "grad") | table.component.str.contains("lora_")]
    with pytest.raises(plots.NoDataError):
        plots.plot_component_summary(factors_only, kind="grad")  # adapter factors are never compared


def test_bad_arguments_are_dynamics_errors(table):
    with pytest.raises(DynamicsError, match="epoch"):
        plots.plot_rank_over_training(table, x="epoch")
    with pytest.raises(DynamicsError, match="DataFrame"):
        plots.plot_loss([1, 2, 3])
    with pytest.raises(DynamicsError, match=r"\['metric'\]"):
        plots.plot_loss(table.drop(columns=["metric"]))
    with pytest.raises(DynamicsError, match="bogus"):
        plots.plot_update_rank(table, kinds=["bogus"])


# ------------------------------------------------------------------------------------------ registry, save_all


def test_save_all_writes_every_figure_the_data_supports(table, spectra, tmp_path):
    paths = plots.save_all(table, spectra, tmp_path / "figs", dpi=30)
    names = {p.stem for p in paths}
    assert names == {
        "loss",
        "weight_rank",
        "grad_rank",
        "grad_condition",
        "update_rank",
        "circuit_rank",
        "act_rank",
        "act_anisotropy",
        "cka",
        "component_summary",
        "grad_component_summary",
        "weight_spectra",
    }
    assert names <= set(plots.REGISTRY)
    assert {p.suffix for p in paths} == {".png", ".pdf"} and len(paths) == 2 * len(names)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)  # no temp files
    assert plt.get_fignums() == []  # every figure closed


def test_registry_skips_a_figure_without_data(table, tmp_path, caplog):
    lean = table[(table.kind != "act") & (table.method == "full")]
    with caplog.at_level(logging.INFO, logger="dynamics.plots"):
        paths = plots.save_all(lean, None, tmp_path, formats=("png",), dpi=20)
    names = {p.stem for p in paths}
    assert {"loss", "weight_rank", "update_rank"} <= names
    assert not names & {"cka", "act_rank", "weight_spectra", "heavy_tails", "seed_summary"}
    skipped = {r.getMessage().split()[2].rstrip(":") for r in caplog.records if "skipping" in r.getMessage()}
    assert skipped == set(plots.REGISTRY) - names  # every figure not written is reported
    assert plt.get_fignums() == []


@pytest.mark.parametrize("error", [TypeError, KeyError, AttributeError])
def test_registry_lets_programming_errors_through(table, tmp_path, monkeypatch, error):
    def broken(t: pd.DataFrame, s: pd.DataFrame | None) -> Figure:
        plt.figure()  # a half-drawn figure ...
        raise error("a bug, not missing data")

    def no_data(t: pd.DataFrame, s: pd.DataFrame | None) -> Figure:
        raise plots.NoDataError("nothing to draw")

    monkeypatch.setattr(registry, "REGISTRY", {"fine": registry.REGISTRY["loss"], "empty": no_data, "bug": broken})
    with pytest.raises(error, match="a bug"):
        plots.save_all(table, None, tmp_path, formats=("png",), dpi=20)
    assert [p.name for p in tmp_path.iterdir()] == ["fine.png"]  # drawn before the bug; the empty one skipped
    assert plt.get_fignums() == []  # ... is closed


def test_registry_bug_in_a_figure_call_propagates(table, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", {"loss": lambda t, s: plots.plot_loss(t, no_such_option=1)})
    with pytest.raises(TypeError):
        plots.save_all(table, None, tmp_path, formats=("png",))


def test_save_all_from_paths(table, spectra, tmp_path):
    results = tmp_path / "results.parquet"
    table[table.kind == "train"].to_parquet(results, index=False)
    spectra.to_parquet(tmp_path / "results.spectra.parquet", index=False)
    paths = plots.save_all(results, out_dir=tmp_path / "out", formats=[".PNG"], dpi=20)
    assert sorted(p.name for p in paths) == ["loss.png", "weight_spectra.png"]  # spectra found next to the table
    with pytest.raises(DynamicsError, match="docx"):
        plots.save_all(table, out_dir=tmp_path / "x", formats=("docx",))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ package layout


def test_package_imports_point_one_way():
    """_style ← _common ← _grid ← families ← registry ← __init__: no module imports one at its level or above."""
    package = Path(plots.__file__).parent
    rank = {"_style": 0, "_common": 1, "_grid": 2, "registry": 4, "__init__": 5}
    for path in sorted(package.glob("*.py")):
        here = path.stem
        level = rank.get(here, 3)  # a figure family
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name != "dynamics.plots", f"{here} imports the package itself"
                if name.startswith("dynamics.plots."):
                    other = name.split(".")[2]
                    assert rank.get(other, 3) < level, f"{here} imports {other}"
    assert importlib.util.find_spec("dynamics.plots_analyses") is None  # the old second module is gone
