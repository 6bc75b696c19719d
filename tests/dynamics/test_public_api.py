"""The public API in `dynamics.__all__` resolves, and importing it stays light."""

import subprocess
import sys

import dynamics


def test_every_name_in_all_resolves():
    missing = [name for name in dynamics.__all__ if getattr(dynamics, name, None) is None]
    assert missing == []
    assert len(set(dynamics.__all__)) == len(dynamics.__all__)


def test_run_reader_and_results_table_are_public():
    from dynamics.analyze import read_results
    from dynamics.io import open_run

    assert dynamics.open_run is open_run
    assert dynamics.read_results is read_results
    assert dynamics.plots.__name__ == "dynamics.plots"


def test_import_does_not_load_plotting_or_pandas():
    code = "import sys, dynamics; print('matplotlib' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_attribute_is_an_attribute_error():
    try:
        dynamics.no_such_metric  # noqa: B018
    except AttributeError as e:
        assert "no_such_metric" in str(e)
    else:
        raise AssertionError("expected AttributeError")
