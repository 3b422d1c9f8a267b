"""Test helpers: write canonical params as Kaggle/Flax orbax checkpoints.

Each writer produces one exact public layout, written from the format
description (the Flax ``gemma`` modules' parameter names and einsum shapes),
independently of the reader in `gemma_surgery.loading.kaggle`:

* `to_flat`: the released Kaggle layout, ``{"transformer/layer_0/attn/
  q_einsum": {"w": ...}}``; multi-head attention as ``qkv_einsum [3, N, D, H]``
  (Gemma 1 7B), otherwise ``q_einsum [N, D, H]`` + ``kv_einsum [2, K, D, H]``
  (``[2, D, H]`` for squeezed multi-query checkpoints); ``gating_einsum`` as
  ``[2, D, F]`` or, transposed, ``[2, F, D]`` (Gemma 2 9B/27B, Gemma 3);
  optional dummy multimodal weights (``mm_*``, ``SigLiPFromPatches_0``).
* `to_nested`: the ``gemma`` library's Flax tree; MLP weights without ``"w"``.
* `to_stacked`: ``transformer/stacked_layers/attention_type_{p}/...`` with layer
  ``s * P + p`` at slice ``s`` (or ``stacked_layers/...`` with ``P = None``).

Writers use ``jax.numpy`` so that ``jax.eval_shape`` can build shape-only trees
of full-size presets without allocating them.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemma_surgery import config
from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import parameters as canonical

Tree = dict[str, Any]

_SIZES = {"embedding_dim": 32, "head_dim": 8, "mlp_hidden_dim": 64, "vocab_size": 64}
# name: (variant, num_layers, num_heads, num_kv_heads, period of global layers)
TINY = {
  "gemma1_mha": ("gemma_7b", 2, 4, 4, None),
  "gemma1_mqa": ("gemma_2b", 2, 4, 1, None),
  "gemma2": ("gemma2_2b", 4, 4, 2, 2),
  "gemma2_9b": ("gemma2_9b", 4, 4, 2, 2),
  "gemma3": ("gemma3_1b", 7, 4, 2, 6),
  "gemma3_mqa": ("gemma3_270m", 3, 4, 1, 6),
}


def tiny_config(name: str, **sizes: int) -> GemmaConfig:
  """A tiny model of ``TINY[name]``: what the reader infers with that variant.

  Sizes come from the shapes, the rest from the variant's preset, with the
  attention pattern re-derived and ``query_pre_attn_scalar = head_dim``.
  """
  variant, layers, heads, kv_heads, period = TINY[name]
  sizes = {**_SIZES, **sizes}
  kinds = config.alternating_pattern(layers, period) if period else ("global",) * layers
  return config.preset(variant).replace(
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    attention_types=kinds,
    query_pre_attn_scalar=sizes["head_dim"],
    **sizes,
  )


def random_params(
  cfg: GemmaConfig, seed: int = 0, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """Random canonical params for ``cfg``."""
  rng = np.random.default_rng(seed)
  return {
    name: (rng.normal(size=shape) * 0.5).astype(dtype)
    for name, shape in canonical.expected_shapes(cfg).items()
  }


def _layer(
  config: GemmaConfig,
  p: Mapping[str, Any],
  i: int,
  transpose_gating: bool,
  squeeze_mqa: bool,
) -> dict[str, dict[str, Any]]:
  """Flax modules of layer ``i``: module path -> {param name: array}."""
  c = f"layer_{i}/"
  mods = {"pre_attention_norm": {"scale": p[c + "pre_attention_norm"]}}
  if config.use_post_attn_norm:
    mods["post_attention_norm"] = {"scale": p[c + "post_attention_norm"]}
  mods["pre_ffw_norm"] = {"scale": p[c + "pre_ffw_norm"]}
  if config.use_post_ffw_norm:
    mods["post_ffw_norm"] = {"scale": p[c + "post_ffw_norm"]}
  q, k, v = p[c + "attn/q"], p[c + "attn/k"], p[c + "attn/v"]
  if config.num_kv_heads == config.num_heads:
    mods["attn/qkv_einsum"] = {"w": jnp.stack([q, k, v])}
  else:
    kv = jnp.stack([k, v])
    if squeeze_mqa:
      assert config.num_kv_heads == 1
      kv = kv[:, 0]
    mods["attn/q_einsum"] = {"w": q}
    mods["attn/kv_einsum"] = {"w": kv}
  mods["attn/attn_vec_einsum"] = {"w": p[c + "attn/o"]}
  if config.use_qk_norm:
    mods["attn/_query_norm"] = {"scale": p[c + "attn/query_norm"]}
    mods["attn/_key_norm"] = {"scale": p[c + "attn/key_norm"]}
  gate, up = p[c + "mlp/gate"], p[c + "mlp/up"]
  if transpose_gating:
    gating = jnp.stack([gate.T, up.T])
  else:
    gating = jnp.stack([gate, up])
  mods["mlp/gating_einsum"] = {"w": gating}
  mods["mlp/linear"] = {"w": p[c + "mlp/down"]}
  return mods


def to_flat(
  config: GemmaConfig,
  params: Mapping[str, Any],
  *,
  transpose_gating: bool = False,
  squeeze_mqa: bool = False,
  with_vision: bool = False,
) -> Tree:
  """The FLAT layout of the released Kaggle checkpoints."""
  tree: Tree = {
    "transformer/embedder": {"input_embedding": params["embedder"]},
    "transformer/final_norm": {"scale": params["final_norm"]},
  }
  for i in range(config.num_layers):
    for module, leaf in _layer(
      config, params, i, transpose_gating, squeeze_mqa
    ).items():
      tree[f"transformer/layer_{i}/{module}"] = leaf
  if with_vision:
    d = config.embedding_dim
    tree["transformer/embedder/mm_input_projection"] = {"w": jnp.ones((12, d))}
    tree["transformer/embedder/mm_soft_embedding_norm"] = {"scale": jnp.ones(12)}
    tree["SigLiPFromPatches_0/siglip_encoder/embedding"] = {
      "kernel": jnp.ones((2, 2, 3, 12)),
      "bias": jnp.zeros(12),
    }
  return tree


def _nest(flat: Mapping[str, Any]) -> Tree:
  out: Tree = {}
  for key, value in flat.items():
    node = out
    *parents, last = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return out


def to_nested(
  config: GemmaConfig,
  params: Mapping[str, Any],
  *,
  outer: bool = True,
  transpose_gating: bool = False,
) -> Tree:
  """The NESTED layout of the ``gemma`` library (Flax ``model.init`` tree)."""
  flat: dict[str, Any] = {
    "embedder/input_embedding": params["embedder"],
    "final_norm/scale": params["final_norm"],
  }
  for i in range(config.num_layers):
    for module, leaf in _layer(config, params, i, transpose_gating, False).items():
      if module.startswith("mlp/"):
        flat[f"layer_{i}/{module}"] = leaf["w"]  # No "w" level for MLP weights.
      else:
        for name, value in leaf.items():
          flat[f"layer_{i}/{module}/{name}"] = value
  tree = _nest(flat)
  return {"transformer": tree} if outer else tree


def to_stacked(
  config: GemmaConfig,
  params: Mapping[str, Any],
  *,
  pattern_len: int | None,
  nested: bool = False,
  transpose_gating: bool = True,
) -> Tree:
  """The STACKED layout: layers grouped by position in the attention pattern.

  Args:
    config: The architecture.
    params: Canonical params.
    pattern_len: ``P``; layer ``i`` goes to ``attention_type_{i % P}`` at slice
      ``i // P``. None writes ``stacked_layers/<module>`` holding every layer.
    nested: Spell the stacked tree as nested dicts instead of flat keys.
    transpose_gating: Store ``gating_einsum`` as ``[2, F, D]``.
  """
  flat = to_flat(config, params, transpose_gating=transpose_gating)
  groups: dict[tuple[str, str], dict[int, Any]] = {}
  out: Tree = {}
  for key, leaf in flat.items():
    match = re.fullmatch(r"transformer/layer_(\d+)/(.+)", key)
    if match is None:
      out[key] = leaf
      continue
    layer, module = int(match.group(1)), match.group(2)
    if pattern_len is None:
      target, slot = f"transformer/stacked_layers/{module}", layer
    else:
      p, slot = layer % pattern_len, layer // pattern_len
      target = f"transformer/stacked_layers/attention_type_{p}/{module}"
    for name, value in leaf.items():
      groups.setdefault((target, name), {})[slot] = value
  for (target, name), slices in groups.items():
    stacked = jnp.stack([slices[s] for s in sorted(slices)])
    out.setdefault(target, {})[name] = stacked
  if nested:
    return _nest({f"{k}/{n}": v for k, leaf in out.items() for n, v in leaf.items()})
  return out


def save(tree: Tree, path: str | pathlib.Path) -> pathlib.Path:
  """Writes ``tree`` (numpy leaves) as an orbax PyTree checkpoint at ``path``."""
  path = pathlib.Path(path)
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(path.absolute(), jax.tree.map(np.asarray, tree))
  checkpointer.close()
  return path
