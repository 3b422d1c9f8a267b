"""Attribution-graph time for a 64-token prompt.

1. The embedded model with its shipped transcoders (and CLT): the prompt is
   BOS + a 32-token random span + its first 31 tokens again (an induction
   prompt). Timed: building the replacement (one recorded clean run), and
   the graph (all active features + the top logits as targets, one vmapped
   backward pass per 128 targets, edges by decoder dot products on the
   device), the first
   call (compiles included) and a second call on another prompt of the same
   length (compiled).
2. The mid-size config (`configs.MID`, random weights; Gemma 2, so its final
   logit soft cap is linearized at the prompt) with random transcoders of
   width 2048 (θ set so that ~30 latents fire per token), the graph capped
   at the 2048 most active features (``max_feature_nodes``), then with every
   active feature (~14 000 nodes; skipped with ``--no-uncapped``).

circuit-tracer runs in `circuit_tracer_parity.py` (its own venv). Run: ``python
bench/circuits.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import record
from configs import MID

import gemma_surgery as gs
from gemma_surgery.circuits.graph import attribute_replacement
from gemma_surgery.circuits.replacement import replacement_model
from gemma_surgery.sae.autoencoders import SAEInfo, Transcoder
from gemma_surgery.sae.clt import TranscoderSet


def prompt(seed: int, vocab: int, first: int = 262):
  span = np.random.default_rng(seed).integers(first, vocab, 32).tolist()
  return gs.named_tokens([[2, *span, *span[:31]]])


def timed(model, dictionary, tokens, cap=None) -> tuple[float, float, int]:
  start = time.perf_counter()
  rep = replacement_model(model, dictionary, tokens)
  mid = time.perf_counter()
  graph = attribute_replacement(rep, progress=False, max_feature_nodes=cap)
  end = time.perf_counter()
  return mid - start, end - mid, graph.n_features


def random_transcoders(
  d: int, n: int, width: int, seed: int = 0, threshold: float = 2.2
) -> TranscoderSet:
  rng = np.random.default_rng(seed)
  tcs = []
  for i in range(n):
    arrays = dict(
      w_enc=(rng.normal(size=(d, width)) / np.sqrt(d)).astype(np.float32),
      b_enc=np.zeros(width, np.float32),
      w_dec=(rng.normal(size=(width, d)) / np.sqrt(width)).astype(np.float32),
      b_dec=np.zeros(d, np.float32),
      threshold=np.full(width, threshold, np.float32),
    )
    info = SAEInfo("transcoder", i, "mlp.in", d, width, "mlp.out", d, source=f"r{i}")
    tcs.append(Transcoder.from_arrays(arrays, info))
  return TranscoderSet.of(tcs, source="random")


def report(rec, key: str, name: str, model, dictionary, vocab: int, cap=None) -> None:
  first = timed(model, dictionary, prompt(0, vocab), cap)
  again = timed(model, dictionary, prompt(1, vocab), cap)
  print(
    f"{name}: {first[2]} / {again[2]} active features;"
    f" replacement {first[0]:.2f}s first, {again[0]:.2f}s again;"
    f" graph {first[1]:.2f}s first, {again[1]:.2f}s again"
  )
  rec.figure(f"{key}_features", f"{name}: feature nodes", first[2])
  for label, index in (("replacement", 0), ("graph", 1)):
    rec.figure(f"{key}_{label}_first", f"{name}: {label}, first", first[index], "s")
    rec.figure(
      f"{key}_{label}_again",
      f"{name}: {label}, another prompt of the same length",
      again[index],
      "s",
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mid-only", action="store_true")
  parser.add_argument("--no-uncapped", action="store_true")
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("circuits", args)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, load {os.getloadavg()}")
  lm = gs.load("tiny")
  if not args.mid_only:
    transcoders = gs.sae.load_transcoders("tiny")
    report(rec, "tiny_tc", "tiny + transcoders", lm.model, transcoders, 4096)
    report(rec, "tiny_clt", "tiny + CLT", lm.model, gs.sae.load_clt("tiny"), 4096)
  mid = gs.build_model(MID, init_base_rng=jax.random.key(0))
  tcs = random_transcoders(MID.embedding_dim, MID.num_layers, 2048)
  name = "mid-size + random transcoders 8 × 2048"
  report(rec, "mid_capped", f"{name}, 2048 nodes", mid, tcs, MID.vocab_size, 2048)
  if not args.no_uncapped:
    report(rec, "mid_all", f"{name}, every feature", mid, tcs, MID.vocab_size)
  print(f"load after: {os.getloadavg()}")
  rec.save()


if __name__ == "__main__":
  main()
