"""Trace time of our positional layers vs Penzai's named-axis ones, side by side.

The same mid-size model (random weights) is built twice: as the library builds
it (`gemma_surgery.model.positional` layers: one ``dot_general`` / reduction
per linear, norm and RoPE) and with each of those layers swapped back for
Penzai's own (``pz.nn.Linear``, ``RMSStandardize``, ``nmap``-ed RoPE), which
trace one ``vmap`` per named axis. For each, interleaved over ``--runs``
rounds with JAX's caches cleared before every trace, it times:

1. trace, lower and XLA-compile the fused generation loop (greedy, steered at
   ``resid_post`` of layer 4, 16 + 64 tokens), as `bench/generation.py` does;
2. trace of a plain jitted forward (1 × 64 tokens);

and checks both models give the same logits (max difference) and the same
greedy tokens. Configs: MID (Gemma 2) and MID3 (Gemma 3: QK-norm, two RoPE
bases).

Run: ``python bench/trace_time.py`` (``--runs N``; ``--json F`` for run_all).
"""

from __future__ import annotations

import os

# Compile-time figures must not be persistent-cache hits.
os.environ.setdefault("GEMMA_SURGERY_COMPILATION_CACHE", "0")

import argparse
import statistics
import time

import generation
import jax
import jax.numpy as jnp
import numpy as np
import record
from configs import MID, MID3
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.model import build, positional, positional_layers


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class NmapRoPE(build.ScaledRoPE):
  """`ScaledRoPE` through Penzai's ``ApplyRoPE.__call__`` (one vmap per axis)."""

  def __call__(self, inputs, **side_inputs):
    return pz.nn.ApplyRoPE.__call__(self, inputs, **side_inputs)


def with_penzai_layers(model):
  """``model`` with the positional layers (and RoPE) traced through ``pz.nmap``."""
  model = positional_layers.with_penzai_layers(model)
  return (
    pz.select(model)
    .at_instances_of(build.ScaledRoPE)
    .apply(lambda x: NmapRoPE(**{f: getattr(x, f) for f in x.__dataclass_fields__}))
  )


def fused_loop_phases(model) -> tuple[float, float, float]:
  """`generation.fused_loop_phases` with JAX's caches cleared first."""
  jax.clear_caches()
  return generation.fused_loop_phases(model)


def forward_trace(model) -> float:
  jax.clear_caches()
  prompt = generation.prompt_for(model).repeat(4, axis=1)
  tokens = pz.nx.wrap(jnp.asarray(prompt)).tag("batch", "seq")
  t0 = time.perf_counter()
  jax.jit(lambda m, t: m(t)).trace(model, tokens)
  return time.perf_counter() - t0


def compare(rec, name: str, config, runs: int) -> None:
  ours = pz.freeze_params(gs.build_model(config, jax.random.key(0)))
  theirs = with_penzai_layers(ours)
  assert not pz.select(theirs).at_instances_of(positional.PositionalLinear).count()
  times = {k: {"trace": [], "lower": [], "compile": [], "forward": []} for k in "ot"}
  for _ in range(runs):
    for key, model in (("o", ours), ("t", theirs)):
      trace, lower, compile_ = fused_loop_phases(model)
      times[key]["trace"].append(trace)
      times[key]["lower"].append(lower)
      times[key]["compile"].append(compile_)
      times[key]["forward"].append(forward_trace(model))
  med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
  for phase, label in (
    ("trace", "fused loop: trace"),
    ("lower", "fused loop: lower"),
    ("compile", "fused loop: XLA compile"),
    ("forward", "forward 1 × 64: trace"),
  ):
    o, t = med["o"][phase], med["t"][phase]
    print(f"{name} {label}: ours {o:.3f} s, Penzai layers {t:.3f} s ({t / o:.2f}x)")
    rec.figure(f"{name}_{phase}_ours", f"{name}, {label}, ours", o, "s")
    rec.figure(f"{name}_{phase}_penzai", f"{name}, {label}, Penzai layers", t, "s")
    rec.figure(f"{name}_{phase}_ratio", f"{name}, {label}, Penzai / ours", t / o, "×")
  total_o = med["o"]["trace"] + med["o"]["lower"] + med["o"]["compile"]
  total_t = med["t"]["trace"] + med["t"]["lower"] + med["t"]["compile"]
  rec.figure(f"{name}_total_ours", f"{name}, fused loop: all three, ours", total_o, "s")
  rec.figure(
    f"{name}_total_penzai", f"{name}, fused loop: all three, Penzai", total_t, "s"
  )
  prompt = generation.prompt_for(ours)
  tokens = pz.nx.wrap(jnp.asarray(prompt)).tag("batch", "seq")
  a, b = (
    jax.jit(lambda m, t: m(t))(ours, tokens),
    jax.jit(lambda m, t: m(t))(theirs, tokens),
  )
  diff = float(jnp.max(jnp.abs(a.data_array - b.order_as(*a.named_shape).data_array)))
  rec.figure(f"{name}_logit_diff", f"{name}, max |logit difference|", diff)
  same = np.array_equal(
    gs.generate(ours, prompt, max_new_tokens=16).tokens,
    gs.generate(theirs, prompt, max_new_tokens=16).tokens,
  )
  rec.figure(f"{name}_same_tokens", f"{name}, same 16 greedy tokens", same)
  print(f"{name}: max |logit diff| {diff:.2e}, same tokens: {same}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("trace_time", args)
  compare(rec, "mid", MID, args.runs)
  compare(rec, "mid3", MID3, args.runs)
  rec.save()


if __name__ == "__main__":
  main()
