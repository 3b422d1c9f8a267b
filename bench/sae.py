"""SAE throughput and the cost of a spliced SAE during generation.

1. Encode + decode of 1024 tokens through a Gemma-2-2B-sized SAE (d_model
   2304, width 16384, float32, random weights) vs a plain-numpy
   implementation of the same equations (``f = JumpReLU(x·W_enc + b_enc)``,
   ``x̂ = f·W_dec + b_dec``), medians of interleaved runs: the dense jitted
   `AutoEncoder` and `gemma_surgery.sae.sparse.reconstruct` (exact sparse
   decode). Two firing rates: θ = 2.6 (L0 ≈ 77 of 16384, like Gemma Scope's
   ``average_l0_82``) and θ = 1.28 (L0 ≈ 1640, 10%: the dense fallback).
   Then 8 tokens (a few prompts' last positions, as in generation), where
   the decode is memory-bound and reading ~80 decoder rows per token instead
   of all 16384 pays off. `reconstruct` decodes sparsely when its slots per
   token are a small part of the width, or the batch is small
   (`sparse.decodes_sparsely`), so at L0 ≈ 77 also for 1024 tokens.
   Reported: the largest difference from numpy, and the number of latents
   whose on/off state differs (pre-activations within float32 rounding of θ;
   summation order differs between BLAS libraries).
2. Fused greedy generation (16-token prompt, 64 new tokens) of the mid-size
   config (`configs.MID`) with a random width-4096 SAE spliced at
   ``resid_post`` of layer 4 (with the error term) vs the same model without
   it.

Run: ``python bench/sae.py`` (``--runs N``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import record
from configs import MID
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.sae import AutoEncoder, SAEInfo
from gemma_surgery.sae.sparse import reconstruct


def random_sae(
  d: int, width: int, seed: int = 0, threshold: float = 1.28
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  arrays = {
    "w_enc": rng.normal(size=(d, width)) / np.sqrt(d),
    "w_dec": rng.normal(size=(width, d)) / np.sqrt(width),
    "b_enc": np.zeros(width),
    "b_dec": np.zeros(d),
    "threshold": np.full(width, threshold),  # pre-activations are ~N(0, 1)
  }
  return {k: v.astype(np.float32) for k, v in arrays.items()}


def numpy_encode(x: np.ndarray, a: dict) -> np.ndarray:
  pre = x @ a["w_enc"] + a["b_enc"]
  return np.where(pre > a["threshold"], pre, 0.0)


def numpy_forward(x: np.ndarray, a: dict) -> np.ndarray:
  return numpy_encode(x, a) @ a["w_dec"] + a["b_dec"]


def interleaved_medians(fns: dict, runs: int) -> dict[str, float]:
  """Median seconds of each function, run in turn after one warm-up call each."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(runs):
    for key, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in times.items()}


def throughput(rec, runs: int, threshold: float, n: int = 1024) -> None:
  d, width = 2304, 16384
  arrays = random_sae(d, width, threshold=threshold)
  info = SAEInfo(family="res", layer=0, site="resid_post", d_in=d, width=width)
  sae = pz.freeze_params(AutoEncoder.from_arrays(arrays, info))
  x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
  named = pz.nx.wrap(jnp.asarray(x)).tag("tokens", "embedding")
  dense = jax.jit(lambda s, v: s(v))
  fns = {
    "numpy": lambda: numpy_forward(x, arrays),
    "dense": lambda: jax.block_until_ready(dense(sae, named).data_array),
    "sparse": lambda: jax.block_until_ready(reconstruct(sae, named)[1].data_array),
  }
  t = interleaved_medians(fns, runs)
  ref, ref_f = numpy_forward(x, arrays), numpy_encode(x, arrays)
  feats, sparse_out = reconstruct(sae, named)
  outs = {
    "dense": np.asarray(dense(sae, named).unwrap("tokens", "embedding")),
    "sparse": np.asarray(sparse_out.unwrap("tokens", "embedding")),
  }
  f = np.asarray(feats.unwrap("tokens", "latents"))
  flips = int(((f != 0) != (ref_f != 0)).sum())
  l0 = (ref_f != 0).sum(-1)
  print(
    f"SAE d={d} width={width}, {n} tokens, float32, encode+decode,"
    f" θ={threshold} (L0 mean {l0.mean():.0f}, max {l0.max()}):"
  )
  rows = [("numpy", "numpy                    ")]
  rows += [
    ("dense", "AutoEncoder (jit, dense)"),
    ("sparse", "sparse.reconstruct      "),
  ]
  for key, label in rows:
    line = f"  {label}  {t[key] * 1e3:8.1f} ms  {n / t[key]:8.0f} tok/s"
    if key != "numpy":
      diff = np.abs(outs[key] - ref).max()
      line += f"  {t['numpy'] / t[key]:.2f} x numpy; max |diff| {diff:.1e}"
    print(line)
  print(f"  latents on/off differently from numpy: {flips} of {f.size}")
  case = f"{n} tokens, L0 {l0.mean():.0f}"
  goal = ">= 1.5x" if n == 1024 and threshold > 2 else None
  for key in ("dense", "sparse"):
    name = "`AutoEncoder` (dense jit)" if key == "dense" else "`sparse.reconstruct`"
    rec.figure(
      f"{key}_{n}_{threshold}",
      f"{name} / numpy, {case}",
      t["numpy"] / t[key],
      "x",
      goal=goal,
    )
  rec.figure(f"flips_{n}_{threshold}", f"latents on/off unlike numpy, {case}", flips)


def generation(rec, runs: int) -> None:
  model = gs.build_model(MID, jax.random.key(0))
  info = SAEInfo(family="res", layer=4, site="resid_post", d_in=512, width=4096)
  sae = AutoEncoder.from_arrays(random_sae(512, 4096), info)
  spliced = gs.sae.splice_sae(model, sae, use_error_term=True)
  prompt = (
    np.random.default_rng(0).integers(3, MID.vocab_size, (1, 16)).astype(np.int32)
  )
  prompt[0, 0] = 2
  runs_of = {
    "plain": lambda: gs.generate(model, prompt, max_new_tokens=64).tokens,
    "spliced": lambda: gs.generate(spliced, prompt, max_new_tokens=64).tokens,
  }
  t = interleaved_medians(runs_of, runs)
  print("Fused generation, mid-size config, 64 new tokens:")
  print(
    f"  unpatched            {t['plain'] * 1e3:8.1f} ms  {64 / t['plain']:6.1f} tok/s"
  )
  print(
    f"  SAE (4096) spliced   {t['spliced'] * 1e3:8.1f} ms"
    f"  {64 / t['spliced']:6.1f} tok/s"
  )
  print(f"  overhead {(t['spliced'] / t['plain'] - 1) * 100:.1f} %")
  rec.figure(
    "splice_overhead",
    "spliced SAE (width 4096) generation overhead, mid-size",
    (t["spliced"] / t["plain"] - 1) * 100,
    "%",
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("sae", args)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
  throughput(rec, args.runs, threshold=2.6)
  throughput(rec, args.runs, threshold=1.28)
  throughput(rec, args.runs, threshold=2.6, n=8)
  generation(rec, args.runs)
  rec.save()


if __name__ == "__main__":
  main()
