"""Fused generation vs Penzai's Python loop, loop efficiency, surgery overhead.

Two configs, float32, batch 1, a 16-token prompt and 64 new greedy tokens:

* ``tiny``: the Gemma 2 test fixture (``tests/fixtures/hf/gemma2``: 4 layers,
  d_model 64, 4 query / 2 KV heads, window 8, vocab 512);
* ``mid``: a random Gemma 2 architecture with 8 layers, d_model 512, 8 query
  / 4 KV heads, head_dim 64, MLP 2048, vocab 32 000, window 256 alternating
  with global, soft caps 50/30.

Measured side by side in one run (medians after a warm-up call):

1. ``gs.generate`` on a model with a steering layer after the middle block vs
   Penzai's ``temperature_sample_pyloop`` (body jitted with
   ``penzai.toolshed.jit_wrapper.Jitted``, temperature 1e-6) on the same
   patched model. The pyloop's KV-cache conversion is done before its timer
   starts; ``gs.generate`` is timed as a user calls it.
2. Loop efficiency: that fused call vs ``prefill + 64 × one decode step``,
   each a separately jitted call on the same converted model (median of many
   calls, blocking on each).
3. Surgery overhead: fused generation with the steering layer plus a capture
   of ``resid_post`` at every layer (recording all 80 positions) vs the
   unpatched model.

Run: ``python bench/generation.py`` (``--runs N`` to change the repeats).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from configs import MID, TINY_FIXTURE
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
from penzai.toolshed import jit_wrapper

import gemma_surgery as gs
from gemma_surgery.generation import decoding

PROMPT, NEW = 16, 64
FIXTURE = TINY_FIXTURE


def median_time(fn, runs: int) -> float:
  """Median wall time of ``fn()`` (which must block) over ``runs`` calls."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.partial(jax.jit, static_argnames=("structure", "state_index"))
def _one_call(structure, leaves, state_index, state, tokens):
  """One KV-cached model call (prefill or one decode step) + argmax."""
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  values = list(values)
  for i, value in zip(state_index, state, strict=True):
    values[i] = value.unfreeze_as_copy()
  logits = pz.bind_variables(unbound, values)(pz.nx.wrap(tokens).tag("batch", "seq"))
  nxt = logits[{"seq": -1}].unwrap("batch", "vocabulary").argmax(-1)
  return nxt[:, None].astype(jnp.int32), [values[i].freeze() for i in state_index]


def step_reference(model, prompt: np.ndarray):
  """A function running prefill + ``NEW`` decode steps as separate jitted calls.

  Each call blocks before the next one starts, so the total is ``prefill +
  NEW × one decode step`` measured directly.
  """
  prepared, leaves = decoding.prepare(model, 1, PROMPT + NEW, None, None)
  _, values = jax.tree_util.tree_unflatten(prepared.structure.treedef, leaves)
  index = tuple(i for i, v in enumerate(values) if isinstance(v, pz.StateVariableValue))
  state0 = [values[i] for i in index]
  call = functools.partial(_one_call, prepared.structure, leaves, index)
  times = {"prefill": [], "step": []}

  def run():
    start = time.perf_counter()
    token, state = jax.block_until_ready(call(state0, prompt))
    times["prefill"].append(time.perf_counter() - start)
    for _ in range(NEW):
      start = time.perf_counter()
      token, state = jax.block_until_ready(call(state, token))
      times["step"].append(time.perf_counter() - start)
    return token

  return run, times


def pyloop_time(model, prompt: np.ndarray, runs: int) -> tuple[float, np.ndarray]:
  """Median time of Penzai's Python sampling loop (conversion not timed)."""
  named = pz.nx.wrap(jnp.asarray(prompt)).tag("batch", "seq")
  times, out = [], None
  for _ in range(runs + 1):
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(
      model, cache_len=PROMPT + NEW, batch_axes={"batch": 1}, pad_id=-1
    )
    sampler = pz.select(cached).at(lambda c: c.body).apply(jit_wrapper.Jitted)
    start = time.perf_counter()
    out = simple_decoding_loop.temperature_sample_pyloop(
      sampler,
      prompt=named,
      rng=jax.random.key(0),
      temperature=1e-6,
      max_sampling_steps=NEW,
    )
    out = np.asarray(out.unwrap("batch", "seq"))
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:]), out


def bench(name: str, model, runs: int) -> None:
  layers = gs.sites.num_layers(model)
  vocab = model.metadata.vocab_size
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, vocab, (1, PROMPT)).astype(np.int32)
  prompt[:, 0] = 2
  direction = rng.standard_normal(model.metadata.embedding_dim).astype(np.float32)
  vector = pz.nx.wrap(jnp.asarray(direction)).tag("embedding")
  steered = gs.steer(model, "resid_post", layers // 2, vector, 0.5)
  full, _ = gs.capture(steered, "resid_post")

  def fused(m):
    return lambda: gs.generate(m, prompt, max_new_tokens=NEW).tokens

  reference, parts = step_reference(steered, prompt)
  timed = {
    "steered": fused(steered),
    "plain": fused(model),
    "full": fused(full),
    "reference": reference,
  }
  for fn in timed.values():
    fn()  # compile
  parts["prefill"].clear()
  parts["step"].clear()
  times = {key: [] for key in timed}
  for _ in range(runs):  # interleaved, so drifts of a noisy machine cancel
    for key, fn in timed.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  t = {key: statistics.median(v) for key, v in times.items()}
  t_steered, t_plain, t_full, t_ref = (
    t["steered"],
    t["plain"],
    t["full"],
    t["reference"],
  )
  t_prefill = statistics.median(parts["prefill"])
  t_step = statistics.median(parts["step"])
  ours = fused(steered)()
  t_py, theirs = pyloop_time(steered, prompt, max(3, runs // 3))

  print(f"\n== {name}: {layers} layers, d_model {model.metadata.embedding_dim}")
  rows = [
    (
      "fused generate, steered",
      f"{t_steered * 1e3:9.2f} ms",
      f"{NEW / t_steered:7.0f} tok/s",
    ),
    (
      "penzai pyloop (Jitted body), steered",
      f"{t_py * 1e3:9.2f} ms",
      f"{NEW / t_py:7.0f} tok/s",
    ),
    ("  speed-up fused / pyloop", f"{t_py / t_steered:9.1f} x", ""),
    ("  same tokens", f"{bool((ours == theirs).all())!s:>9}", ""),
    ("jitted prefill (16 tokens)", f"{t_prefill * 1e3:9.2f} ms", ""),
    ("jitted single decode step (median)", f"{t_step * 1e3:9.3f} ms", ""),
    (f"prefill + {NEW} x step (one run)", f"{t_ref * 1e3:9.2f} ms", ""),
    ("  loop efficiency fused / reference", f"{t_steered / t_ref:9.3f}", ""),
    ("fused generate, unpatched", f"{t_plain * 1e3:9.2f} ms", ""),
    ("fused, steer + capture every layer", f"{t_full * 1e3:9.2f} ms", ""),
    ("  surgery overhead", f"{(t_full / t_plain - 1) * 100:8.1f} %", ""),
  ]
  for label, value, extra in rows:
    print(f"{label:<40}{value} {extra}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=9)
  args = parser.parse_args()
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}; batch 1, prompt"
    f" {PROMPT}, {NEW} new tokens, greedy, float32"
  )
  tiny = gs.load(FIXTURE, dtype="float32", progress=False).model
  bench("tiny (tests/fixtures/hf/gemma2)", tiny, args.runs)
  mid = gs.build_model(MID, jax.random.key(0))
  bench("mid-size Gemma 2", mid, args.runs)


if __name__ == "__main__":
  main()
