"""Load time and first-forward compile time for a mid-size Gemma config.

Writes a random Gemma 2 architecture checkpoint (8 layers, d_model 512, 8
heads / 4 kv heads, head_dim 64, MLP 2048, vocab 32k) in the Hugging Face
format to a temp dir, then measures, in one run:

* ``load``: `gemma_surgery.load` (config.json + safetensors -> bound model);
* ``first forward``: trace + compile + run of a jitted forward (1 x 64);
* ``steady forward``: the same call again (median of 10);
* greedy decoding of 64 tokens with our fused loop vs Penzai's Python loop
  (``temperature_sample_pyloop`` with a jitted body, temperature ~0), with
  the ratio measured side by side.

Run: ``python bench/load_and_compile.py``.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
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


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    write_checkpoint(directory)
    t_load, lm = timed(
      lambda: gemma_surgery.load(directory, dtype="float32", progress=False)
    )
  tokens = pz.nx.wrap(
    jnp.asarray(np.random.default_rng(1).integers(3, V, (1, 64)), jnp.int32)
  ).tag("batch", "seq")
  forward = jit_wrapper.Jitted(lm.model)
  t_first, _ = timed(lambda: forward(tokens).data_array)
  steady = [timed(lambda: forward(tokens).data_array)[0] for _ in range(10)]

  prompt = tokens[{"seq": pz.slice[:8]}]
  new = 64
  t_fused_first, _ = timed(
    lambda: gemma_surgery.greedy_generate(lm.model, prompt, max_new_tokens=new)
  )
  fused = [
    timed(lambda: gemma_surgery.greedy_generate(lm.model, prompt, max_new_tokens=new))[
      0
    ]
    for _ in range(3)
  ]

  def pyloop():
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(
      lm.model, cache_len=8 + new, batch_axes={"batch": 1}
    )
    sampler = pz.select(cached).at(lambda c: c.body).apply(jit_wrapper.Jitted)
    return simple_decoding_loop.temperature_sample_pyloop(
      sampler,
      prompt=prompt,
      rng=jax.random.key(0),
      temperature=1e-6,
      max_sampling_steps=new,
    ).data_array

  t_py_first, _ = timed(pyloop)
  py = [timed(pyloop)[0] for _ in range(3)]

  print(f"config: {L} layers, d={D}, heads {N}/{K}, head_dim {H}, mlp {F}, vocab {V}")
  f_med, p_med = statistics.median(fused), statistics.median(py)
  rows = [
    ("load (HF safetensors, float32)", f"{t_load:8.2f} s"),
    ("first forward 1x64 (trace+compile)", f"{t_first:8.2f} s"),
    (
      "steady forward 1x64 (median of 10)",
      f"{statistics.median(steady) * 1e3:8.1f} ms",
    ),
    ("fused greedy, first call (compile)", f"{t_fused_first:8.2f} s"),
    (f"fused greedy {new} tok (median of 3)", f"{new / f_med:8.0f} tok/s"),
    ("penzai pyloop, first call", f"{t_py_first:8.2f} s"),
    (f"penzai pyloop {new} tok (median of 3)", f"{new / p_med:8.0f} tok/s"),
    ("ratio fused / pyloop throughput", f"{p_med / f_med:8.1f} x"),
  ]
  for name, value in rows:
    print(f"{name:<40}{value}")


if __name__ == "__main__":
  main()
