"""Gemma 4 generation: fused loop vs Penzai's Python loop vs transformers.

Two random mid-size Gemma 4 architectures, written by `transformers` and
loaded by `gs.load` (so all three run the same weights), float32, a 16-token
prompt and 32 new greedy tokens, batch 1 and 8:

* ``dense``: 8 layers (3 local : 1 global, window 64), d_model 512, 8 query /
  4 kv heads of 64 (128 on global layers), MLP 2048 (double-wide on the 3
  KV-shared last layers), per-layer embeddings of 64, vocab 32 000;
* ``moe``: the same attention, no KV sharing or per-layer embeddings, k = v
  on global layers, a dense MLP of 512 beside 8 experts of 512, top 2.

Per setting, interleaved (one call of each per round, medians over rounds
after a warm-up): ``gs.generate`` (fused KV-cached loop); Penzai's
``temperature_sample_pyloop`` on the `kv_caching_lm` conversion with its body
jitted (a fresh conversion before each run, not timed); ``transformers``
``generate`` (greedy, eager attention, torch threads as configured). Prints
seconds, ratios and whether all three give the same tokens.

Run: ``python bench/gemma4_generation.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import record
from penzai import pz
from penzai.models.transformer import simple_decoding_loop
from penzai.toolshed import jit_wrapper

import gemma_surgery as gs
from gemma_surgery.model import caching

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import gemma4 as g4  # noqa: E402

PROMPT, NEW = 16, 32
COMMON = dict(
  vocab_size=32_000,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=8,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=64,
  global_head_dim=128,
  sliding_window=64,
  layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
  final_logit_softcapping=30.0,
)
CONFIGS = {
  "dense": dict(
    COMMON,
    num_kv_shared_layers=3,
    use_double_wide_mlp=True,
    hidden_size_per_layer_input=64,
    vocab_size_per_layer_input=32_000,
  ),
  "moe": dict(
    COMMON,
    intermediate_size=512,
    hidden_size_per_layer_input=0,
    attention_k_eq_v=True,
    num_global_key_value_heads=2,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=512,
  ),
}


def pyloop(model, prompt: np.ndarray):
  """Penzai's Python loop: ``(setup, run)``. The converted model carries its
  KV cache as state, so each run needs a fresh conversion (``setup``, not
  timed); reusing one would find the cache full and stop after the prefill."""
  named = pz.nx.wrap(jnp.asarray(prompt)).tag("batch", "seq")
  box = {}

  def setup():
    cached = caching.kv_caching_lm(
      model, cache_len=PROMPT + NEW, batch_axes={"batch": prompt.shape[0]}, pad_id=-1
    )
    box["sampler"] = pz.select(cached).at(lambda c: c.body).apply(jit_wrapper.Jitted)

  def run():
    out = simple_decoding_loop.temperature_sample_pyloop(
      box["sampler"],
      prompt=named,
      rng=jax.random.key(0),
      temperature=1e-6,
      max_sampling_steps=NEW,
    )
    return np.asarray(out.unwrap("batch", "seq"))

  return setup, run


def bench(rec, name: str, rounds: int) -> None:
  with tempfile.TemporaryDirectory() as directory:
    reference = g4.write_checkpoint(directory, **CONFIGS[name])
    model = gs.load(directory, dtype="float32", progress=False).model
  for batch in (1, 8):
    prompt = np.random.default_rng(batch).integers(3, 32_000, (batch, PROMPT))
    prompt[:, 0] = 2
    prompt = prompt.astype(np.int32)
    py_setup, py_run = pyloop(model, prompt)
    calls = {
      "fused": lambda p=prompt: gs.generate(model, p, max_new_tokens=NEW).tokens,
      "pyloop": py_run,
      "transformers": lambda p=prompt: g4.torch_greedy(reference, p, NEW),
    }
    setups = {"pyloop": py_setup}
    times = {k: [] for k in calls}
    outputs = {}
    for k, fn in calls.items():  # warm-up (compiles)
      setups.get(k, lambda: None)()
      outputs[k] = np.asarray(fn())[:, -NEW:]
    same = all(np.array_equal(outputs["fused"], o) for o in outputs.values())
    for _ in range(rounds):
      for k, fn in calls.items():
        setups.get(k, lambda: None)()
        start = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
      f"{name} batch {batch}: fused {med['fused']:.3f} s, pyloop"
      f" {med['pyloop']:.3f} s ({med['pyloop'] / med['fused']:.1f}x),"
      f" transformers {med['transformers']:.3f} s"
      f" ({med['transformers'] / med['fused']:.1f}x); same tokens {same}"
    )
    key = f"{name}_b{batch}"
    rec.figure(
      f"{key}_fused",
      f"{name}, batch {batch}: fused `gs.generate`, {NEW} tokens",
      med["fused"] * 1e3,
      "ms",
    )
    rec.figure(
      f"{key}_pyloop",
      f"{name}, batch {batch}: Penzai pyloop / fused",
      med["pyloop"] / med["fused"],
      "x",
    )
    rec.figure(f"{key}_same", f"{name}, batch {batch}: same tokens, all three", same)
    rec.figure(
      f"{key}_transformers",
      f"{name}, batch {batch}: transformers generate / fused",
      med["transformers"] / med["fused"],
      "x",
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("gemma4_generation", args)
  print(f"load average {os.getloadavg()}, {jax.devices()[0].platform}")
  for name in CONFIGS:
    bench(rec, name, args.rounds)
  rec.save()


if __name__ == "__main__":
  main()
