"""Structured figures from a benchmark script, for `bench/run_all.py`.

A benchmark script calls ``add_arguments(parser)`` and, next to each printed
figure, ``recorder.figure(key, label, value, unit)``; with ``--json PATH`` the
figures are written there at the end (`Recorder.save`) for `run_all` to
collect. Run alone, a script prints as before and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--json", type=pathlib.Path, default=None, help="write the figures here"
  )


class Recorder:
  """Collects ``{key, label, value, unit, goal, note}`` figures in order."""

  def __init__(self, benchmark: str, path: pathlib.Path | None):
    self.benchmark, self.path, self.figures = benchmark, path, []
    self.context: dict[str, Any] = {}

  @classmethod
  def from_args(cls, benchmark: str, args: argparse.Namespace) -> Recorder:
    return cls(benchmark, args.json)

  def figure(
    self,
    key: str,
    label: str,
    value: float | int | bool | str,
    unit: str = "",
    *,
    goal: str | None = None,
    note: str | None = None,
  ) -> None:
    """Records one figure (``key`` unique within the benchmark)."""
    if any(f["key"] == key for f in self.figures):
      raise ValueError(f"figure {key!r} recorded twice in {self.benchmark}")
    if isinstance(value, float):
      value = float(f"{value:.6g}")
    self.figures.append(
      {
        "key": key,
        "label": label,
        "value": value,
        "unit": unit,
        "goal": goal,
        "note": note,
      }
    )

  def save(self) -> None:
    """Writes ``{benchmark, context, figures}`` to ``--json`` (atomically)."""
    if self.path is None:
      return
    payload = {
      "benchmark": self.benchmark,
      "context": self.context,
      "figures": self.figures,
    }
    write_json(self.path, payload)


def write_json(path: pathlib.Path, payload: Any) -> None:
  """Writes ``payload`` as JSON to ``path`` atomically."""
  write_text(path, json.dumps(payload, indent=1) + "\n")


def write_text(path: pathlib.Path, text: str) -> None:
  """Writes a temporary file next to ``path``, then renames it over ``path``."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)
