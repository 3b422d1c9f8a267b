"""Per-row sweep vs separate calls: 16 steering scales on the embedded model.

Steering at ``resid_post[2]`` along SAE feature 212's decoder row, 16 scales
(-8 .. 8 times the row), one 8-token prompt, 32 greedy new tokens. Measured
side by side, interleaved, in one run:

* sweep: `gs.sweep` over the 16 scales, one fused generation of 16 rows;
* separate: 16 `gs.generate` calls of one row each (the same compiled
  program for all 16: only the scale leaf changes);

each first call (trace + compile) and the median of ``--runs`` repeats. The
tokens must agree row by row.

Where the time goes (same run, medians): one ``gs.steer`` rewrite (paid 16
times by both sides), ``stack_rows`` of the 16 edited models, and the
generation alone (prebuilt models) for 1 and for 16 rows, as wall time and
as CPU time of this process. ``16 x one row / 16 rows`` of the generation is
what batching itself gains on this machine: the ceiling of the speed-up
once the host-side work is negligible (on a CPU the 16-row decode is
compute-bound, so it costs several single-row decodes). The sweep's host
work beyond its generation is ``sweep - 16-row generation``.

Compute floor (same run, interleaved with the parts above): the
generation's weight matmuls alone (every layer's projections and the
unembedding at the embedded model's shapes, one token per row per step for
prompt + new tokens steps, in one jitted ``lax.scan``; no attention, norms
or sampling), for 1 and for 16 rows. ``generation / bare matmuls`` near 1
means the generation runs at this CPU's matmul speed (compute-bound); the
bare matmuls' own ``16 x 1 row / 16 rows`` is what batching can gain on
this CPU at all.

Run: ``python bench/sweep.py`` (``--runs N``, ``--json F`` for run_all).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import record

import gemma_surgery as gs

PROMPT, NEW = "The cat sat on the mat and", 32
SCALES = [float(s) for s in np.linspace(-8.0, 8.0, 16)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=5)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("sweep", args)
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
  parts = _breakdown(lm, edit, args.runs, sweep)
  print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
  for name in ("sweep", "separate"):
    print(f"{name:9s} first {first[name]:.2f} s, steady {median[name] * 1e3:.0f} ms")
  speedup = median["separate"] / median["sweep"]
  print(f"speed-up sweep / separate (steady): {speedup:.1f}x")
  print(f"tokens identical row by row: {same}")
  for label, value, unit in parts.values():
    print(f"{label}: {value:.1f} {unit}")
  rec.figure(
    "sweep_ms", "gs.sweep, 16 rows in one generation", median["sweep"] * 1e3, "ms"
  )
  rec.figure(
    "separate_ms", "16 separate gs.generate calls", median["separate"] * 1e3, "ms"
  )
  rec.figure("speedup", "speed-up sweep / separate", speedup, "x", goal=">= 8x")
  rec.figure("identical", "tokens identical row by row", same)
  for key, (label, value, unit) in parts.items():
    rec.figure(key, label, value, unit)
  rec.save()


def _breakdown(lm, edit, runs: int, sweep) -> dict[str, tuple[str, float, str]]:
  """Medians of the sweep's parts (see the module doc), interleaved."""
  models = [edit(lm.model, s) for s in SCALES]
  stacked = gs.stack_rows(models)
  one = {"max_new_tokens": NEW, "tokenizer": lm.tokenizer}
  steps = {
    "rewrite": lambda: edit(lm.model, 1.5),
    "stack": lambda: gs.stack_rows(models),
    "rows1": lambda: gs.generate(models[0], [PROMPT], **one),
    "rows16": lambda: gs.generate(stacked, [PROMPT] * 16, **one),
    "sweep": sweep,
    **_bare_matmuls(lm.config, len(lm.tokenizer.encode(PROMPT)) + NEW),
  }
  wall: dict[str, list[float]] = {k: [] for k in steps}
  cpu: dict[str, list[float]] = {k: [] for k in steps}
  for fn in steps.values():
    fn()  # compile
  for _ in range(runs):
    for name, fn in steps.items():
      w, c = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - w)
      cpu[name].append(time.process_time() - c)
  w = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
  c = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
  return {
    "rewrite_ms": ("one gs.steer rewrite", w["rewrite"], "ms"),
    "stack_ms": ("stack_rows of 16 edited models", w["stack"], "ms"),
    "gen1_ms": ("generation, 1 row (prebuilt model)", w["rows1"], "ms"),
    "gen16_ms": ("generation, 16 rows (prebuilt stacked model)", w["rows16"], "ms"),
    "gen1_cpu_ms": ("generation, 1 row, CPU time", c["rows1"], "ms"),
    "gen16_cpu_ms": ("generation, 16 rows, CPU time", c["rows16"], "ms"),
    "batching_gain": (
      "batching gain of the generation, 16 x 1 row / 16 rows (wall)",
      16 * w["rows1"] / w["rows16"],
      "x",
    ),
    "batching_gain_cpu": (
      "batching gain of the generation (CPU time)",
      16 * c["rows1"] / c["rows16"],
      "x",
    ),
    "host_ms": (
      "host work of the sweep beyond its generation (sweep - 16-row generation)",
      w["sweep"] - w["rows16"],
      "ms",
    ),
    "host_cpu_ms": (
      "the same in CPU time",
      c["sweep"] - c["rows16"],
      "ms",
    ),
    "matmul1_ms": ("bare matmuls of the generation, 1 row", w["matmul1"], "ms"),
    "matmul16_ms": ("bare matmuls of the generation, 16 rows", w["matmul16"], "ms"),
    "gen1_over_matmul": (
      "generation / its bare matmuls, 1 row",
      w["rows1"] / w["matmul1"],
      "x",
    ),
    "gen16_over_matmul": (
      "generation / its bare matmuls, 16 rows",
      w["rows16"] / w["matmul16"],
      "x",
    ),
    "gen16_over_matmul_cpu": (
      "generation / its bare matmuls, 16 rows (CPU time)",
      c["rows16"] / c["matmul16"],
      "x",
    ),
    "matmul_batching_gain": (
      "batching gain of the bare matmuls, 16 x 1 row / 16 rows (wall)",
      16 * w["matmul1"] / w["matmul16"],
      "x",
    ),
    "matmul_batching_gain_cpu": (
      "batching gain of the bare matmuls (CPU time)",
      16 * c["matmul1"] / c["matmul16"],
      "x",
    ),
  }


def _bare_matmuls(config, steps: int) -> dict[str, object]:
  """Timed steps ``matmul1``/``matmul16``: the generation's weight matmuls
  alone for 1 and 16 rows (each compiled by its first call).

  Every layer's query/key/value/output projections, gated MLP and the
  unembedding at ``config``'s shapes (random weights), one token per row per
  step for ``steps`` steps in one jitted ``lax.scan``, the next input fed
  back from the argmax (so steps can't be skipped).
  """
  rng = np.random.default_rng(0)
  d, h = config.embedding_dim, config.mlp_hidden_dim
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

  def weight(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)

  layers = [
    {
      "qkv": weight(d, q + 2 * kv),
      "o": weight(q, d),
      "up": weight(d, 2 * h),
      "down": weight(h, d),
    }
    for _ in range(config.num_layers)
  ]
  embed = weight(config.vocab_size, d)

  @jax.jit
  def run(x, layers, embed):
    def step(x, _):
      for w in layers:
        x = x + jnp.tanh((x @ w["qkv"])[:, :q]) @ w["o"]
        up = x @ w["up"]
        x = x + (jax.nn.gelu(up[:, :h]) * up[:, h:]) @ w["down"]
      x = x + embed[jnp.argmax(x @ embed.T, axis=-1)]
      return x, None

    return jax.lax.scan(step, x, None, length=steps)[0]

  def timed(rows):
    x = jnp.asarray(rng.standard_normal((rows, d), np.float32))
    return lambda: run(x, layers, embed).block_until_ready()

  return {"matmul1": timed(1), "matmul16": timed(16)}


if __name__ == "__main__":
  main()
