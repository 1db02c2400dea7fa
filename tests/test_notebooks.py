"""The notebooks under notebooks/: each .ipynb is executed in fast mode (SMALL=1) by
nbclient in a fresh kernel of this venv's Python, with a temporary working directory and a
per-cell timeout; any error (including a failed assertion cell) fails the test. Also checks
that every .ipynb is committed without outputs and matches its jupytext .py source."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell in fast mode

pytest.importorskip("nbclient")
pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")


def _executor():
    spec = importlib.util.spec_from_file_location("nb_execute", NB_DIR / "execute.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_five_notebooks_present():
    assert NOTEBOOKS == ["01_subgm_quickstart.ipynb", "02_sweeps.ipynb",
                         "03_sae_quickstart.ipynb", "04_atoms.ipynb", "05_paper_scale.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_paired(name):
    import jupytext
    import nbformat

    nb = nbformat.read(NB_DIR / name, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: outputs committed"
    src = jupytext.read(NB_DIR / name.replace(".ipynb", ".py"))
    assert [(c.cell_type, c.source) for c in nb.cells] == \
        [(c.cell_type, c.source) for c in src.cells], \
        f"{name} differs from its .py: run `jupytext --sync notebooks/*.py`"
    # one set-up cell: the Colab install, first code cell, with the URL placeholder variable
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "REPO_URL" in first.source and "google.colab" in first.source
    assert any("SMALL" in c.source and "os.environ" in c.source for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, tmp_path):
    ex = _executor()
    env = None  # the kernel inherits this process's environment (+ SMALL=1, HF_HUB_OFFLINE=1)
    nb, seconds, cpu = ex.execute(NB_DIR / name, small=True, cwd=tmp_path,
                                  timeout=CELL_TIMEOUT, env=env)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    # the last cell is the checks cell and ran to its end
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "checks passed" in text, text
    print(f"{name}: {seconds:.1f} s wall, {cpu:.1f} s CPU ({sys.executable})")
