"""The analysis options `dynamics analyze` builds from its flags (no analysis runs: analyze_runs is replaced)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

import dynamics.analyze
from dynamics.analyze import AnalysisOptions
from dynamics.cli import main


@pytest.fixture
def options_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """Run `dynamics analyze FLAGS` and return the AnalysisOptions it passed to analyze_runs."""
    seen: list[AnalysisOptions] = []

    def fake(runs: Any, out: Any, *, options: AnalysisOptions, **kw: Any) -> tuple[pd.DataFrame, list[Any]]:
        seen.append(options)
        return pd.DataFrame({"run": []}), []

    monkeypatch.setattr(dynamics.analyze, "analyze_runs", fake)

    def run(*flags: str) -> AnalysisOptions:
        main(["analyze", str(tmp_path), "--out", str(tmp_path / "r.parquet"), "--no-progress", *flags])
        return seen[-1]

    return run


def test_basic_flag_is_the_basic_options(options_of: Any) -> None:
    assert options_of("--basic") == AnalysisOptions.basic()


def test_basic_keeps_the_chosen_kinds_and_circuits(options_of: Any) -> None:
    opts = options_of("--basic", "--kinds", "weight,update", "--no-circuits")
    assert opts == AnalysisOptions.basic(kinds=("weight", "update"), circuits=False)
