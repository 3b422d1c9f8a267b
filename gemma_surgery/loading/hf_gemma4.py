"""Hugging Face Gemma 4 tensor names and layouts -> canonical parameters.

`gemma_surgery.loading.hf` reads the files; this module knows the names
Gemma 4 adds (after the ``model.`` / ``model.language_model.`` prefix) and
how each becomes canonical (see `gemma_surgery.model.parameters`)::

  embed_tokens_per_layer.weight             [V, L*P]   -> per_layer_embedder [V, L, P]
  per_layer_model_projection.weight         [L*P, D]   -> per_layer_projection [D, L, P]
  per_layer_projection_norm.weight          [P]
  layers.i.layer_scalar                     [1]        -> layer_i/layer_scalar []
  layers.i.per_layer_input_gate.weight      [P, D]     -> per_layer_input/gate [D, P]
  layers.i.per_layer_projection.weight      [D, P]     -> per_layer_input/projection
  layers.i.post_per_layer_input_norm.weight [D]        -> per_layer_input/norm
  layers.i.post_feedforward_layernorm_1     [D]        -> post_ffw_norm_1
  layers.i.pre_feedforward_layernorm_2      [D]        -> moe/pre_norm
  layers.i.post_feedforward_layernorm_2     [D]        -> moe/post_norm
  layers.i.router.proj.weight               [E, D]     -> moe/router [D, E]
  layers.i.router.scale                     [D]        -> moe/router_norm
  layers.i.router.per_expert_scale          [E]        -> moe/per_expert_scale
  layers.i.experts.gate_up_proj             [E, 2X, D] -> moe/gate, moe/up [E, D, X]
  layers.i.experts.down_proj                [E, D, X]  -> moe/down [E, X, D]

Checkpoints may still hold key/value weights of KV-shared layers, which
transformers ignores too (`ignored`). Multimodal checkpoints' vision and audio
towers never match these names and are skipped.
"""

from __future__ import annotations

import numpy as np

from gemma_surgery.config import GemmaConfig

_GLOBAL = {
  "embed_tokens_per_layer.weight": "per_layer_embedder",
  "per_layer_model_projection.weight": "per_layer_projection",
  "per_layer_projection_norm.weight": "per_layer_projection_norm",
}
_LAYER = {
  "layer_scalar": "layer_scalar",
  "per_layer_input_gate.weight": "per_layer_input/gate",
  "per_layer_projection.weight": "per_layer_input/projection",
  "post_per_layer_input_norm.weight": "per_layer_input/norm",
  "post_feedforward_layernorm_1.weight": "post_ffw_norm_1",
  "pre_feedforward_layernorm_2.weight": "moe/pre_norm",
  "post_feedforward_layernorm_2.weight": "moe/post_norm",
  "router.proj.weight": "moe/router",
  "router.scale": "moe/router_norm",
  "router.per_expert_scale": "moe/per_expert_scale",
  "experts.gate_up_proj": "moe/gate_up",
  "experts.down_proj": "moe/down",
}


def canonical_name(name: str) -> str | None:
  """Canonical name of a Gemma 4-only tensor (prefix stripped), else None.

  ``moe/gate_up`` is split in two by `convert`.
  """
  if name in _GLOBAL:
    return _GLOBAL[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER:
    return f"layer_{parts[1]}/{_LAYER[parts[2]]}"
  return None


_NEW_LEAVES = frozenset(_LAYER.values())


def canonical_name_is_new(name: str) -> bool:
  """Whether a canonical name is one `canonical_name` gives (Gemma 4 only)."""
  return name in _GLOBAL.values() or name.split("/", 1)[-1] in _NEW_LEAVES


def layer_of(name: str) -> int | None:
  """The layer index of a canonical ``layer_{i}/...`` name."""
  if not name.startswith("layer_"):
    return None
  return int(name.split("/", 1)[0].removeprefix("layer_"))


def ignored(name: str, config: GemmaConfig) -> bool:
  """Key/value weights of a KV-shared layer (unused, as in transformers)."""
  layer = layer_of(name)
  leaf = name.split("/", 1)[-1]
  return (
    layer is not None
    and leaf in ("attn/k", "attn/v", "attn/key_norm")
    and layer < config.num_layers
    and config.is_kv_shared(layer)
  )


def convert(name: str, arr: np.ndarray, config: GemmaConfig) -> dict[str, np.ndarray]:
  """Canonical array(s) from a Gemma 4-only tensor (see the module table).

  Shapes that don't fit are passed through for the shape check to report.
  """
  leaf = name.split("/", 1)[-1]
  n, p = config.num_layers, config.per_layer_input_dim
  if name == "per_layer_embedder" and arr.ndim == 2 and p and arr.shape[1] == n * p:
    return {name: arr.reshape(arr.shape[0], n, p)}
  if name == "per_layer_projection" and arr.ndim == 2 and p and arr.shape[0] == n * p:
    return {name: arr.T.reshape(arr.shape[1], n, p)}
  if leaf == "layer_scalar":
    return {name: arr.reshape(()) if arr.size == 1 else arr}
  if leaf in ("per_layer_input/gate", "per_layer_input/projection", "moe/router"):
    return {name: arr.T if arr.ndim == 2 else arr}
  if leaf == "moe/gate_up" and arr.ndim == 3 and arr.shape[1] % 2 == 0:
    prefix = name.rsplit("/", 1)[0]
    x = arr.shape[1] // 2
    return {
      f"{prefix}/gate": arr[:, :x, :].transpose(0, 2, 1),
      f"{prefix}/up": arr[:, x:, :].transpose(0, 2, 1),
    }
  if leaf == "moe/down" and arr.ndim == 3:
    return {name: arr.transpose(0, 2, 1)}
  return {name: arr}
