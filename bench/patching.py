"""Activation-patching sweep: batched vs one jitted forward per patch.

Mid-size Gemma 2 architecture (`configs.MID`), random float32 weights; a
``resid_pre`` sweep over 8 layers × 20 positions (160 patches) between a clean
and a corrupted 20-token prompt, metric = logit difference at the last
position. Measured side by side in one run:

* batched: `gs.analysis.patching_sweep` with all 160 patches along the batch
  axis (``chunk_size=160``: one jitted forward);
* sequential: the same function with ``chunk_size=1``: one jitted forward per
  patch (the same compiled program called 160 times);

each timed on a first call (trace + compile + run) and as the median of
later calls. The two results must agree.

Run: ``python bench/patching.py`` (``--runs N``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import record
from configs import MID

import gemma_surgery as gs

LAYERS, POSITIONS = 8, 20


CORRECT, WRONG = 11, 12  # token ids of the logit-difference metric


def prompts() -> tuple[np.ndarray, np.ndarray]:
  """``(clean, corrupted)`` ``[1, POSITIONS]`` ids: BOS + random tokens, one
  token (position 5) changed."""
  rng = np.random.default_rng(0)
  clean = rng.integers(3, MID.vocab_size, (1, POSITIONS)).astype(np.int32)
  clean[0, 0] = 2
  corrupted = clean.copy()
  corrupted[0, 5] = (clean[0, 5] + 17) % MID.vocab_size
  return clean, corrupted


def resid_pre_sweep(model, clean, corrupted, chunk: int) -> np.ndarray:
  """Our ``[LAYERS, POSITIONS]`` resid_pre sweep, ``chunk`` patches per call."""
  return gs.analysis.patching_sweep(
    model,
    clean,
    corrupted,
    gs.analysis.logit_difference(CORRECT, WRONG),
    site="resid_pre",
    chunk_size=chunk,
    progress=False,
  ).scores


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("patching", args)
  model = gs.build_model(MID, jax.random.key(0))
  clean, corrupted = prompts()

  def sweep(chunk):
    return resid_pre_sweep(model, clean, corrupted, chunk)

  results, first, times = {}, {}, {}
  chunks = {"batched": LAYERS * POSITIONS, "sequential": 1}
  for name, chunk in chunks.items():
    start = time.perf_counter()
    results[name] = sweep(chunk)
    first[name] = time.perf_counter() - start
    times[name] = []
  for _ in range(args.runs):  # interleaved
    for name, chunk in chunks.items():
      start = time.perf_counter()
      sweep(chunk)
      times[name].append(time.perf_counter() - start)
  steady = {name: statistics.median(t) for name, t in times.items()}
  agree = np.abs(results["batched"] - results["sequential"]).max()
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}; mid-size Gemma 2, float32,"
    f" resid_pre sweep {LAYERS} layers x {POSITIONS} positions"
  )
  for name in results:
    print(
      f"{name:<11} first call {first[name]:7.2f} s   steady {steady[name]:7.2f} s"
      f"   compile+trace ~{first[name] - steady[name]:5.2f} s"
    )
  ratio = steady["sequential"] / steady["batched"]
  print(f"speed-up batched / sequential (steady): {ratio:.2f} x")
  print(f"max |batched - sequential| = {agree:.2e}")
  sweep_name = f"resid_pre sweep {LAYERS} layers × {POSITIONS} positions, mid-size"
  rec.figure("batched_s", f"batched {sweep_name}, steady", steady["batched"], "s")
  rec.figure("sequential_s", "one forward per patch, steady", steady["sequential"], "s")
  rec.figure("ratio", "speed-up batched / per patch", ratio, "x", goal=">= 2.5x")
  rec.figure(
    "compile_s",
    "trace + compile of the batched sweep (first − steady)",
    first["batched"] - steady["batched"],
    "s",
    goal="< 5 s",
  )
  rec.figure("max_diff", "max |batched − per patch|", float(agree))
  rec.save()


if __name__ == "__main__":
  main()
