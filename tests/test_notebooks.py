"""analysis_notebooks/: every notebook executes on the session's trained and analysed pair (tests/conftest.py).

The executions are ``slow`` (a kernel per notebook); the checks on the saved
files (stripped outputs, public API only) are fast.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "analysis_notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_rank_over_training.ipynb",
    "02_gradient_conditioning.ipynb",
    "03_update_matrix_rank.ipynb",
    "04_representation_similarity.ipynb",
]


def _code(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebooks_present_and_numbered():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saved_stripped_and_public_api_only(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit notebooks without outputs"
    source = "\n".join(_code(path))
    imports = set(re.findall(r"^\s*(?:from|import)\s+(dynamics[\w.]*)", source, flags=re.M))
    assert imports <= {"dynamics", "dynamics.analyze"}, imports
    assert "DYNAMICS_RESULTS" in source
    assert not re.search(r"plots\._", source), "private plotting helpers used"


# ---------------------------------------------------------------------------------------- execution


@pytest.fixture
def results_table(analysed_pair) -> Path:
    """The shared pair's results table (full rank and ReLoRA, checkpoints at 0, 4, 8, merges at 4 and 8)."""
    return analysed_pair[1]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A ``python3`` kernelspec that runs this interpreter (the venv's), found first via JUPYTER_PATH.

    The kernelspec installed in a venv runs ``python`` from PATH, which need not be the venv's.
    """
    d = tmp_path_factory.mktemp("jupyter")
    spec = d / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (tests)",
                "language": "python",
            }
        )
    )
    return d


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, results_table, kernel_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DYNAMICS_RESULTS", str(results_table))
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=180, allow_errors=False, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on the first error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert errors == []
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    figure_cells = [src for src in _code(path) if src.startswith("fig = plots.") or "\nfig = plots." in src]
    assert images and len(images) >= len(figure_cells), f"{path.name}: {len(images)} figures shown"
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert str(results_table) in printed  # the table came from DYNAMICS_RESULTS
    assert "relora" in printed and "full" in printed  # the answer table compares both methods
