"""Per-row sweep vs separate calls: 16 steering scales on the embedded model.

Steering at ``resid_post[2]`` along SAE feature 212's decoder row, 16 scales
(-8 .. 8 times the row), one 8-token prompt, 32 greedy new tokens. Measured
side by side, interleaved, in one run:

* sweep: `gs.sweep` over the 16 scales, one fused generation of 16 rows;
* separate: 16 `gs.generate` calls of one row each (the same compiled
  program for all 16: only the scale leaf changes);

each first call (trace + compile) and the median of ``--runs`` repeats. The
tokens must agree row by row.

Run: ``python bench/sweep.py`` (``--runs N``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import gemma_surgery as gs

PROMPT, NEW = "The cat sat on the mat and", 32
SCALES = [float(s) for s in np.linspace(-8.0, 8.0, 16)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args()
  lm = gs.load("tiny", progress=False)
  sae = gs.sae.load_sae("tiny")
  vector = gs.sae.feature_direction(sae, 212)

  def edit(model, scale):
    return gs.steer(model, "resid_post", 2, vector, scale)

  def sweep():
    out = gs.sweep(
      lm.model,
      edit,
      [PROMPT],
      grid={"scale": SCALES},
      max_new_tokens=NEW,
      tokenizer=lm.tokenizer,
    )
    return out.tokens[:, 0]

  def separate():
    return np.stack(
      [
        gs.generate(
          edit(lm.model, s), [PROMPT], max_new_tokens=NEW, tokenizer=lm.tokenizer
        ).tokens[0]
        for s in SCALES
      ]
    )

  load_before = os.getloadavg()
  first, times, results = {}, {"sweep": [], "separate": []}, {}
  for name, fn in (("sweep", sweep), ("separate", separate)):
    start = time.perf_counter()
    results[name] = fn()
    first[name] = time.perf_counter() - start
  for _ in range(args.runs):  # interleaved
    for name, fn in (("sweep", sweep), ("separate", separate)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  same = bool((results["sweep"] == results["separate"]).all())
  median = {k: statistics.median(v) for k, v in times.items()}
  print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
  for name in ("sweep", "separate"):
    print(f"{name:9s} first {first[name]:.2f} s, steady {median[name] * 1e3:.0f} ms")
  print(
    f"speed-up sweep / separate (steady): {median['separate'] / median['sweep']:.1f}x"
  )
  print(f"tokens identical row by row: {same}")


if __name__ == "__main__":
  main()
