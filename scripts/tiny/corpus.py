"""The training corpus of the embedded model: CPython's own docstrings.

Recipe (deterministic for a given CPython version): every ``.py`` file under
``sysconfig.get_paths()["stdlib"]`` in sorted order, skipping test suites,
``site-packages`` and ``idlelib``; from each, the module, class and function
docstrings found by ``ast`` in source order, cleaned with
``inspect.cleandoc``; documents shorter than 40 characters are dropped. Every
``HOLDOUT_EVERY``-th document is held out for evaluation. No network.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import sysconfig
import warnings

HOLDOUT_EVERY = 50
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}


def stdlib_files() -> list[pathlib.Path]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(
    p
    for p in root.rglob("*.py")
    if not SKIP_PARTS.intersection(p.relative_to(root).parts)
  )


def docstrings(path: pathlib.Path) -> list[str]:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      tree = ast.parse(path.read_text(encoding="utf-8"))
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  nodes = [tree] + [
    n
    for n in ast.walk(tree)
    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
  ]
  out = []
  for node in nodes:
    doc = ast.get_docstring(node, clean=False)
    if doc:
      doc = inspect.cleandoc(doc)
      if len(doc) >= 40:
        out.append(doc)
  return out


def documents() -> tuple[list[str], list[str]]:
  """``(train, heldout)`` documents."""
  docs = [d for p in stdlib_files() for d in docstrings(p)]
  train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY]
  heldout = [d for i, d in enumerate(docs) if not i % HOLDOUT_EVERY]
  return train, heldout


if __name__ == "__main__":
  train, heldout = documents()
  print(len(train), sum(map(len, train)), len(heldout), sum(map(len, heldout)))
