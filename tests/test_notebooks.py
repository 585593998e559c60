"""The notebooks: committed executed, with the outputs a reader on the web sees (figures as
PNG), written by their builders ``experiments/build_notebook_0N.py``, and runnable top to
bottom (CI re-executes them with a small budget via ``KRFLOWS_NOTEBOOK_STEPS``; its outputs may
differ from the committed ones)."""

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
MAX_BYTES = 1_000_000


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_executed(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is above {MAX_BYTES} bytes: shrink its figures"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} is not executed top to bottom in one kernel: run its builder"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} has an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure"
    assert sum(1 for c in code if c.outputs) >= len(code) // 2, f"{path.name}: most cells are silent"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_matches_its_builder(path, monkeypatch):
    builder = ROOT / "experiments" / f"build_notebook_{path.name[:2]}.py"
    assert builder.exists(), f"{path.name} has no builder {builder.name}"
    monkeypatch.syspath_prepend(str(builder.parent))
    spec = importlib.util.spec_from_file_location(f"_builder_{path.stem}", builder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PATH.resolve() == path.resolve()
    nb = nbformat.read(path, as_version=4)
    kinds = {"markdown": "md", "code": "code"}
    assert [(kinds[c.cell_type], c.source) for c in nb.cells] == module.CELLS, \
        f"{path.name} differs from {builder.name}: run `python experiments/{builder.name}`"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KRFLOWS_NOTEBOOK_STEPS", os.environ.get("KRFLOWS_NOTEBOOK_STEPS", "150"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # re-execute from scratch
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
