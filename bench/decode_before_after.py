"""Decode step with `model.decode_layers` vs with the Penzai layers they replace.

Mid config (`configs.MID`, float32), a 16-token prompt, greedy, the fused
loop (`decoding.decode`, called directly on a fresh `decoding.Prepared`).
``before`` converts the model as before issue 19: the KV-caching conversion's
result with `decode_layers.InPlaceKVCachingAttention`,
`decode_layers.SingleQueryEinsum` and `decode_layers.SingleTokenEmbeddingDecode`
turned back into Penzai's ``KVCachingAttention`` (cache ``seq`` axis last),
``NamedEinsum`` and ``EmbeddingDecode``, and greedy decoding with
``jnp.argmax``; ``after`` is the library as it is; ``ideal`` the chain of
matvecs of ``bench/decode_step.py``. Step times as there: ``(t(64 new) -
t(16 new)) / 48``, interleaved rounds, median and min. Also checks that both
give the same tokens and how far their logits are apart.

Run: ``python bench/decode_before_after.py [--batch B] [--runs N]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from configs import MID
from decode_step import LONG, SHORT, ideal_loop, matrices
from generation import greedy_controls, prompt_for
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding, inputs, sampling
from gemma_surgery.model import caching, decode_layers


def penzai_attention(layer: decode_layers.InPlaceKVCachingAttention):
  fields = {
    f.name: getattr(layer, f.name)
    for f in dataclasses.fields(layer)
    if f.name != "kv_cache"
  }
  seq = layer.sequence_axis
  cache = tuple(
    a.order_as(*(n for n in a.named_shape if n != seq), seq)
    for a in layer.kv_cache.value
  )
  variable = pz.StateVariable(value=cache, label=layer.kv_cache.label)
  return pz.nn.KVCachingAttention(kv_cache=variable, **fields)


def penzai_layers(cached):
  """The conversion's result with Penzai's layers back in place."""
  replace = (
    (
      decode_layers.SingleQueryEinsum,
      lambda e: pz.nn.NamedEinsum(e.input_axes, e.output_axes),
    ),
    (decode_layers.InPlaceKVCachingAttention, penzai_attention),
    (
      decode_layers.SingleTokenEmbeddingDecode,
      lambda d: pz.nn.EmbeddingDecode(d.table),
    ),
  )
  for kind, back in replace:
    cached = pz.select(cached).at_instances_of(kind).apply(back)
  return cached


def loop(model, prompt: np.ndarray, before: bool):
  """``n -> blocking call`` of the fused loop for ``n`` new tokens."""
  convert, choose = caching.kv_caching_lm, sampling.argmax
  if before:
    caching.kv_caching_lm = lambda *a, **k: penzai_layers(convert(*a, **k))
    sampling.argmax = lambda x: jnp.argmax(x, axis=-1)
  try:
    prepared = decoding.Prepared(model, prompt.shape[0], prompt.shape[1] + LONG)
    compiled = {}
    lengths = (prompt != inputs.PAD_MARK).sum(axis=1).astype(np.int32)
    controls = greedy_controls(MID.vocab_size)
    args = (prepared.leaves, prompt, lengths, controls, jax.random.key(0))
    for n in (LONG, SHORT):
      compiled[n] = decoding.decode.lower(
        prepared.structure,
        *args,
        max_new_tokens=n,
        mode=sampling.SamplingMode(greedy=True),
        return_logits=True,
      ).compile()
  finally:
    caching.kv_caching_lm, sampling.argmax = convert, choose
  return lambda n: jax.block_until_ready(compiled[n](*args))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--runs", type=int, default=11)
  args = parser.parse_args()
  model = gs.build_model(MID, jax.random.key(0))
  prompt = prompt_for(model, args.batch)
  layers, emb = matrices(model)
  x = jnp.ones((args.batch, MID.embedding_dim), jnp.float32)
  ideal = {n: ideal_loop(n) for n in (LONG, SHORT)}
  runs = {
    "before": loop(model, prompt, before=True),
    "after": loop(model, prompt, before=False),
    "ideal": lambda n: jax.block_until_ready(ideal[n](x, layers, emb)),
  }
  outs = {name: runs[name](LONG) for name in ("before", "after")}
  runs["ideal"](LONG)
  same = bool((outs["before"]["tokens"] == outs["after"]["tokens"]).all())
  diff = float(jnp.abs(outs["before"]["logits"] - outs["after"]["logits"]).max())
  times = collections.defaultdict(list)
  for _ in range(args.runs):
    for name, run in runs.items():
      for n in (LONG, SHORT):
        start = time.perf_counter()
        run(n)
        times[name, n].append(time.perf_counter() - start)
  print(f"batch {args.batch}: same tokens {same}, max logit difference {diff:.1e}")
  for name in runs:
    steps = [
      (stat(times[name, LONG]) - stat(times[name, SHORT])) / (LONG - SHORT)
      for stat in (statistics.median, min)
    ]
    print(
      f"  {name:6s} step median {steps[0] * 1e3:6.2f} ms, min {steps[1] * 1e3:6.2f} ms"
    )


if __name__ == "__main__":
  main()
