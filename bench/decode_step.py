"""One decode step of the fused loop vs an ideal chain of matvecs, side by side.

Mid config (`configs.MID`, float32), a 16-token prompt, greedy. Four figures,
measured in interleaved rounds (medians, after a warm-up call), each a
``(t(64 new) - t(16 new)) / 48`` step time like ``bench/generation.py``:

* ``ours``: ``gs.generate`` on the plain model;
* ``ideal``: the same weights (every projection, MLP matrix and the tied
  unembedding) as a chain of matrix-vector products inside one jitted
  ``fori_loop``, nothing else (no norms, attention, argmax): the least a
  step can cost on this machine with XLA's dots;
* ``fused_ideal``: the ideal chain with q|k|v and gate|up each one matrix
  (4 dots per layer instead of 7): what a model storing fused projections
  could reach at best;
* ``floor``: the bytes a step reads over the bandwidth of a jitted 256 MiB
  matvec (as in ``bench/generation.py``).

Prefill memory (compiled, not timed): the fused loop's temporaries for a
512-token prompt on the mid config at a 256k vocabulary, as XLA's memory
analysis gives them, for the plain model (the prompt's logits are computed
for its last position only) and with a zero steering vector at ``logits``
(something observes them: every position's logits, 500 MiB per row).

``--profile`` also records one ``gs.generate`` call with ``jax.profiler`` and
prints the time per step of each kind of XLA thunk (the dots, the attention
fusions, copies, the argmax...), from the trace's ``trace.json.gz``.

Run: ``python bench/decode_step.py [--batch B ...] [--runs N] [--profile]``
(batches 1 and 4 by default).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import record
from configs import MID
from generation import bandwidth, greedy_controls, prompt_for, step_bytes
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding, sampling

PROMPT, LONG, SHORT = 16, 64, 16


def matrices(model) -> tuple[list[list[jax.Array]], jax.Array]:
  """Per layer the 2-D ``[in, out]`` weights in call order, and the embedding."""
  params = {
    p.label: p.value.unwrap(*p.value.named_shape) for p in pz.unbind_params(model)[1]
  }
  names = ("query", "key", "value", "output")
  mlp = ("gating_linear", "value_linear", "out_linear")
  layers = []
  for layer in range(MID.num_layers):
    prefix = f"transformer/block_{layer}"
    ws = [params[f"{prefix}/attention/{n}.weights"] for n in names]
    ws += [params[f"{prefix}/mlp/{n}.weights"] for n in mlp]
    ws[:3] = [w.reshape(w.shape[0], -1) for w in ws[:3]]
    ws[3] = ws[3].reshape(-1, ws[3].shape[-1])
    layers.append(ws)
  return layers, params["transformer/embedder.embeddings"]


def fuse(layers: list[list[jax.Array]]) -> list[list[jax.Array]]:
  """Per layer ``[q|k|v, o, gate|up, down]``: the matrices concatenated."""
  return [
    [jnp.concatenate([q, k, v], 1), o, jnp.concatenate([g, u], 1), d]
    for q, k, v, o, g, u, d in layers
  ]


def _chain_step(x, layers, emb):
  """One step of the matvec chain over `matrices` (7 per layer) or `fuse`d ones."""
  for ws in layers:
    if len(ws) == 7:
      q, k, v, o, gate, up, down = ws
      kv = x @ k + x @ v
      x = x + (x @ q + jnp.concatenate([kv, kv], axis=-1)) @ o
      x = x + (jax.nn.gelu(x @ gate) * (x @ up)) @ down
    else:
      qkv, o, gate_up, down = ws
      x = x + (x @ qkv)[:, : o.shape[0]] @ o
      h = x @ gate_up
      n = down.shape[0]
      x = x + (jax.nn.gelu(h[:, :n]) * h[:, n:]) @ down
  return x, x @ emb.T


def ideal_loop(steps: int):
  """A jitted ``fori_loop`` of ``steps`` matvec chains (see module docstring)."""

  @jax.jit
  def run(x, layers, emb):
    def body(_, x):
      x, logits = _chain_step(x, layers, emb)
      return x * 1e-3 + logits[:, : x.shape[-1]] * 1e-6

    return jax.lax.fori_loop(0, steps, body, x)

  return run


def step_times(model, batch: int, runs: int) -> dict[str, float]:
  """Seconds per decode step of ``ours`` and ``ideal``, interleaved."""
  prompt = prompt_for(model, batch)
  layers, emb = matrices(model)
  x = jnp.ones((batch, MID.embedding_dim), jnp.float32)
  ideal = {n: ideal_loop(n) for n in (LONG, SHORT)}
  calls = {
    ("ours", n): (lambda n=n: gs.generate(model, prompt, max_new_tokens=n).tokens)
    for n in (LONG, SHORT)
  }
  fused = fuse(layers)
  for name, ws in (("ideal", layers), ("fused_ideal", fused)):
    calls |= {
      (name, n): (lambda n=n, ws=ws: jax.block_until_ready(ideal[n](x, ws, emb)))
      for n in (LONG, SHORT)
    }
  for fn in calls.values():
    fn()
  times = collections.defaultdict(list)
  for _ in range(runs):
    for key, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  out = {}
  for stat in (statistics.median, min):
    t = {key: stat(v) for key, v in times.items()}
    for name in ("ours", "ideal", "fused_ideal"):
      out[name, stat.__name__] = (t[name, LONG] - t[name, SHORT]) / (LONG - SHORT)
  return out


def thunk_times(fn) -> tuple[float, collections.Counter, collections.Counter]:
  """Wall time and thunk time (microseconds) by kind of one traced ``fn()``."""
  fn()
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      fn()
    path = sorted(pathlib.Path(tmp).rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
  spans = [e for e in events if e.get("ph") == "X"]
  wall = max(e["dur"] for e in spans if e["name"].startswith("ThunkExecutor"))
  kinds, counts = collections.Counter(), collections.Counter()
  for e in spans:
    name = e["name"]
    if name.startswith(("$", "ThunkExecutor", "end: ")) or "Execute" in name:
      continue
    kind = re.sub(r"\.\d+$", "", name)
    if "Pjit" in name or kind in ("while", "Handle inputs"):
      continue
    kinds[kind] += e["dur"]
    counts[kind] += 1
  return wall, kinds, counts


def profile(model, batch: int) -> None:
  """Prints the thunk time per decode step by kind, ours beside ideal."""
  prompt = prompt_for(model, batch)
  layers, emb = matrices(model)
  x = jnp.ones((batch, MID.embedding_dim), jnp.float32)
  ideal = ideal_loop(LONG)
  wall, kinds, counts = thunk_times(
    lambda: gs.generate(model, prompt, max_new_tokens=LONG)
  )
  i_wall, i_kinds, _ = thunk_times(lambda: jax.block_until_ready(ideal(x, layers, emb)))
  steps = LONG - 1
  print(f"\nprofile, batch {batch}, ms per decode step (prefill spread over them):")
  print(f"  {'':28s} {'ours':>7s} {'ideal':>7s}")
  print(f"  {'wall':28s} {wall / LONG / 1e3:7.3f} {i_wall / LONG / 1e3:7.3f}")
  total, i_total = sum(kinds.values()), sum(i_kinds.values())
  print(f"  {'all thunks':28s} {total / steps / 1e3:7.3f} {i_total / LONG / 1e3:7.3f}")
  for kind, dur in kinds.most_common(15):
    label = f"{kind} ({counts[kind] / steps:.1f}x)"
    print(f"  {label:28s} {dur / steps / 1e3:7.3f} {i_kinds[kind] / LONG / 1e3:7.3f}")


def prefill_memory(rec) -> None:
  """Temporaries of the compiled fused loop, 512-token prompt, 256k vocabulary."""
  model = gs.build_model(MID.replace(vocab_size=256_000), jax.random.key(0))
  prompt = jnp.ones((1, 512), jnp.int32)
  observed = gs.steer(model, "logits", None, pz.nx.zeros({"vocabulary": 256_000}))
  for name, m in (("plain", model), ("observed", observed)):
    prepared, leaves = decoding.prepare(m, 1, 512 + 8, None, None)
    compiled = decoding.decode.lower(
      prepared.structure,
      leaves,
      prompt,
      jnp.array([512], jnp.int32),
      greedy_controls(256_000),
      jax.random.key(0),
      max_new_tokens=8,
      mode=sampling.SamplingMode(greedy=True),
    ).compile()
    mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"prefill temporaries, 512 tokens, 256k vocabulary, {name}: {mib:.0f} MiB")
    label = "logits observed (a steer at `logits`)" if name == "observed" else "plain"
    rec.figure(
      f"prefill_temp_{name}",
      f"mid, 256k vocabulary, 512-token prompt: fused-loop temporaries, {label}",
      mib,
      "MiB",
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--profile", action="store_true")
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("decode_step", args)
  model = gs.build_model(MID, jax.random.key(0))
  bw = bandwidth(args.runs)
  rec.figure(
    "bandwidth", "matrix-vector bandwidth (float32, 256 MiB)", bw / 1e9, "GB/s"
  )
  for batch in args.batch:
    floor = step_bytes(model, batch, PROMPT + LONG) / bw
    t = step_times(model, batch, args.runs)
    print(f"batch {batch}: bandwidth {bw / 1e9:.1f} GB/s, floor {floor * 1e3:.2f} ms")
    for (name, stat), step in t.items():
      print(
        f"  {name:6s} {stat:6s} {step * 1e3:6.2f} ms/step"
        f"  floor/step {floor / step:.2f}"
      )
    for stat in ("median", "min"):
      print(f"  ours / ideal ({stat}) {t['ours', stat] / t['ideal', stat]:.2f}")
    prefix = f"mid float32, batch {batch}"
    rec.figure(
      f"b{batch}_floor", f"{prefix}: bandwidth floor / step", floor * 1e3, "ms"
    )
    for name in ("ours", "ideal", "fused_ideal"):
      step = t[name, "median"]
      rec.figure(
        f"b{batch}_{name}",
        f"{prefix}: {name.replace('_', ' ')} step (median)",
        step * 1e3,
        "ms",
      )
      rec.figure(
        f"b{batch}_{name}_floor",
        f"{prefix}: floor / {name.replace('_', ' ')} step",
        floor / step,
      )
    rec.figure(
      f"b{batch}_ratio",
      f"{prefix}: ours / ideal matvec chain",
      t["ours", "median"] / t["ideal", "median"],
      "×",
    )
    if args.profile:
      profile(model, batch)
  prefill_memory(rec)
  rec.save()


if __name__ == "__main__":
  main()
