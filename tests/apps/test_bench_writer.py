"""bench/report.py writes BENCHMARKS.md tables from a results file.

Synthetic results (no timing): the tables appear between their markers, the
text around them is kept, figures of a loaded run are marked, a rerun
replaces the numbers instead of adding blocks, and the repository's
BENCHMARKS.md keeps its hand-written sections when updated.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers.paths import ROOT

BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def report():
  spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _results(ratio=6.7, loaded=False):
  return {
    "meta": {
      "date": "2026-12-04 20:00 UTC",
      "command": "python bench/run_all.py",
      "jax": "0.10.2",
      "penzai": "0.2.5",
      "python": "3.11.9",
      "cpus": 2,
      "platform": "Linux x86_64, cpu",
      "load_rule": "other processes above 0.2 cores",
    },
    "benchmarks": {
      "generation": {
        "command": "python bench/generation.py",
        "load_before": 0.31,
        "load_during": [0.5, 1.2],
        "other_cpu": 0.9 if loaded else 0.02,
        "loaded": loaded,
        "seconds": 181.0,
        "figures": [
          {
            "key": "fused_over_pyloop",
            "label": "fused / pyloop, mid-size",
            "value": ratio,
            "unit": "x",
            "goal": ">= 6x",
            "note": None,
          },
          {
            "key": "same_tokens",
            "label": "same tokens",
            "value": True,
            "unit": "",
            "goal": None,
            "note": None,
          },
        ],
      },
      "sae": {
        "command": "python bench/sae.py",
        "load_before": 0.2,
        "load_during": [],
        "other_cpu": None,
        "loaded": False,
        "seconds": 3.0,
        "error": "exit status 1",
        "figures": [],
      },
    },
  }


DOC = """# Benchmarks

Intro by hand.

## A hand-written section

Keep me: 9.0×.
"""


def test_tables_are_written_between_markers(report):
  text = report.update_markdown(DOC, _results())
  assert text.startswith("# Benchmarks\n\nIntro by hand.")
  assert "## A hand-written section\n\nKeep me: 9.0×." in text
  assert text.index(report.SECTION) < text.index("## A hand-written section")
  assert "<!-- bench:begin generation -->" in text
  assert "| fused / pyloop, mid-size | 6.7× | >= 6x |" in text
  assert "| same tokens | yes |  |" in text
  assert "jax 0.10.2, penzai 0.2.5" in text
  assert "load average 0.31 before, 0.50–1.20 during" in text
  assert "quiet (" in text and "(loaded)" not in text
  assert "**failed**: `exit status 1`" in text  # the sae block
  # A rerun replaces the numbers; nothing is duplicated.
  again = report.update_markdown(text, _results(ratio=7.25, loaded=True))
  assert again.count("<!-- bench:begin generation -->") == 1
  assert "6.7×" not in again
  assert "| fused / pyloop, mid-size | 7.25× (loaded) | >= 6x |" in again
  assert "**measured under load: not a clean figure**" in again
  assert again.count(report.SECTION) == 1
  assert report.update_markdown(again, _results(7.25, True)) == again


def test_unknown_blocks_are_left_alone(report):
  doc = DOC + "\n<!-- bench:begin old -->\nold table\n<!-- bench:end old -->\n"
  text = report.update_markdown(doc, _results())
  assert "<!-- bench:begin old -->\nold table\n<!-- bench:end old -->" in text


def test_run_all_rewrites_a_file_from_results(tmp_path):
  results = tmp_path / "results.json"
  results.write_text(json.dumps(_results()))
  markdown = tmp_path / "BENCHMARKS.md"
  markdown.write_text(DOC)
  subprocess.run(
    [
      sys.executable,
      str(BENCH / "run_all.py"),
      "--from-results",
      str(results),
      "--markdown",
      str(markdown),
    ],
    check=True,
    capture_output=True,
    cwd=BENCH,
  )
  text = markdown.read_text()
  assert "| fused / pyloop, mid-size | 6.7× | >= 6x |" in text
  assert "Keep me: 9.0×." in text


def test_the_repository_file_keeps_its_sections(report):
  doc = (ROOT / "BENCHMARKS.md").read_text()
  text = report.update_markdown(doc, _results())
  for line in doc.splitlines():
    if line.startswith("## "):
      assert line in text
