"""Corpus of the embedded "tiny" model: CPython's shipped documentation.

Recipe (recorded verbatim in the manifest by `recipe`):

* Documents, in this order:
  1. every docstring (module, class, function; ``ast.get_docstring``, so
     cleaned of indentation) of the ``.py`` files under
     ``sysconfig.get_paths()["stdlib"]``, files in sorted relative-path
     order, nodes in ``ast.walk`` order, skipping directories named in
     `EXCLUDED_DIRS` and docstrings shorter than `MIN_DOC_CHARS`;
  2. the texts of ``pydoc_data.topics.topics`` (the language reference
     topics ``help()`` prints) in sorted key order.
* Split: document ``i`` (0-based, in that order) is held out when
  ``i % HELDOUT_EVERY == 0``; the rest is training text.
* Synthetic induction rows (`induction_rows`): ``BOS`` + a span of ``L``
  uniform random ordinary token ids (``L`` uniform in
  ``[MIN_SPAN, MAX_SPAN]``) repeated until the row is full. They teach the
  model to copy, so induction heads form.

The text depends on the CPython version (the committed assets were built
with the version in the manifest).
"""

from __future__ import annotations

import ast
import pathlib
import sys
import sysconfig

import numpy as np

EXCLUDED_DIRS = ("site-packages", "test", "tests", "idlelib", "turtledemo")
MIN_DOC_CHARS = 40
HELDOUT_EVERY = 20
MIN_SPAN, MAX_SPAN = 2, 24


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _docstrings(path: pathlib.Path) -> list[str]:
  try:
    tree = ast.parse(path.read_text(encoding="utf-8"))
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, kinds):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= MIN_DOC_CHARS:
        out.append(doc)
  return out


def documents() -> list[str]:
  """All documents of the recipe, in order."""
  root = stdlib_root()
  files = sorted(
    (
      p
      for p in root.rglob("*.py")
      if not set(p.relative_to(root).parts[:-1]) & set(EXCLUDED_DIRS)
    ),
    key=lambda p: p.relative_to(root).as_posix(),
  )
  docs = [doc for path in files for doc in _docstrings(path)]
  from pydoc_data import topics

  docs += [topics.topics[key].strip() for key in sorted(topics.topics)]
  return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
  """``(train, heldout)`` by document index."""
  train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
  heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == 0]
  return train, heldout


def induction_rows(
  rng: np.random.Generator,
  rows: int,
  seq_len: int,
  low: int,
  high: int,
  bos_id: int = 2,
) -> np.ndarray:
  """``[rows, seq_len + 1]`` rows of BOS + a random span repeated.

  Args:
    rng: Numpy generator (the only source of randomness).
    rows: Number of rows.
    seq_len: Tokens after BOS.
    low: Smallest token id drawn (ordinary pieces, after byte pieces).
    high: One past the largest id drawn (the vocabulary size).
    bos_id: BOS id.
  """
  out = np.empty((rows, seq_len + 1), np.int32)
  out[:, 0] = bos_id
  for r in range(rows):
    span = rng.integers(low, high, int(rng.integers(MIN_SPAN, MAX_SPAN + 1)))
    reps = -(-seq_len // len(span))
    out[r, 1:] = np.tile(span, reps)[:seq_len]
  return out


def recipe() -> dict:
  """The corpus recipe as a JSON-able dict (for the manifest)."""
  return dict(
    source="docstrings of CPython stdlib .py files + pydoc_data.topics",
    stdlib=str(stdlib_root()),
    python=sys.version.split()[0],
    excluded_dirs=list(EXCLUDED_DIRS),
    min_doc_chars=MIN_DOC_CHARS,
    order="sorted relative paths, ast.walk order; then sorted topic keys",
    heldout=f"document i is held out when i % {HELDOUT_EVERY} == 0",
    induction_span=[MIN_SPAN, MAX_SPAN],
  )
