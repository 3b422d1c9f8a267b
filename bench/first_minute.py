"""The first minute on the embedded model: import, load, first generate, tour.

Each figure is measured in a fresh process, cold (an empty persistent
compilation cache) and then warm (the cache the cold run filled), as a
newcomer meets them: ``import gemma_surgery``, ``gs.load("tiny")``, the first
``gs.generate`` (16 tokens), and the whole ``gemma-surgery tour --sae tiny``.
Goals (issue "first contact", unloaded 2-core machine): import <= 2 s, first
generate <= 3 s after import, tour <= 30 s.

Usage: ``python bench/first_minute.py [--no-tour]`` (about 3-6 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import record

PROBE = """
import json, time
t0 = time.perf_counter()
import gemma_surgery as gs
t1 = time.perf_counter()
lm = gs.load("tiny", progress=False)
t2 = time.perf_counter()
gs.generate(lm.model, ["def add(a, b):"], max_new_tokens=16, tokenizer=lm.tokenizer)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_generate": t3 - t2}))
"""


def _env(cache: pathlib.Path) -> dict:
  env = dict(os.environ, GEMMA_SURGERY_COMPILATION_CACHE=str(cache))
  env["XLA_FLAGS"] = ""  # one CPU device, as a newcomer has
  return env


def probe(cache: pathlib.Path) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", PROBE], env=_env(cache), capture_output=True, text=True
  )
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def tour(cache: pathlib.Path, out: pathlib.Path) -> float:
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "gemma_surgery", "tour", "--sae", "tiny", "--out"]
  done = subprocess.run(
    [*cmd, str(out)], env=_env(cache), capture_output=True, text=True
  )
  if done.returncode:
    raise SystemExit(done.stderr[-3000:])
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-tour", action="store_true")
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("first_minute", args)
  print(f"load average before: {os.getloadavg()}")
  with tempfile.TemporaryDirectory() as tmp:
    cache = pathlib.Path(tmp) / "cache"
    rows = {}
    for label in ("cold", "warm"):
      rows[label] = probe(cache)
      if not args.no_tour:
        rows[label]["tour"] = tour(cache, pathlib.Path(tmp) / f"tour_{label}")
      print(label, {k: round(v, 2) for k, v in rows[label].items()})
  print(f"load average after: {os.getloadavg()}")
  print("| measurement | cold cache | warm cache |")
  print("|---|---|---|")
  for key in rows["cold"]:
    print(f"| {key} | {rows['cold'][key]:.2f} s | {rows['warm'][key]:.2f} s |")
  labels = {
    "import": ("`import gemma_surgery`", "<= 2 s"),
    "load": ('`gs.load("tiny")`', None),
    "first_generate": ("first `gs.generate` (16 tokens) after the load", "<= 3 s"),
    "tour": ("`gemma-surgery tour --sae tiny` (whole command)", "<= 30 s"),
  }
  for key in rows["cold"]:
    label, goal = labels[key]
    for cache in ("cold", "warm"):
      rec.figure(
        f"{key}_{cache}",
        f"{label}, {cache} compilation cache",
        rows[cache][key],
        "s",
        goal=goal if cache == "warm" else None,
      )
  rec.save()


if __name__ == "__main__":
  main()
