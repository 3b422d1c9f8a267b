"""Load time and first-forward compile time for a mid-size Gemma config.

Writes a random Gemma 2 architecture checkpoint (8 layers, d_model 512, 8
heads / 4 kv heads, head_dim 64, MLP 2048, vocab 32k) in the Hugging Face
format to a temp dir, then measures, in one run:

* ``load``: `gemma_surgery.load` (config.json + safetensors -> bound model);
* ``first forward``: trace + compile + run of a jitted forward (1 x 64);
* ``steady forward``: the same call again (median of 10);
* greedy decoding of 64 tokens with our fused loop: the first call (KV-cache
  conversion + trace + compile + run) and steady calls;
* the first ``greedy_generate`` in a *new* process, with an empty persistent
  compilation cache and then with the cache that run filled (what a
  notebook restart costs; `gemma_surgery.jit_cache`).

The fused loop vs Penzai's Python loop is `generation.py`'s comparison
(interleaved there).

Run: ``python bench/load_and_compile.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import record
from penzai import pz
from penzai.toolshed import jit_wrapper
from safetensors.numpy import save_file

import gemma_surgery

L, D, N, K, H, F, V = 8, 512, 8, 4, 64, 2048, 32_000


def write_checkpoint(directory: pathlib.Path) -> None:
  rng = np.random.default_rng(0)

  def w(*shape, std=0.05):
    return (rng.standard_normal(shape) * std).astype(np.float32)

  tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": w(D)}
  for i in range(L):
    p = f"model.layers.{i}."
    tensors |= {
      p + "self_attn.q_proj.weight": w(N * H, D),
      p + "self_attn.k_proj.weight": w(K * H, D),
      p + "self_attn.v_proj.weight": w(K * H, D),
      p + "self_attn.o_proj.weight": w(D, N * H),
      p + "mlp.gate_proj.weight": w(F, D),
      p + "mlp.up_proj.weight": w(F, D),
      p + "mlp.down_proj.weight": w(D, F),
    }
    for norm in (
      "input_layernorm",
      "post_attention_layernorm",
      "pre_feedforward_layernorm",
      "post_feedforward_layernorm",
    ):
      tensors[p + norm + ".weight"] = w(D)
  save_file(tensors, str(directory / "model.safetensors"))
  config = dict(
    model_type="gemma2",
    num_hidden_layers=L,
    hidden_size=D,
    num_attention_heads=N,
    num_key_value_heads=K,
    head_dim=H,
    intermediate_size=F,
    vocab_size=V,
    sliding_window=32,
    query_pre_attn_scalar=H,
  )
  (directory / "config.json").write_text(json.dumps(config))


def timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start, out


PROBE = """
import sys, time, json
import jax
import gemma_surgery
lm = gemma_surgery.load(sys.argv[1], dtype="float32", progress=False)
ids = jax.numpy.asarray([[5, 17, 301, 9, 44, 1000, 77, 12]], jax.numpy.int32)
t = time.perf_counter()
jax.block_until_ready(gemma_surgery.greedy_generate(lm.model, ids, max_new_tokens=64))
print(json.dumps({"first_generate": time.perf_counter() - t}))
"""


def fresh_process(directory: pathlib.Path, cache: pathlib.Path) -> float:
  """First ``greedy_generate`` (conversion + trace + compile + run) in a new
  process whose persistent compilation cache is ``cache``."""
  env = dict(os.environ, GEMMA_SURGERY_COMPILATION_CACHE=str(cache), XLA_FLAGS="")
  out = subprocess.run(
    [sys.executable, "-c", PROBE, str(directory)],
    env=env,
    capture_output=True,
    text=True,
  )
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])["first_generate"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  record.add_arguments(parser)
  rec = record.Recorder.from_args("load_and_compile", parser.parse_args())
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp) / "model"
    directory.mkdir()
    write_checkpoint(directory)
    cache = pathlib.Path(tmp) / "cache"
    cold = fresh_process(directory, cache)
    warm = fresh_process(directory, cache)
    t_load, lm = timed(
      lambda: gemma_surgery.load(directory, dtype="float32", progress=False)
    )
  tokens = pz.nx.wrap(
    jnp.asarray(np.random.default_rng(1).integers(3, V, (1, 64)), jnp.int32)
  ).tag("batch", "seq")
  forward = jit_wrapper.Jitted(lm.model)
  t_first, _ = timed(lambda: forward(tokens).data_array)
  steady = statistics.median(
    timed(lambda: forward(tokens).data_array)[0] for _ in range(10)
  )
  prompt = tokens[{"seq": pz.slice[:8]}]
  new = 64

  def fused():
    return gemma_surgery.greedy_generate(lm.model, prompt, max_new_tokens=new)

  t_fused_first, _ = timed(fused)
  fused_s = statistics.median(timed(fused)[0] for _ in range(3))
  print(f"config: {L} layers, d={D}, heads {N}/{K}, head_dim {H}, mlp {F}, vocab {V}")
  rows = [
    ("load", "`gemma_surgery.load` (HF safetensors, float32)", t_load, "s"),
    (
      "forward_first",
      "first forward 1×64, Penzai `Jitted` (trace + compile)",
      t_first,
      "s",
    ),
    ("forward_steady", "steady forward 1×64 (median of 10)", steady * 1e3, "ms"),
    (
      "generate_first",
      "`greedy_generate` 64 tokens, first call in this process",
      t_fused_first,
      "s",
    ),
    (
      "generate_steady",
      "`greedy_generate` 64 tokens (median of 3)",
      fused_s * 1e3,
      "ms",
    ),
    (
      "fresh_cold",
      "first `greedy_generate` in a new process, empty compilation cache",
      cold,
      "s",
    ),
    (
      "fresh_warm",
      "the same in a second new process (cache filled by the first)",
      warm,
      "s",
    ),
  ]
  for key, label, value, unit in rows:
    print(f"{label:<78}{value:9.3f} {unit}")
    rec.figure(key, label, value, unit)
  rec.figure(
    "cache_saving", "persistent cache: cold / warm first call", cold / warm, "×"
  )
  rec.save()


if __name__ == "__main__":
  main()
