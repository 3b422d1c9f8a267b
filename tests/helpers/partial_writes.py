"""Runs every library file writer into a file-size limit, in its own process.

``python -m helpers.partial_writes OUT`` writes each output kind once without a limit
(the "previous" file), then again with bigger content under
``RLIMIT_FSIZE`` (writes past the limit fail with ``EFBIG`` halfway, like a
full disk), and prints one JSON object: per kind, the folder's files with
their SHA-256 before and after the failed write, and the error raised. The test
(`tests/apps/test_file_writes.py`) draws the conclusions.

A ``control`` kind does the same with a plain ``Path.write_bytes``, showing
that the limit really leaves a truncated file behind when a write is not
atomic.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import resource
import signal
import sys

import numpy as np

import gemma_surgery as gs
from gemma_surgery.sae import AutoEncoder, SAEInfo
from helpers.sae_writers import random_sae

LIMIT = 4096  # bytes: every new file below is larger


def _listing(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


def _report(text: str) -> gs.viz.Report:
  report = gs.viz.Report("report")
  report.text(text)
  return report


def _heatmap(n: int) -> gs.viz.Heatmap:
  values = np.random.default_rng(n).normal(size=(n, n))
  return gs.viz.heatmap(values, title=f"{n}x{n}")


def _sae(width: int) -> AutoEncoder:
  info = SAEInfo(family="res", layer=1, site="resid_post", d_in=64, width=width)
  return AutoEncoder.from_arrays(random_sae(width, width=width), info)


def _save_sae(width: int, folder: pathlib.Path, model_name: str) -> None:
  gs.sae.save_gemma_scope_2(_sae(width), folder, l0="x", model_name=model_name)


def _save_hf(folder: pathlib.Path) -> None:
  gs.loading.save_hf(gs.load("tiny", progress=False).model, folder)


def _kinds(out: pathlib.Path) -> dict:
  """Per kind: (folder, write the previous version, write the new version)."""
  control = out / "control" / "plain.bin"
  report = out / "report" / "report.html"
  view = out / "view" / "view.html"
  png = out / "png" / "heatmap.png"
  sae = out / "sae" / "resid_post" / "layer_1_width_8_l0_x"
  hf = out / "hf" / "checkpoint"
  return {
    "control": (
      control.parent,
      lambda: control.write_bytes(b"old" * 100),
      lambda: control.write_bytes(b"new" * 10_000),
    ),
    "report": (
      report.parent,
      lambda: _report("old").save(report),
      lambda: _report("new " * 10_000).save(report),
    ),
    "html_view": (
      view.parent,
      lambda: _heatmap(2).save(view),
      lambda: _heatmap(40).save(view),
    ),
    "png": (
      png.parent,
      lambda: _heatmap(2).save_png(png),
      lambda: _heatmap(40).save_png(png),
    ),
    "sae": (
      sae.parent,
      lambda: _save_sae(8, sae, "old"),
      # New weights that fit (safetensors itself never truncates a file) and a
      # config.json that doesn't: the pair must not end up half new.
      lambda: _save_sae(4, sae, "new" * 2000),
    ),
    "hf": (hf.parent, lambda: None, lambda: _save_hf(hf)),  # save_hf never overwrites
  }


def main(out: pathlib.Path) -> None:
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  results = {}
  for kind, (folder, write_old, write_new) in _kinds(out).items():
    folder.mkdir(parents=True, exist_ok=True)
    write_old()
    before = _listing(folder)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
      write_new()
      error = None
    except Exception as e:  # noqa: BLE001  (reported, judged by the test)
      error = f"{type(e).__name__}: {e}"
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results[kind] = dict(before=before, after=_listing(folder), error=error)
  print(json.dumps(results))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
