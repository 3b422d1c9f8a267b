"""Writes the tutorial notebooks in ``notebooks/`` (run: python scripts/make_notebooks.py).

Each notebook is a tutorial: it explains what is measured, why, and what the
result shows on the embedded model (and, labelled, what the published
tutorials found on real Gemma). It runs offline on the embedded model by
default; set ``MODEL`` (and ``SAE``) in its first code cell to a real Gemma
checkpoint and Gemma Scope SAE to run the same analyses on them. The cells
live in ``scripts/tutorials/``; ``tests/apps/test_notebooks.py`` executes the
notebooks and checks that the effects their text describes are there.
"""

from __future__ import annotations

import pathlib

import nbformat
from tutorials import (
  activation_hacking,
  gemma_scope,
  induction_heads,
  tracing_a_circuit,
)

OUT = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
  }
  for kind, source in cells:
    make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
    nb.cells.append(make(source))
  return nb


NOTEBOOKS = {
  "activation_hacking.ipynb": activation_hacking.CELLS,
  "gemma_scope.ipynb": gemma_scope.CELLS,
  "induction_heads.ipynb": induction_heads.CELLS,
  "tracing_a_circuit.ipynb": tracing_a_circuit.CELLS,
}


def main() -> None:
  OUT.mkdir(exist_ok=True)
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(cells), OUT / name)
    print("wrote", OUT / name)


if __name__ == "__main__":
  main()
