"""Attribution patching (AtP) vs our exact batched patching sweep.

Mid-size Gemma 2 architecture (`configs.MID`), random float32 weights, a
clean and a corrupted 64-token prompt (one token changed), metric = logit
difference at the last position. Measured side by side in one run,
interleaved, medians of ``--runs`` repeats after a first (compiling) call:

* exact: `gs.analysis.patching_sweep` over ``resid_pre`` (8 layers × 64
  positions = 512 patches, 64 per jitted forward) plus ``attn.z`` by head
  (8 × 8 = 64 patches);
* AtP: `gs.analysis.attribution_patching` of the same two sweeps, plus
  ``attn.z`` by head *and* position (8 × 64 × 8 = 4096 estimates, which the
  exact sweep would need 4096 patched forwards for);
* one forward: a jitted forward of the clean and the corrupted prompt (batch
  2), the unit of "forward-equivalents".

Run: ``python bench/attribution.py`` (``--runs N``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import record
from configs import MID

import gemma_surgery as gs

LAYERS, POSITIONS = 8, 64
CORRECT, WRONG = 11, 12


def prompts() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  clean = rng.integers(3, MID.vocab_size, (1, POSITIONS)).astype(np.int32)
  clean[0, 0] = 2
  corrupted = clean.copy()
  corrupted[0, 17] = (clean[0, 17] + 17) % MID.vocab_size
  return clean, corrupted


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("attribution", args)
  model = gs.build_model(MID, jax.random.key(0))
  clean, corrupted = prompts()
  an = gs.analysis
  metric = an.logit_difference(CORRECT, WRONG)
  both = gs.named_tokens(np.concatenate([clean, corrupted]))
  forward = gs.jit_forward(model)

  def exact():
    return [
      an.patching_sweep(
        model,
        clean,
        corrupted,
        metric,
        site=site,
        by=by,
        chunk_size=64,
        progress=False,
      )
      for site, by in (("resid_pre", "position"), ("attn.z", "head"))
    ]

  def atp():
    return [
      an.attribution_patching(model, clean, corrupted, metric, site=site, by=by)
      for site, by in (("resid_pre", "position"), ("attn.z", "head"))
    ]

  def atp_all():
    return an.attribution_patching(
      model, clean, corrupted, metric, site="attn.z", by="head_position"
    )

  def one_forward():
    return jax.block_until_ready(forward(both))

  jobs = {
    "exact": exact,
    "atp": atp,
    "atp_heads_positions": atp_all,
    "forward": one_forward,
  }
  first, times, out = {}, {k: [] for k in jobs}, {}
  for name, job in jobs.items():
    start = time.perf_counter()
    out[name] = job()
    first[name] = time.perf_counter() - start
  for _ in range(args.runs):
    for name, job in jobs.items():
      start = time.perf_counter()
      job()
      times[name].append(time.perf_counter() - start)
  steady = {k: statistics.median(v) for k, v in times.items()}
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}; mid-size Gemma 2, float32,"
    f" {LAYERS} layers x {POSITIONS} positions; load {os.getloadavg()[0]:.2f}"
  )
  for name in jobs:
    print(f"{name:<20} first call {first[name]:7.2f} s   steady {steady[name]:7.3f} s")
  print(
    f"speed-up AtP / exact (same two sweeps): {steady['exact'] / steady['atp']:.1f} x"
  )
  print(
    "AtP cost in forward-equivalents (batch-2 forward): resid_pre + attn.z"
    f" {steady['atp'] / steady['forward'] / 2:.1f} per sweep; heads x positions"
    f" {steady['atp_heads_positions'] / steady['forward']:.1f}"
  )
  for name in jobs:
    rec.figure(f"{name}_s", f"{name}: steady time", steady[name], "s")
  rec.figure(
    "speedup",
    f"AtP / exact sweep, resid_pre ({LAYERS} x {POSITIONS}) + attn.z by head",
    steady["exact"] / steady["atp"],
    "x",
    goal=">= 20x",
  )
  rec.figure(
    "forward_equivalents",
    "AtP cost per sweep in forward-equivalents (batch-2 forward)",
    steady["atp"] / steady["forward"] / 2,
    goal="<= 3",
  )
  rec.figure(
    "heads_positions_forward_equivalents",
    "AtP over attn.z heads x positions, in forward-equivalents",
    steady["atp_heads_positions"] / steady["forward"],
  )
  for est, ex in zip(out["atp"], out["exact"], strict=True):
    agree = est.agreement(ex)
    print(
      f"{est.site} by {est.by}: Spearman {agree['spearman']:.3f} (changed pieces"
      f" only {agree['spearman_changed']:.3f}), exact top 5 in AtP top 10:"
      f" {agree['top_k_recall']:.0%}"
    )
    key = f"{est.site}_{est.by}"
    rec.figure(
      f"{key}_spearman",
      f"{est.site} by {est.by}: Spearman AtP vs exact",
      agree["spearman"],
    )
    rec.figure(
      f"{key}_recall",
      f"{est.site} by {est.by}: exact top 5 in AtP top 10",
      agree["top_k_recall"],
    )
  rec.save()


if __name__ == "__main__":
  main()
