"""Which matrices a ReLoRA run wraps comes from its stored config: a run with ``relora.targets=[q,v]`` is analysed so.

Before, the analysis kept its own list of the seven projections (and a default
rank of 8), so such a run got intruder, cycle-overlap and cross-run overlap rows
for k, o, gate, up and down too, as if they had been wrapped.
"""

from __future__ import annotations

import numpy as np
import pytest

from dynamics.analyze import AnalysisOptions, analyze_runs
from dynamics.io import open_run
from dynamics.summary import COMPONENT_ORDER

RANK = 4  # the shared pair's ReLoRA rank (tests/conftest.py), kept for the q,v run
WRAPPED = {"attn.q", "attn.v"}


@pytest.fixture(scope="module")
def qv_table(trained_pair, pair_overrides, tmp_path_factory):
    """The shared full-rank run and a ReLoRA run wrapping q and v only (otherwise the pair's settings), analysed."""
    from trainer.config import build_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("qv")
    cfg = build_config(overrides=pair_overrides["base"] + pair_overrides["relora"] + ["relora.targets=[q,v]"])
    qv = train(cfg, root / "relora-qv", progress=False)
    options = AnalysisOptions(
        kinds=("weight", "update_cumulative", "update_merge", "lora"),
        circuits=False,
        keep_spectra=False,
        heavy_tails=False,
        spikes=False,
    )
    table, errors = analyze_runs([trained_pair.full, qv], root / "results.parquet", options=options, progress=False)
    assert errors == []
    return table, qv


def rows(table, **kw):
    m = np.ones(len(table), bool)
    for k, v in kw.items():
        m &= (table[k] == v).to_numpy()
    return table[m]


def test_the_run_stores_what_it_wrapped(qv_table):
    _, qv = qv_table
    wrapped = open_run(qv).wrapped
    assert (wrapped.targets, wrapped.rank) == (("q", "v"), RANK)


def test_wrapped_only_rows_are_for_q_and_v_alone(qv_table, trained_pair):
    table, qv = qv_table
    run = qv.name
    lora = rows(table, run=run, kind="lora", metric="numerical_rank")
    intruders = rows(table, run=run, kind="weight", metric="intruders")
    overlap = rows(table, run=run, kind="update_merge", metric="overlap_prev")
    cross = rows(table, run=run, kind="cross_run", metric="update_overlap")
    for name, found in (("lora", lora), ("intruders", intruders), ("overlap_prev", overlap), ("cross-run", cross)):
        assert set(found["component"]) == WRAPPED, f"{name} rows for {sorted(set(found['component']))}"
    assert set(overlap["step"]) == {8}  # merges at 4 and 8: the second cycle is compared with the first
    assert (cross["value"].between(0, 1)).all() and set(cross["step"]) == {4, 8}
    # the full-rank run trains every projection: its intruder rows cover all seven
    full = rows(table, run=trained_pair.full.name, kind="weight", metric="intruders")
    assert set(full["component"]) == set(COMPONENT_ORDER)


def test_only_the_wrapped_matrices_have_rank_limited_cycles(qv_table):
    """One cycle's update is rank ≤ r where an adapter was merged, and not where the matrix trained at full rank."""
    table, qv = qv_table
    cycle = rows(table, run=qv.name, kind="update_merge", metric="numerical_rank")
    wrapped = cycle[cycle["component"].isin(WRAPPED)]
    unwrapped = cycle[cycle["component"].isin(set(COMPONENT_ORDER) - WRAPPED)]
    assert len(wrapped) and wrapped["value"].max() <= RANK
    assert len(unwrapped) and unwrapped["value"].min() > RANK
