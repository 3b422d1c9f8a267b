"""Forward pass with captures vs a plain forward, and Penzai's ``Jitted``.

Mid-size Gemma 2 architecture (`configs.MID`), random float32 weights, one
forward of ``batch x seq`` tokens (default 1 x 64), medians of interleaved
calls measured side by side in one run:

1. ``gs.jit_forward(model)``: parameters frozen once, compiled once;
2. ``gs.jit_forward`` on the model with a `SaveIntermediate` at every
   ``resid_post`` (the captures are written back after every call) — the
   capture overhead is the ratio of 2 to 1 (target <= 10%);
3. Penzai's ``jit_wrapper.Jitted`` around the same captured model, which
   threads every mutable parameter through each call (the cost `jit_forward`
   avoids).

Run: ``python bench/forward_capture.py`` (``--runs``, ``--batch``, ``--seq``).
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
from penzai.toolshed import jit_wrapper

import gemma_surgery as gs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=30)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=64)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("forward_capture", args)
  model = gs.build_model(MID, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, MID.vocab_size, (args.batch, args.seq)).astype(np.int32)
  ids[:, 0] = 2
  tokens = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
  captured, acts = gs.capture(model, "resid_post")
  penzai_jitted = jit_wrapper.Jitted(captured)

  def block(fn):
    return lambda: jax.block_until_ready(fn(tokens).data_array)

  timed = {
    "plain": block(gs.jit_forward(model)),
    "capture": block(gs.jit_forward(captured)),
    "penzai": block(penzai_jitted),
  }
  for fn in timed.values():
    fn()  # compile
  times = {key: [] for key in timed}
  for _ in range(args.runs):  # interleaved, so drifts of a noisy machine cancel
    for key, fn in timed.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  t = {key: statistics.median(v) for key, v in times.items()}
  assert acts.stacked("resid_post").named_shape["layer"] == MID.num_layers
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}; mid-size Gemma 2"
    f" (8 layers, d_model 512), float32, {args.batch} x {args.seq} tokens,"
    f" median of {args.runs}"
  )
  rows = [
    ("jit_forward, plain", f"{t['plain'] * 1e3:8.2f} ms"),
    ("jit_forward, capture every resid_post", f"{t['capture'] * 1e3:8.2f} ms"),
    ("  capture overhead", f"{(t['capture'] / t['plain'] - 1) * 100:7.1f} %"),
    ("penzai Jitted, capture every resid_post", f"{t['penzai'] * 1e3:8.2f} ms"),
    ("  penzai Jitted / jit_forward (capture)", f"{t['penzai'] / t['capture']:8.2f} x"),
  ]
  for label, value in rows:
    print(f"{label:<42}{value}")
  shape = f"mid-size, {args.batch} × {args.seq} tokens"
  rec.figure("plain_ms", f"jit_forward, {shape}", t["plain"] * 1e3, "ms")
  rec.figure(
    "capture_overhead",
    "capture overhead (every resid_post)",
    (t["capture"] / t["plain"] - 1) * 100,
    "%",
    goal="<= 10 %",
  )
  rec.figure(
    "penzai_ratio", "Penzai `Jitted` / `jit_forward`", t["penzai"] / t["capture"], "x"
  )
  rec.save()


if __name__ == "__main__":
  main()
