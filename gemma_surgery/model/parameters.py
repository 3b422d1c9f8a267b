"""Canonical Gemma parameters and how each becomes a Penzai parameter.

Every checkpoint format (Kaggle/Flax orbax in its flat, nested and stacked
layouts, Hugging Face safetensors) is first converted to one *canonical* flat
dict of numpy arrays, then bound by
`gemma_surgery.loading.params.bind_parameters`. This module keeps the mapping
to Penzai in one place and lets every loader be checked against the same
shapes. Canonical names and shapes (N query heads, K kv heads, D embedding,
H head_dim, F MLP width, V vocabulary):

==================================  ===========  ==============================
name                                shape        meaning
==================================  ===========  ==============================
``embedder``                        [V, D]       token embeddings (tied)
``final_norm``                      [D]          RMSNorm weight (applied 1 + w)
``layer_{i}/pre_attention_norm``    [D]          RMSNorm weight
``layer_{i}/post_attention_norm``   [D]          (Gemma 2/3)
``layer_{i}/pre_ffw_norm``          [D]
``layer_{i}/post_ffw_norm``         [D]          (Gemma 2/3)
``layer_{i}/attn/q``                [N, D, H]
``layer_{i}/attn/k``                [K, D, H]
``layer_{i}/attn/v``                [K, D, H]
``layer_{i}/attn/o``                [N, H, D]
``layer_{i}/attn/query_norm``       [H]          QK-norm (Gemma 3)
``layer_{i}/attn/key_norm``         [H]
``layer_{i}/mlp/gate``              [D, F]       GeGLU gate (through gelu)
``layer_{i}/mlp/up``                [D, F]       GeGLU value
``layer_{i}/mlp/down``              [F, D]
==================================  ===========  ==============================

Gemma 4 (RMSNorm weights applied as ``w``; layer ``i`` has its own head width
``H_i``, kv heads ``K_i`` and MLP width ``F_i``; KV-shared layers have no
``attn/k``, ``attn/v``, ``attn/key_norm``; ``k = v`` layers no ``attn/v``)
adds, with P the per-layer embedding width, L layers, E experts, X the
expert width:

=======================================  ===========  =========================
``layer_{i}/layer_scalar``               []           output multiplier
``per_layer_embedder``                   [V, L, P]    per-layer embeddings
``per_layer_projection``                 [D, L, P]
``per_layer_projection_norm``            [P]
``layer_{i}/per_layer_input/gate``       [D, P]
``layer_{i}/per_layer_input/projection`` [P, D]
``layer_{i}/per_layer_input/norm``       [D]
``layer_{i}/post_ffw_norm_1``            [D]          dense-MLP norm (MoE)
``layer_{i}/moe/router_norm``            [D]          router input scale
``layer_{i}/moe/router``                 [D, E]
``layer_{i}/moe/per_expert_scale``       [E]
``layer_{i}/moe/pre_norm``, ``post_norm`` [D]
``layer_{i}/moe/gate``, ``moe/up``       [E, D, X]
``layer_{i}/moe/down``                   [E, X, D]
=======================================  ===========  =========================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import build


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  """Canonical parameter names and shapes for ``config``."""
  n, d = config.num_heads, config.embedding_dim
  shapes = {"embedder": (config.vocab_size, d), "final_norm": (d,)}
  shapes.update(_gemma4_global_shapes(config))
  for i in range(config.num_layers):
    p = f"layer_{i}"
    k, h = config.layer_kv_heads(i), config.layer_head_dim(i)
    f = config.layer_mlp_dim(i)
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
      norms.append("post_attention_norm")
    if config.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm in norms:
      shapes[f"{p}/{norm}"] = (d,)
    shapes[f"{p}/attn/q"] = (n, d, h)
    shared = config.is_kv_shared(i)
    if not shared:
      shapes[f"{p}/attn/k"] = (k, d, h)
    if not shared and not config.is_k_eq_v(i):
      shapes[f"{p}/attn/v"] = (k, d, h)
    shapes[f"{p}/attn/o"] = (n, h, d)
    if config.use_qk_norm:
      shapes[f"{p}/attn/query_norm"] = (h,)
      if not shared:
        shapes[f"{p}/attn/key_norm"] = (h,)
    shapes[f"{p}/mlp/gate"] = (d, f)
    shapes[f"{p}/mlp/up"] = (d, f)
    shapes[f"{p}/mlp/down"] = (f, d)
    shapes.update(_gemma4_layer_shapes(config, i))
  return shapes


def _gemma4_global_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  p, d = config.per_layer_input_dim, config.embedding_dim
  if not p:
    return {}
  vocab = config.per_layer_vocab_size or config.vocab_size
  return {
    "per_layer_embedder": (vocab, config.num_layers, p),
    "per_layer_projection": (d, config.num_layers, p),
    "per_layer_projection_norm": (p,),
  }


def _gemma4_layer_shapes(config: GemmaConfig, i: int) -> dict[str, tuple[int, ...]]:
  if config.family != "gemma4":
    return {}
  pre, d = f"layer_{i}", config.embedding_dim
  shapes: dict[str, tuple[int, ...]] = {f"{pre}/layer_scalar": ()}
  if p := config.per_layer_input_dim:
    shapes[f"{pre}/per_layer_input/gate"] = (d, p)
    shapes[f"{pre}/per_layer_input/projection"] = (p, d)
    shapes[f"{pre}/per_layer_input/norm"] = (d,)
  if e := config.num_experts:
    x = config.expert_hidden_dim
    for norm in ("post_ffw_norm_1", "moe/router_norm", "moe/pre_norm", "moe/post_norm"):
      shapes[f"{pre}/{norm}"] = (d,)
    shapes[f"{pre}/moe/router"] = (d, e)
    shapes[f"{pre}/moe/per_expert_scale"] = (e,)
    shapes[f"{pre}/moe/gate"] = (e, d, x)
    shapes[f"{pre}/moe/up"] = (e, d, x)
    shapes[f"{pre}/moe/down"] = (e, x, d)
  return shapes


def check_canonical(
  config: GemmaConfig, params: Mapping[str, np.ndarray], source: str
) -> None:
  """Raises `CheckpointError` if names or shapes don't match the config."""
  expected = expected_shapes(config)
  missing = [name for name in expected if name not in params]
  if missing:
    raise errors.CheckpointError(
      f"{source}: missing {len(missing)} parameter(s) the config needs,"
      f" e.g. {missing[:3]} (the checkpoint may be truncated or of another"
      " variant)."
    )
  extra = sorted(set(params) - set(expected))
  if extra:
    raise errors.CheckpointError(
      f"{source}: unexpected parameter(s) {extra[:3]} for a"
      f" {config.family} config with {config.num_layers} layers."
    )
  for name, shape in expected.items():
    got = tuple(params[name].shape)
    if got != shape:
      raise errors.CheckpointError(
        f"{source}: parameter {name!r} has shape {got}, but the config"
        f" ({config.family}, d_model={config.embedding_dim},"
        f" heads={config.num_heads}/{config.num_kv_heads},"
        f" head_dim={config.head_dim}, mlp={config.mlp_hidden_dim},"
        f" vocab={config.vocab_size}) needs {shape}."
      )


@dataclasses.dataclass(frozen=True)
class Target:
  """How one Penzai parameter is made from one canonical array.

  Attributes:
    canonical: The canonical name it is made from.
    axes: Its Penzai axis names, in storage order.
    kind: ``"same"`` (the canonical array as is), ``"norm"`` (``1 + w``,
      added in float32 before any cast: Gemma's RMSNorm applies ``1 + w``),
      ``"heads"`` (the leading canonical head axis split into Penzai's head
      axes of sizes ``head_sizes``), or ``"drop"`` (multi-query attention:
      the leading kv-head axis of size 1 removed).
    head_sizes: Sizes of the Penzai head axes for ``"heads"``.
  """

  canonical: str
  axes: tuple[str, ...]
  kind: str = "same"
  head_sizes: tuple[int, ...] = ()

  def apply(self, value: Any) -> Any:
    """The Penzai array from the canonical one (numpy or jax, any dtype)."""
    if self.kind == "norm":
      return 1.0 + value.astype(np.float32)
    if self.kind == "heads":
      return value.reshape(self.head_sizes + tuple(value.shape[1:]))
    if self.kind == "drop":
      return value[0]
    return value

  def shape(self, canonical_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Penzai shape for a canonical shape."""
    if self.kind == "heads":
      return self.head_sizes + tuple(canonical_shape[1:])
    if self.kind == "drop":
      return tuple(canonical_shape[1:])
    return tuple(canonical_shape)

  def canonical_spec(self, spec: tuple) -> tuple:
    """Mesh axes of the canonical dims, given those of the Penzai dims.

    A split head axis takes the mesh axis of whichever Penzai head axis is
    sharded (the first one when several are).
    """
    spec = tuple(spec) + (None,) * (len(self.axes) - len(spec))
    if self.kind == "heads":
      k = len(self.head_sizes)
      used = [axis for axis in spec[:k] if axis is not None]
      return (used[0] if used else None, *spec[k:])
    if self.kind == "drop":
      return (None, *spec)
    return spec


def penzai_targets(config: GemmaConfig) -> dict[str, Target]:
  """Every Penzai parameter label of ``config`` and how to make it."""
  norm = "norm" if config.norm_offset else "same"
  out = {
    "embedder.embeddings": Target("embedder", ("vocabulary", "embedding")),
    "final_norm/scale.weights": Target("final_norm", ("embedding",), norm),
  }
  out.update(_gemma4_global_targets(config))
  shapes = expected_shapes(config)
  for i in range(config.num_layers):
    src, dst = f"layer_{i}", f"block_{i}"
    common, q_only = build.head_axes(config, i)
    q_axes, q_sizes = (*common, *q_only), (*common.values(), *q_only.values())
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
      norms.insert(1, "post_attention_norm")
    if config.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm_name in norms:
      out[f"{dst}/{norm_name}/scale.weights"] = Target(
        f"{src}/{norm_name}", ("embedding",), norm
      )
    out[f"{dst}/attention/query.weights"] = Target(
      f"{src}/attn/q", (*q_axes, "embedding", "projection"), "heads", q_sizes
    )
    kv = [n for n in (("k", "key"), ("v", "value")) if f"{src}/attn/{n[0]}" in shapes]
    for name, label in kv:
      # MQA: the single kv head has no axis.
      kind = "same" if common else "drop"
      out[f"{dst}/attention/{label}.weights"] = Target(
        f"{src}/attn/{name}", (*common, "embedding", "projection"), kind
      )
    out[f"{dst}/attention/output.weights"] = Target(
      f"{src}/attn/o", (*q_axes, "projection", "embedding"), "heads", q_sizes
    )
    if config.use_qk_norm:
      for name in ("query_norm", "key_norm"):
        if f"{src}/attn/{name}" in shapes:
          out[f"{dst}/attention/{name}/scale.weights"] = Target(
            f"{src}/attn/{name}", ("projection",), norm
          )
    out[f"{dst}/mlp/gating_linear.weights"] = Target(
      f"{src}/mlp/gate", ("embedding", "neurons")
    )
    out[f"{dst}/mlp/value_linear.weights"] = Target(
      f"{src}/mlp/up", ("embedding", "neurons")
    )
    out[f"{dst}/mlp/out_linear.weights"] = Target(
      f"{src}/mlp/down", ("neurons", "embedding")
    )
    out.update(_gemma4_layer_targets(config, i))
  return out


def _gemma4_global_targets(config: GemmaConfig) -> dict[str, Target]:
  if not config.per_layer_input_dim:
    return {}
  table = ("layers", "per_layer")
  return {
    "per_layer_embedder.embeddings": Target(
      "per_layer_embedder", ("vocabulary", *table)
    ),
    "per_layer_projection.weights": Target(
      "per_layer_projection", ("embedding", *table)
    ),
    "per_layer_projection_norm/scale.weights": Target(
      "per_layer_projection_norm", ("per_layer",)
    ),
  }


def _gemma4_layer_targets(config: GemmaConfig, i: int) -> dict[str, Target]:
  if config.family != "gemma4":
    return {}
  src, dst = f"layer_{i}", f"block_{i}"
  out = {f"{dst}/layer_scalar.weights": Target(f"{src}/layer_scalar", ())}
  if config.per_layer_input_dim:
    for name, axes in (
      ("gate", ("embedding", "per_layer")),
      ("projection", ("per_layer", "embedding")),
    ):
      out[f"{dst}/per_layer_input/{name}.weights"] = Target(
        f"{src}/per_layer_input/{name}", axes
      )
    out[f"{dst}/per_layer_input/norm/scale.weights"] = Target(
      f"{src}/per_layer_input/norm", ("embedding",)
    )
  if config.num_experts:
    for norm in ("post_ffw_norm_1", "moe/router_norm", "moe/pre_norm", "moe/post_norm"):
      out[f"{dst}/{norm}/scale.weights"] = Target(f"{src}/{norm}", ("embedding",))
    for label, name, axes in (
      ("router", "router", ("embedding", "experts")),
      ("per_expert_scale", "per_expert_scale", ("experts",)),
      ("gating", "gate", ("experts", "embedding", "neurons")),
      ("value", "up", ("experts", "embedding", "neurons")),
      ("out", "down", ("experts", "neurons", "embedding")),
    ):
      out[f"{dst}/moe/{label}.weights"] = Target(f"{src}/moe/{name}", axes)
  return out


def penzai_shapes(config: GemmaConfig) -> dict[str, dict[str, int]]:
  """Every Penzai parameter's named shape (axis name -> size), in order."""
  shapes = expected_shapes(config)
  return {
    label: dict(zip(t.axes, t.shape(shapes[t.canonical]), strict=True))
    for label, t in penzai_targets(config).items()
  }


def to_penzai(
  config: GemmaConfig, params: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
  """Maps canonical arrays to Penzai labels with their axis names."""
  return {
    label: (t.apply(np.asarray(params[t.canonical])), t.axes)
    for label, t in penzai_targets(config).items()
  }
