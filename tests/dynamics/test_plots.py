"""dynamics.plots on a small synthetic results table (fast; no training)."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # tests never open windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dynamics import plots  # noqa: E402
from dynamics.validation import DynamicsError  # noqa: E402

STEPS = (0, 10, 20)
LAYERS = (0, 1)
COMPS = ("attn.q", "mlp.down")
TOKENS_PER_STEP = 256
RESET = 10


def _row(run, method, step, layer, component, kind, metric, value):
    return dict(run=run, method=method, step=step, tokens=step * TOKENS_PER_STEP, layer=layer, component=component,
                kind=kind, metric=metric, value=float(value))


def make_table(methods=("full", "relora"), *, act=True, train=True, updates=True) -> pd.DataFrame:
    """Both methods, 3 checkpoints, 2 layers, 2 projections, per-head circuits, updates, activations, train logs."""
    rows = []
    for method in methods:
        run = f"{method}-run"
        gap = 0.1 if method == "relora" else 0.0
        for step in STEPS:
            for layer in LAYERS:
                for comp in COMPS:
                    per = 0.9 - 0.005 * step - gap - 0.02 * layer
                    for kind in ("weight", "grad"):
                        rows += [_row(run, method, step, layer, comp, kind, "proportional_effective_rank", per),
                                 _row(run, method, step, layer, comp, kind, "effective_rank", per * 64),
                                 _row(run, method, step, layer, comp, kind, "log10_condition_number", 2 + 0.1 * step),
                                 _row(run, method, step, layer, comp, kind, "condition_number", 10 ** (2 + 0.1 * step))]
                    if updates and step > 0:
                        rows.append(_row(run, method, step, layer, comp, "update", "proportional_effective_rank", per / 2))
                        rows.append(_row(run, method, step, layer, comp, "update_cumulative",
                                         "proportional_effective_rank", per / 1.5))
                    if updates and method == "relora":
                        rows.append(_row(run, method, step, layer, comp, "lora", "proportional_effective_rank", 0.05))
                        if step > 0 and step % RESET == 0:
                            rows.append(_row(run, method, step, layer, comp, "update_restart",
                                             "proportional_effective_rank", 0.06))
                        # ReLoRA's adapter-factor gradients: never compared with full-rank matrices
                        rows.append(_row(run, method, step, layer, f"{comp}.lora_a", "grad", "log10_condition_number",
                                         np.inf))
                        rows.append(_row(run, method, step, layer, f"{comp}.lora_a", "grad",
                                         "proportional_effective_rank", 0.01))
                for h in range(2):
                    rows.append(_row(run, method, step, layer, f"attn.ov.h{h}", "weight", "proportional_effective_rank",
                                     0.2 + 0.1 * h))
                if act:
                    for site in ("resid_pre", "resid_post"):
                        rows.append(_row(run, method, step, layer, site, "act", "proportional_effective_rank", 0.5))
                        rows.append(_row(run, method, step, layer, site, "act", "anisotropy", 0.3))
                        if step > 0:
                            rows.append(_row(run, method, step, layer, site, "act", "cka_prev", 0.8 - gap))
                        if step < STEPS[-1]:
                            rows.append(_row(run, method, step, layer, site, "act", "cka_final", 0.7))
            for comp in ("embed", "lm_head"):
                rows.append(_row(run, method, step, -1, comp, "weight", "proportional_effective_rank", 0.95))
        if train:
            for step in range(0, STEPS[-1] + 1):
                if step > 0:
                    rows.append(_row(run, method, step, -1, "model", "train", "loss", 6 - 0.1 * step + gap))
                    lr = 0.0 if step == 1 or (method == "relora" and (step - 1) % RESET == 0) else 1e-3
                    rows.append(_row(run, method, step, -1, "model", "train", "lr", lr))
                if step in STEPS:
                    rows.append(_row(run, method, step, -1, "model", "train", "val_loss", 6 - 0.09 * step + gap))
                    rows.append(_row(run, method, step, -1, "model", "train", "pair_acc", 0.5 + 0.01 * step))
    return pd.DataFrame(rows, columns=list(plots.COLUMNS))


def make_spectra(methods=("full", "relora")) -> pd.DataFrame:
    rows = []
    for method in methods:
        for step in STEPS:
            for layer in LAYERS:
                values = np.sort(np.linspace(0.1, 1.0 + step / 10, 16))[::-1]
                values[-1] = 0.0  # a zero singular value cannot be drawn on a log axis: must be skipped
                rows.append(dict(run=f"{method}-run", method=method, step=step, layer=layer, component="mlp.down",
                                 kind="weight", shape=[16, 32], values=values.tolist()))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_table()


@pytest.fixture(scope="module")
def spectra() -> pd.DataFrame:
    return make_spectra()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _visible(fig: Figure) -> list:
    """Data axes (not colour bars, not hidden spares)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _titles(fig: Figure) -> list[str]:
    return [ax.get_title(loc="left") for ax in _visible(fig)]


def _vlines_x(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]


def _one_legend(fig: Figure) -> None:
    assert len(fig.legends) == 1
    assert all(ax.get_legend() is None for ax in fig.axes)


# ------------------------------------------------------------------------------------------ figures


def test_rank_over_training_grid_labels_and_restarts(table):
    fig = plots.plot_rank_over_training(table)
    assert isinstance(fig, Figure)
    axes = _visible(fig)
    assert len(axes) == len(COMPS) * 2  # rows = components, columns = methods
    titles = _titles(fig)
    assert titles[0] == "full-rank · attn.q" and titles[1] == "ReLoRA · attn.q"
    bottom_left = axes[-2]
    assert bottom_left.get_xlabel() == "training tokens seen"
    assert bottom_left.get_ylabel() == "PER"
    assert "effective rank / min(m,n)" in fig.get_suptitle()
    _one_legend(fig)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0", "1", "ReLoRA merge"]
    # ReLoRA's merge (step 10) is marked in its column only, at that step's token count
    assert _vlines_x(axes[1]) == [10 * TOKENS_PER_STEP]
    assert _vlines_x(axes[0]) == []
    # one line per layer
    assert len([ln for ln in axes[0].get_lines() if ln.get_linestyle() == "-"]) == len(LAYERS)


def test_rank_over_training_grad_step_axis_and_circuits(table):
    fig = plots.plot_rank_over_training(table, kind="grad", x="step")
    assert len(_visible(fig)) == len(COMPS) * 2  # the lora_a factor gradients are left out
    assert not any("lora" in t for t in _titles(fig))
    assert _visible(fig)[-1].get_xlabel() == "optimizer step"
    fig = plots.plot_rank_over_training(table, components=["attn.ov"])
    assert _titles(fig) == ["full-rank · attn.ov", "ReLoRA · attn.ov"]
    # heads averaged: 0.2 and 0.3 → 0.25
    y = np.concatenate([ln.get_ydata() for ln in _visible(fig)[0].get_lines() if ln.get_linestyle() == "-"])
    assert np.allclose(y, 0.25)


def test_rank_over_training_activations_default_sites(table):
    fig = plots.plot_rank_over_training(table, kind="act", metric="anisotropy")
    assert _titles(fig)[::2] == ["full-rank · resid_pre", "full-rank · resid_post"]


def test_condition_numbers_log_and_infinite(table):
    fig = plots.plot_condition_numbers(table)
    axes = _visible(fig)
    assert len(axes) == len(COMPS)
    assert _titles(fig) == list(COMPS)
    assert axes[0].get_ylabel() == "log10 σ₁/σ_k"
    assert all(ax.get_xlabel() == "training tokens seen" for ax in axes)  # each column's bottom panel
    assert axes[0].get_yscale() == "linear"
    _one_legend(fig)
    raw = plots.plot_condition_numbers(table, metric="condition_number")
    assert all(ax.get_yscale() == "log" for ax in _visible(raw))
    # a matrix with σ_k = 0 has an infinite condition number: left out and counted in the panel
    t = table.copy()
    inf = (t.kind == "grad") & (t.metric == "log10_condition_number") & (t.component == "attn.q") & (t.step == 20)
    t.loc[inf, "value"] = np.inf
    fig = plots.plot_condition_numbers(t)
    texts = [tx.get_text() for tx in _visible(fig)[0].texts]
    assert texts == [f"{int(inf.sum())} infinite left out"]


def test_condition_numbers_wraps_columns(table):
    many = pd.concat([table.assign(component=table.component.str.replace("attn.q", c, regex=False))
                      for c in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate")], ignore_index=True)
    fig = plots.plot_condition_numbers(many, col_wrap=4)
    assert len(_visible(fig)) == 6
    assert len(fig.axes) == 8  # 2 × 4 grid, two hidden


def test_update_rank_panels_and_restarts(table, caplog):
    fig = plots.plot_update_rank(table)
    axes = _visible(fig)
    assert _titles(fig) == [plots.UPDATE_TITLES[k] for k in plots.UPDATE_KINDS]
    assert axes[0].get_ylabel() == "PER"
    assert all(_vlines_x(ax) == [10 * TOKENS_PER_STEP] for ax in axes)
    _one_legend(fig)
    assert "ReLoRA merge" in [t.get_text() for t in fig.legends[0].get_texts()]
    full_only = table[table.method == "full"]
    with caplog.at_level(logging.INFO, logger="dynamics.plots"):
        fig = plots.plot_update_rank(full_only)
    assert len(_visible(fig)) == 2  # update, update_cumulative
    assert all(_vlines_x(ax) == [] for ax in _visible(fig))
    assert "no restart marks" in caplog.text


def test_restart_steps(table):
    assert plots.restart_steps(table) == [10]  # 20 is a boundary at the run's end: no update 20, no merge
    no_restart_rows = table[table.kind != "update_restart"]
    assert plots.restart_steps(no_restart_rows) == [10]  # from lr = 0 at logged step 11
    assert plots.restart_steps(table[table.method == "full"]) == []


def test_spectra_log_scale_and_steps(spectra):
    fig = plots.plot_spectra(spectra)
    axes = _visible(fig)
    assert len(axes) == 2
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert _titles(fig) == ["full-rank · layers.1.mlp.down", "ReLoRA · layers.1.mlp.down"]  # middle layer
    assert axes[0].get_ylabel() == "singular value σ_i"
    assert axes[0].get_xlabel() == "index i (descending)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"step {s}" for s in STEPS]
    assert all(len(ln.get_ydata()) == 15 for ln in axes[0].get_lines())  # the zero is not drawn
    fig = plots.plot_spectra(spectra, steps=[20], layer=0, normalize=True)
    assert axes and _visible(fig)[0].get_lines()[0].get_ydata()[0] == pytest.approx(1.0)


def test_spectra_errors(spectra):
    with pytest.raises(DynamicsError, match=r"component='attn.q'.*components of kind 'weight': \['mlp.down'\]"):
        plots.plot_spectra(spectra, component="attn.q")
    with pytest.raises(DynamicsError, match=r"layer 7; layers: \[0, 1\]"):
        plots.plot_spectra(spectra, layer=7)
    with pytest.raises(DynamicsError, match=r"steps \[5\].*steps: \[0, 10, 20\]"):
        plots.plot_spectra(spectra, steps=[5])
    with pytest.raises(DynamicsError, match="lacks columns"):
        plots.plot_spectra(spectra.drop(columns=["values"]))


def test_cka_heatmaps(table):
    fig = plots.plot_cka(table)
    axes = _visible(fig)
    assert len(axes) == 2 * 2  # sites × methods
    assert len(fig.axes) == len(axes) + 1  # one shared colour bar
    assert _titles(fig)[:2] == ["full-rank · resid_pre", "ReLoRA · resid_pre"]
    assert axes[0].get_ylabel() == "layer" and axes[-2].get_xlabel() == "checkpoint step"
    image = axes[0].get_images()[0].get_array()
    assert image.shape == (len(LAYERS), 2)  # cka_prev exists at steps 10 and 20
    assert [t.get_text() for t in axes[1].texts][:1] == ["0.70"]
    fig = plots.plot_cka(table, metric="cka_final", sites="resid_post")
    assert len(_visible(fig)) == 2


def test_loss_panels(table):
    fig = plots.plot_loss(table)
    axes = _visible(fig)
    assert len(axes) == 2
    assert axes[0].get_ylabel() == "loss (nats/token)"
    assert axes[1].get_ylabel() == "minimal-pair accuracy"
    assert all(ax.get_xlabel() == "training tokens seen" for ax in axes)
    _one_legend(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["full-rank", "ReLoRA"] and "validation" in labels
    no_acc = table[table.metric != "pair_acc"]
    assert len(_visible(plots.plot_loss(no_acc))) == 1


def test_component_summary(table):
    fig = plots.plot_component_summary(table)
    (ax,) = _visible(fig)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["attn.q", "mlp.down", "attn.ov", "embed", "lm_head"]
    assert ax.get_ylabel() == "PER" and ax.get_xlabel() == "component"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["full-rank (step 20)", "ReLoRA (step 20)"]
    assert len(ax.patches) >= len(ticks) * 2
    grad = plots.plot_component_summary(table, kind="grad", step=10)
    assert [t.get_text() for t in _visible(grad)[0].get_xticklabels()] == list(COMPS)  # no lora factors


def test_same_method_colours_everywhere(table):
    full_only = plots.method_palette(["full"])
    relora_only = plots.method_palette(["relora"])
    both = plots.method_palette(["full", "relora"])
    assert full_only["full"] == both["full"] and relora_only["relora"] == both["relora"]
    assert both["full"] != both["relora"]
    fig = plots.plot_loss(table[table.method == "relora"])
    handle = fig.legends[0].legend_handles[0]
    assert handle.get_label() == "ReLoRA" and handle.get_color() == both["relora"]


def test_theme_does_not_leak(table):
    before = dict(matplotlib.rcParams)
    plots.plot_rank_over_training(table)
    plots.plot_cka(table)
    after = dict(matplotlib.rcParams)
    assert {k: v for k, v in after.items() if before.get(k) != v and k != "backend"} == {}


# ------------------------------------------------------------------------------------------ errors


def test_missing_kind_names_what_is_there(table):
    no_grad = table[table.kind != "grad"]
    with pytest.raises(DynamicsError) as err:
        plots.plot_condition_numbers(no_grad)
    msg = str(err.value)
    assert "plot_condition_numbers" in msg and "kind='grad'" in msg and "'log10_condition_number'" in msg
    assert "kinds in the table: ['act', 'lora', 'train'" in msg


def test_missing_metric_and_components(table):
    with pytest.raises(DynamicsError, match=r"metric='sigma_max'.*metrics of kind 'weight': \['condition_number'"):
        plots.plot_rank_over_training(table, metric="sigma_max")
    with pytest.raises(DynamicsError, match=r"components \['mlp.up'\]; available: \['attn.q', 'mlp.down'"):
        plots.plot_rank_over_training(table, components=["mlp.up"])
    with pytest.raises(DynamicsError, match="cka_prev"):
        plots.plot_cka(table[table.kind != "act"])
    with pytest.raises(DynamicsError, match="update-matrix rows"):
        plots.plot_update_rank(table[~table.kind.isin(plots.UPDATE_KINDS)])
    with pytest.raises(DynamicsError, match="'loss' or 'val_loss'"):
        plots.plot_loss(table[~table.metric.isin(["loss", "val_loss"])])
    with pytest.raises(DynamicsError, match="x must be 'tokens' or 'step'"):
        plots.plot_rank_over_training(table, x="epoch")


def test_bad_table_type_and_columns(table):
    with pytest.raises(DynamicsError, match="pandas DataFrame"):
        plots.plot_loss([1, 2, 3])
    with pytest.raises(DynamicsError, match=r"lacks columns \['metric'\]"):
        plots.plot_loss(table.drop(columns=["metric"]))


# ------------------------------------------------------------------------------------------ save_all


def test_save_all_writes_png_and_pdf(table, spectra, tmp_path):
    paths = plots.save_all(table, spectra, tmp_path / "figs", dpi=40)
    names = {p.stem for p in paths}
    assert {"loss", "weight_rank", "grad_rank", "grad_condition", "update_rank", "circuit_rank", "act_rank",
            "act_anisotropy", "cka", "component_summary", "grad_component_summary", "weight_spectra"} == names
    assert {p.suffix for p in paths} == {".png", ".pdf"} and len(paths) == 2 * len(names)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)  # no temp files
    assert plt.get_fignums() == []  # every figure closed


def test_save_all_skips_what_the_data_lacks(table, tmp_path, caplog):
    lean = table[(table.kind != "act") & (table.method == "full")]
    with caplog.at_level(logging.INFO, logger="dynamics.plots"):
        paths = plots.save_all(lean, None, tmp_path, formats=("png",), dpi=30)
    names = {p.stem for p in paths}
    assert "cka" not in names and "act_rank" not in names and "weight_spectra" not in names
    assert {"loss", "weight_rank", "update_rank"} <= names
    assert "skipping cka" in caplog.text and "kind='act'" in caplog.text
    assert "skipping weight_spectra" in caplog.text
    assert "no restart marks" in caplog.text


def test_save_all_from_paths(table, spectra, tmp_path):
    results = tmp_path / "results.parquet"
    table[table.kind == "train"].to_parquet(results, index=False)
    spectra.to_parquet(tmp_path / "results.spectra.parquet", index=False)
    paths = plots.save_all(results, out_dir=tmp_path / "out", formats=[".PNG"], dpi=30)
    assert sorted(p.name for p in paths) == ["loss.png", "weight_spectra.png"]  # spectra found next to the table
    with pytest.raises(DynamicsError, match=r"unsupported formats \['docx'\]"):
        plots.save_all(table, out_dir=tmp_path / "x", formats=("docx",))
    assert not (tmp_path / "x").exists()
