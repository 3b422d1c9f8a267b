"""Tiny random Gemma 4 checkpoints written by `transformers` for the tests.

`write_checkpoint` builds a ``Gemma4ForCausalLM`` from a tiny
``Gemma4TextConfig``, draws every weight at random (norm weights and scalars
around 1, so that a wrong ``w`` vs ``1 + w`` convention or a dropped layer
scalar shows) and saves it with ``save_pretrained`` (``config.json`` +
``model.safetensors``), the layout `gemma_surgery.load` reads.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from penzai import pz

import gemma_surgery as gs

VOCAB = 128

# Every Gemma 4 feature at once: per-layer embeddings, KV sharing (the last 2
# of 6 layers) with double-wide MLPs, k = v on global layers with 1 kv head
# (2 on local ones), head_dim 16 local / 32 global, proportional RoPE (1/4 of
# the global dims rotate), sliding window 4, MoE top-2 of 4 beside the dense
# MLP, final soft cap.
ALL_FEATURES = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=6,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  global_head_dim=32,
  num_global_key_value_heads=1,
  attention_k_eq_v=True,
  num_kv_shared_layers=2,
  hidden_size_per_layer_input=8,
  vocab_size_per_layer_input=VOCAB,
  sliding_window=4,
  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
  final_logit_softcapping=30.0,
  use_double_wide_mlp=True,
  enable_moe_block=True,
  num_experts=4,
  top_k_experts=2,
  moe_intermediate_size=24,
)

# An E-model shape: MQA, separate values, 3 local : 1 global, no MoE.
DENSE_MQA = dict(
  vocab_size=VOCAB,
  hidden_size=48,
  intermediate_size=64,
  num_hidden_layers=8,
  num_attention_heads=4,
  num_key_value_heads=1,
  head_dim=16,
  global_head_dim=32,
  num_kv_shared_layers=3,
  hidden_size_per_layer_input=8,
  vocab_size_per_layer_input=VOCAB,
  sliding_window=5,
  layer_types=["sliding_attention"] * 3
  + ["full_attention"]
  + ["sliding_attention"] * 3
  + ["full_attention"],
  final_logit_softcapping=30.0,
  use_double_wide_mlp=True,
)


def write_checkpoint(directory: pathlib.Path, seed: int = 0, **config):
  """Writes a random tiny Gemma 4 checkpoint; returns the torch model."""
  import torch
  import transformers

  cfg = transformers.Gemma4TextConfig(**config)
  torch.manual_seed(seed)
  model = transformers.Gemma4ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or "norm" in name or "scale" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)  # larger embeddings make one token win always
    for layer in model.model.layers:
      layer.layer_scalar.fill_(0.7 + 0.6 * torch.rand(()).item())
  model.save_pretrained(directory)
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def torch_greedy(model, prompt: np.ndarray, new: int) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model.generate(
      torch.from_numpy(prompt).long(),
      max_new_tokens=new,
      min_new_tokens=new,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
  return out[:, prompt.shape[1] :].numpy()


def logits(model, tokens: np.ndarray) -> np.ndarray:
  """``model``'s logits ``[batch, seq, vocab]`` (eager: no compile per model)."""
  named = pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq")
  return np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))


def tokens(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(3, VOCAB, (batch, seq)).astype(np.int32)
  ids[:, 0] = 2
  return ids


def greedy_uncached(model, prompt: np.ndarray, new: int) -> np.ndarray:
  """Greedy continuation by full forward passes (no cache), one compile.

  The sequence lives in a buffer of its final length; causal attention makes
  the not-yet-generated tail irrelevant to the position read.
  """
  forward = gs.jit_forward(model)  # also handles captures' state
  batch, start = prompt.shape
  ids = np.zeros((batch, start + new), np.int32)
  ids[:, :start] = prompt
  for t in range(start, start + new):
    out = forward(pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq"))
    out = out.unwrap("batch", "seq", "vocabulary")
    ids[:, t] = np.asarray(jnp.argmax(out[:, t - 1], axis=-1))
  return ids[:, start:]
