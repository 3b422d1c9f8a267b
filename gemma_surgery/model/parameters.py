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
  n, k = config.num_heads, config.num_kv_heads
  d, h, f = config.embedding_dim, config.head_dim, config.mlp_hidden_dim
  shapes = {"embedder": (config.vocab_size, d), "final_norm": (d,)}
  for i in range(config.num_layers):
    p = f"layer_{i}"
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
      norms.append("post_attention_norm")
    if config.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm in norms:
      shapes[f"{p}/{norm}"] = (d,)
    shapes[f"{p}/attn/q"] = (n, d, h)
    shapes[f"{p}/attn/k"] = (k, d, h)
    shapes[f"{p}/attn/v"] = (k, d, h)
    shapes[f"{p}/attn/o"] = (n, h, d)
    if config.use_qk_norm:
      shapes[f"{p}/attn/query_norm"] = (h,)
      shapes[f"{p}/attn/key_norm"] = (h,)
    shapes[f"{p}/mlp/gate"] = (d, f)
    shapes[f"{p}/mlp/up"] = (d, f)
    shapes[f"{p}/mlp/down"] = (f, d)
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
  common, q_only = build.head_axes(config)
  q_axes, q_sizes = (*common, *q_only), (*common.values(), *q_only.values())
  out = {
    "embedder.embeddings": Target("embedder", ("vocabulary", "embedding")),
    "final_norm/scale.weights": Target("final_norm", ("embedding",), "norm"),
  }
  for i in range(config.num_layers):
    src, dst = f"layer_{i}", f"block_{i}"
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
      norms.insert(1, "post_attention_norm")
    if config.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm in norms:
      out[f"{dst}/{norm}/scale.weights"] = Target(
        f"{src}/{norm}", ("embedding",), "norm"
      )
    out[f"{dst}/attention/query.weights"] = Target(
      f"{src}/attn/q", (*q_axes, "embedding", "projection"), "heads", q_sizes
    )
    for name, label in (("k", "key"), ("v", "value")):
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
        out[f"{dst}/attention/{name}/scale.weights"] = Target(
          f"{src}/attn/{name}", ("projection",), "norm"
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
