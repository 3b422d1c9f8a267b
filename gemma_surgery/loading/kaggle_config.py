"""`GemmaConfig` of a Kaggle/Flax checkpoint: shapes plus a named variant.

A Flax checkpoint has no config file. Its shapes give the layer count, the
vocabulary, ``d_model``, the head counts and widths, the MLP width, and which
optional norms exist (post-attention/post-FFW norms: Gemma 2 and 3; QK-norm:
Gemma 3). Everything else (sliding window, soft caps, ``query_pre_attn_scalar``,
RoPE bases and scaling, attention pattern) comes from a published preset:

* ``variant=None``: the one preset (`gemma_surgery.config.preset_names`) whose
  shapes match exactly; e.g. ``gemma3_270m`` and ``gemma_2b`` both have 18
  layers and are told apart by their widths and QK-norm. No match raises
  `ConfigError`.
* ``variant`` given: that preset, if its shapes match. If they differ (custom
  or tiny checkpoints), sizes come from the shapes and the other settings from
  the preset, with a `UserWarning` (it also flags a checkpoint that lost
  layers). The attention pattern is re-derived for the new layer count with
  the preset's period (all global for Gemma 1, every 2nd layer global for
  Gemma 2, every 6th for Gemma 3), and ``query_pre_attn_scalar`` follows the
  preset's rule (``head_dim``, or ``d_model / num_heads`` for the 27B models).
  The optional norms must agree with the variant's family, else
  `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from gemma_surgery import errors
from gemma_surgery.config import (
  GemmaConfig,
  alternating_pattern,
  normalize_variant_name,
  preset,
  preset_names,
)
from gemma_surgery.loading import kaggle_gemma4, kaggle_layout

# Presets whose Flax checkpoints store ``mlp/gating_einsum`` as [2, F, D].
_TRANSPOSED_GATING = ("gemma2_9b", "gemma2_27b")


@dataclasses.dataclass(frozen=True)
class KaggleShapes:
  """What a checkpoint's shapes tell about its architecture."""

  num_layers: int
  vocab_size: int
  embedding_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden_dim: int
  use_qk_norm: bool
  use_post_attn_norm: bool
  use_post_ffw_norm: bool

  @classmethod
  def of_config(cls, config: GemmaConfig) -> KaggleShapes:
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

  def describe(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def _shape(entries: Mapping[str, kaggle_layout.Ref], name: str, rank: int, source):
  if name not in entries:
    raise errors.CheckpointError(
      f"{source}: missing weight 'transformer/{name}', needed to infer the"
      " architecture; the checkpoint may be truncated or not a Gemma model."
    )
  shape = entries[name].shape
  if len(shape) != rank:
    raise errors.CheckpointError(
      f"{source}: {entries[name].key!r} has shape {shape}; expected rank {rank}."
    )
  return shape


def read_shapes(entries: Mapping[str, kaggle_layout.Ref], source: str) -> KaggleShapes:
  """Sizes and optional norms from `kaggle_layout.layout_entries`.

  Raises:
    CheckpointError: No layers, a layer missing in the numbering, or a weight
      needed to infer the sizes is missing or of the wrong rank.
  """
  layers = kaggle_layout.layer_indices(entries)
  if not layers:
    some = sorted(entries)[:5]
    raise errors.CheckpointError(
      f"{source}: no transformer layers (keys like"
      f" 'transformer/layer_0/attn/attn_vec_einsum') found; this is not a"
      f" Gemma Flax checkpoint. Keys seen: {some}."
    )
  missing = sorted(set(range(layers[-1] + 1)) - set(layers))
  if missing:
    raise errors.CheckpointError(
      f"{source}: layer(s) {[f'layer_{i}' for i in missing[:5]]} are missing"
      f" although layer_{layers[-1]} exists; the checkpoint is incomplete."
    )
  vocab, d = _shape(entries, "embedder/input_embedding", 2, source)
  if "layer_0/attn/qkv_einsum" in entries:
    _, n, _, h = _shape(entries, "layer_0/attn/qkv_einsum", 4, source)
    k = n
  else:
    n, _, h = _shape(entries, "layer_0/attn/q_einsum", 3, source)
    kv = entries.get("layer_0/attn/kv_einsum")
    k = kv.shape[1] if kv is not None and len(kv.shape) == 4 else 1
  f = _shape(entries, "layer_0/mlp/linear", 2, source)[0]
  return KaggleShapes(
    num_layers=len(layers),
    vocab_size=vocab,
    embedding_dim=d,
    num_heads=n,
    num_kv_heads=k,
    head_dim=h,
    mlp_hidden_dim=f,
    use_qk_norm="layer_0/attn/_query_norm" in entries,
    use_post_attn_norm="layer_0/post_attention_norm" in entries,
    use_post_ffw_norm="layer_0/post_ffw_norm" in entries,
  )


def _resized(base: GemmaConfig, shapes: KaggleShapes) -> dict[str, Any]:
  """Fields of ``base`` that follow the sizes when the sizes change."""
  n = shapes.num_layers
  kinds = base.attention_types
  if n != base.num_layers:
    if "local" not in kinds:
      kinds = ("global",) * n
    else:
      kinds = alternating_pattern(n, kinds.index("global") + 1)
  scalar = base.query_pre_attn_scalar
  if scalar == base.head_dim:
    scalar = shapes.head_dim
  elif scalar == base.embedding_dim // base.num_heads:
    scalar = shapes.embedding_dim // shapes.num_heads
  return {"attention_types": kinds, "query_pre_attn_scalar": scalar}


def _check_family(base: GemmaConfig, shapes: KaggleShapes, variant: str, source):
  features = (
    ("use_qk_norm", "QK-norm weights (attn/_query_norm, attn/_key_norm)"),
    ("use_post_attn_norm", "post_attention_norm weights"),
    ("use_post_ffw_norm", "post_ffw_norm weights"),
  )
  for field, what in features:
    has, wants = getattr(shapes, field), getattr(base, field)
    if has != wants:
      raise errors.CheckpointError(
        f"{source}: the checkpoint {'has' if has else 'lacks'} {what}, but"
        f" variant {variant!r} is a {base.family} model that"
        f" {'uses' if wants else 'has no'} them; pass the variant of the"
        " right Gemma generation."
      )


def config_from_shapes(
  shapes: KaggleShapes, variant: str | None, source: str = "checkpoint"
) -> GemmaConfig:
  """The config for ``shapes``, completed from a preset (see module doc).

  Raises:
    ConfigError: Unknown variant, or no variant and no preset matches.
    CheckpointError: The optional norms contradict the variant's family.
  """
  if variant is None:
    matches = [n for n in preset_names() if KaggleShapes.of_config(preset(n)) == shapes]
    if len(matches) == 1:
      return preset(matches[0])
    raise errors.ConfigError(
      f"{source}: the checkpoint's shapes ({shapes.describe()}) match"
      f" {'several' if matches else 'no'} published Gemma variant(s)"
      f" {matches or ''}; pass variant= to say which model it is (for a"
      " custom size, the closest variant of its generation gives the"
      " sliding window, soft caps and RoPE settings). Valid variants:"
      f" {', '.join(preset_names())}."
    )
  base = preset(variant)
  _check_family(base, shapes, variant, source)
  if KaggleShapes.of_config(base) == shapes:
    return base
  theirs = dataclasses.asdict(KaggleShapes.of_config(base))
  diffs = [
    f"{k} {theirs[k]}->{v}"
    for k, v in dataclasses.asdict(shapes).items()
    if theirs[k] != v
  ]
  warnings.warn(
    f"{source}: shapes differ from variant {variant!r} ({', '.join(diffs)});"
    " using the checkpoint's sizes with the variant's other settings.",
    UserWarning,
    stacklevel=3,
  )
  sizes = dataclasses.asdict(shapes)
  return base.replace(**sizes, **_resized(base, shapes))


def infer_config_from_kaggle(
  params: Mapping[str, Any], variant: str | None = None
) -> GemmaConfig:
  """Infers the `GemmaConfig` of a Kaggle/Flax Gemma checkpoint tree.

  Args:
    params: The restored orbax tree in the flat, nested or stacked layout (see
      `gemma_surgery.loading.kaggle_layout`; a Gemma 4 tree is matched
      against the Gemma 4 presets, `gemma_surgery.loading.kaggle_gemma4`).
      Leaves only need ``shape`` and ``dtype``, so orbax ``ArrayMetadata`` or
      ``jax.ShapeDtypeStruct`` trees work without reading any weights.
    variant: Preset name such as ``"gemma2_2b"`` or ``"gemma-3-1b-it"``; None
      picks the preset whose shapes match exactly.

  Returns:
    The config (see the module docstring for which fields come from where).

  Raises:
    ConfigError: Unknown variant, or none given and no preset matches.
    CheckpointError: Malformed or incomplete tree, or norms that contradict
      the variant's family.
  """
  entries = kaggle_layout.layout_entries(params, "checkpoint")
  if kaggle_gemma4.is_gemma4(entries):
    return kaggle_gemma4.resolve_config(entries, variant, None, "checkpoint")
  return config_from_shapes(read_shapes(entries, "checkpoint"), variant)


def needs_gating_transpose(variant_or_config: str | GemmaConfig) -> bool:
  """Whether the Flax checkpoint stores ``mlp/gating_einsum`` as ``[2, F, D]``.

  True for Gemma 2 9B/27B and every Gemma 3 model. A config is matched against
  the published presets by its shapes; a custom size falls back to its family
  (Gemma 3: True, else False). Readers only need this when ``D == F``: any
  other gating weight's orientation is read off its shape.

  Raises:
    ConfigError: Unknown variant name.
  """
  if isinstance(variant_or_config, GemmaConfig):
    shapes = KaggleShapes.of_config(variant_or_config)
    for name in preset_names():
      if KaggleShapes.of_config(preset(name)) == shapes:
        return needs_gating_transpose(name)
    return variant_or_config.family == "gemma3"
  name = normalize_variant_name(variant_or_config)
  family = preset(name).family  # Raises ConfigError for unknown names.
  return family == "gemma3" or name in _TRANSPOSED_GATING
