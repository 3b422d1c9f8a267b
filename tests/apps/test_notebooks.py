"""The tutorial notebooks run end to end on the embedded model (offline).

Each notebook is executed top to bottom in a fresh kernel (nbclient); any
cell error fails the test. The committed notebooks must also be exactly what
``scripts/make_notebooks.py`` writes.
"""

from __future__ import annotations

import sys

import nbformat
import pytest
from helpers.paths import ROOT  # noqa: E402
from nbclient import NotebookClient

sys.path.insert(0, str(ROOT / "scripts"))
import make_notebooks  # noqa: E402

NOTEBOOKS = sorted(make_notebooks.NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_errors(name, tmp_path):
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  client = NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  html = [o for o in outputs if "text/html" in o.get("data", {})]
  assert html, "the notebook shows no rendered view"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_the_script(name):
  committed = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  built = make_notebooks.build(make_notebooks.NOTEBOOKS[name])
  assert [c.source for c in committed.cells] == [c.source for c in built.cells]
