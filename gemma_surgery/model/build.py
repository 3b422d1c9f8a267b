"""Builds a Penzai Gemma model from a `GemmaConfig`.

The tree is made of Penzai 0.2.5's public layers (``pz.nn.Attention``,
``RMSLayerNorm``, ``Linear``, ``TransformerBlock``…), so every Penzai tool
(selection, KV-cache conversion, treescope) works on it unchanged. Two small
layers add what Penzai 0.2.5 lacks for Gemma 3: `ScaledRoPE` (per-layer RoPE
base *and* linear position scaling) and QK-norm, which is a plain
``RMSLayerNorm`` across ``projection`` inserted between the q/k projections and
RoPE.

Axis names follow Penzai: ``batch``, ``seq``, ``kv_seq``, ``embedding``,
``projection``, ``neurons``, ``vocabulary``; attention heads are ``heads``
(MHA), ``query_heads`` (MQA) or ``head_groups`` × ``query_heads`` (GQA).
Side inputs: ``token_positions`` (``{batch, seq}`` int, −1 marks padding).

Parameter labels are ``transformer/embedder.embeddings``,
``transformer/block_{i}/attention/{query,key,value,output}.weights``,
``transformer/block_{i}/attention/{query,key}_norm/scale.weights``,
``transformer/block_{i}/{pre,post}_{attention,ffw}_norm/scale.weights``,
``transformer/block_{i}/mlp/{gating,value,out}_linear.weights`` and
``transformer/final_norm/scale.weights``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors, validation
from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import (
  build_gemma4,
  gemma4,
  positional,
  positional_layers,
  primitives,
)

# The value used by the reference implementation for masked-out logits.
MASKED_OUT_VALUE = -2.3819763e38


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class ScaledRoPE(pz.nn.ApplyRoPE):
  """Rotary position embedding with linear position scaling.

  Identical to ``pz.nn.ApplyRoPE`` except that positions are divided by
  ``scale_factor`` first (Hugging Face's ``rope_type="linear"``), which Gemma 3
  4B/12B/27B use on their global layers.

  With ``proportion < 1`` only the first ``int(proportion * head_dim // 2)``
  frequencies rotate and the others are left unrotated (Hugging Face's
  ``proportional`` RoPE with ``partial_rotary_factor``, Gemma 4's global
  layers): the frequencies keep their full-width spacing ``base ** (-2j / H)``.

  Attributes:
    scale_factor: Positions are divided by this before computing the angles.
    proportion: Fraction of the head's dimensions that rotate.
  """

  scale_factor: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})
  proportion: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})

  def _apply_1d(self, input_slice: jax.Array, position: jax.Array) -> jax.Array:
    scaled = position.astype(jnp.float32) / self.scale_factor
    if self.proportion == 1.0:
      return super()._apply_1d(input_slice, scaled)
    [head_dim] = input_slice.shape
    index = jnp.arange(head_dim // 2)
    rotated = int(self.proportion * head_dim // 2)
    angle = scaled / self.max_wavelength ** (2 * index / head_dim)
    angle = jnp.where(index < rotated, angle, 0.0)
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    first, second = jnp.split(input_slice, 2)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin])

  def __call__(self, inputs: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    rotated = positional.rotate(
      inputs,
      side_inputs[self.positions_input_name],
      self.embedding_axis,
      self.max_wavelength,
      self.scale_factor,
      self.proportion,
    )
    return super().__call__(inputs, **side_inputs) if rotated is None else rotated


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class GemmaTransformerLM(model_parts.TransformerLM):
  """A Penzai ``TransformerLM`` that also carries its `GemmaConfig`.

  It is a subclass, so Penzai's tooling (``KVCachingTransformerLM``
  conversion, selections on ``TransformerLM``) treats it as any Penzai LM.

  Called on a ``{batch, seq}`` (or ``{seq}``) NamedArray of token ids, it
  returns ``{batch, seq, vocabulary}`` logits. When the ids are concrete (not
  traced under ``jit``) they are checked against the vocabulary first, since
  JAX would otherwise clamp out-of-range ids silently.

  Attributes:
    config: The architecture (static).
  """

  config: GemmaConfig = dataclasses.field(default=None, metadata={"pytree_node": False})

  def __call__(self, tokens: pz.nx.NamedArray, **side_inputs) -> Any:
    if self.config is not None:
      check_concrete_token_ids(tokens, self.config.vocab_size)
    return super().__call__(tokens, **side_inputs)


def check_concrete_token_ids(tokens: Any, vocab_size: int) -> None:
  """`validation.check_token_ids`, skipping traced values (inside ``jit``)."""
  data = tokens.data_array if isinstance(tokens, pz.nx.NamedArray) else tokens
  if not isinstance(data, jax.core.Tracer):
    validation.check_token_ids(tokens, vocab_size)


def head_axes(
  config: GemmaConfig, layer: int | None = None
) -> tuple[dict[str, int], dict[str, int]]:
  """Penzai's head axes: ``(common_head_axes, query_only_head_axes)``.

  Args:
    config: The architecture.
    layer: A block index, for Gemma 4 whose global layers may have fewer kv
      heads; None gives the model-wide (local-layer) axes.
  """
  kv = config.num_kv_heads if layer is None else config.layer_kv_heads(layer)
  if kv == config.num_heads:
    return {"heads": config.num_heads}, {}
  if kv == 1:
    return {}, {"query_heads": config.num_heads}
  return {"head_groups": kv}, {"query_heads": config.num_heads // kv}


gelu_tanh = primitives.gelu_tanh
_dtype = primitives.dtype
_rms_norm = primitives.rms_norm
_linear = primitives.linear


def build_attention(
  name: str, rng: jax.Array | None, config: GemmaConfig, layer: int
) -> pz.nn.Attention | gemma4.SharedKVAttention:
  """Builds the attention sublayer of block ``layer``.

  Gemma 4 layers add: a per-layer head width and kv head count, values that
  are the RMS-standardized key projection (``k_eq_v``) and RMS-standardized
  values in general, `ShareKV` taps on the keys/values of a layer whose
  keys/values later layers reuse, and `SharedKVAttention` (queries only) on
  those later layers.
  """
  common, q_only = head_axes(config, layer)
  common_ix = {ax: ax for ax in common}
  q_ix = {ax: ax for ax in q_only}
  d = {"embedding": config.embedding_dim}
  proj = {"projection": config.layer_head_dim(layer)}
  act = _dtype(config.compute_dtype)
  kind = config.attention_types[layer]

  def rope():
    return ScaledRoPE(
      embedding_axis="projection",
      max_wavelength=config.rope_base(layer),
      positions_input_name="token_positions",
      scale_factor=config.rope_scale(layer),
      proportion=config.rope_proportion(layer),
    )

  query = [_linear(f"{name}/query", rng, d, {**common, **q_only, **proj}, config)]
  key_linear = _linear(f"{name}/key", rng, d, {**common, **proj}, config)
  key: list[pz.nn.Layer] = [key_linear]
  if config.use_qk_norm:
    query.append(_rms_norm(f"{name}/query_norm", rng, proj, config))
    key.append(_rms_norm(f"{name}/key_norm", rng, proj, config))
  query += [
    rope(),
    positional_layers.PositionalConstantRescale(by=jnp.array(config.query_scale, act)),
  ]
  key.append(rope())
  if config.is_k_eq_v(layer):  # the same weights (one parameter) as the keys
    value = [dataclasses.replace(key_linear)]
  else:
    value = [_linear(f"{name}/value", rng, d, {**common, **proj}, config)]
  if config.family == "gemma4":
    eps = config.rms_norm_eps
    value.append(
      positional.PositionalRMSStandardize(across=("projection",), epsilon=eps)
    )
  if config.kv_consumers(layer):
    key.append(gemma4.ShareKV(kind=kind, role="key"))
    value.append(gemma4.ShareKV(kind=kind, role="value"))

  scores = [
    positional_layers.PositionalNamedEinsum(
      (
        {"seq": "tq", **common_ix, **q_ix, "projection": "p"},
        {"seq": "tkv", **common_ix, "projection": "p"},
      ),
      {"seq": "tq", **common_ix, **q_ix, "kv_seq": "tkv"},
    )
  ]
  if config.attn_logits_soft_cap is not None:
    scores.append(
      positional_layers.PositionalTanhSoftCap(
        soft_cap=jnp.array(config.attn_logits_soft_cap, act)
      )
    )
  masked = jnp.array(MASKED_OUT_VALUE, act)
  if config.is_local(layer):
    scores.append(
      positional_layers.PositionalSlidingWindowMask(
        sliding_window_size=config.sliding_window, masked_out_value=masked
      )
    )
  else:
    scores.append(positional_layers.PositionalCausalMask(masked_out_value=masked))
  scores.append(positional_layers.PositionalSoftmax("kv_seq"))
  output = pz.nn.Sequential(
    [
      positional_layers.PositionalNamedEinsum(
        (
          {"seq": "tq", **common_ix, **q_ix, "kv_seq": "tkv"},
          {"seq": "tkv", **common_ix, "projection": "p"},
        ),
        {"seq": "tq", **common_ix, **q_ix, "projection": "p"},
      ),
      _linear(f"{name}/output", rng, {**common, **q_only, **proj}, d, config),
    ]
  )
  if config.is_kv_shared(layer):
    return gemma4.SharedKVAttention(
      input_to_query=pz.nn.Sequential(query),
      query_key_to_attn=pz.nn.Sequential(scores),
      attn_value_to_output=output,
      kind=kind,
    )
  return pz.nn.Attention(
    input_to_query=pz.nn.Sequential(query),
    input_to_key=pz.nn.Sequential(key),
    input_to_value=pz.nn.Sequential(value),
    query_key_to_attn=pz.nn.Sequential(scores),
    attn_value_to_output=output,
  )


def build_feedforward(
  name: str, rng: jax.Array | None, config: GemmaConfig, layer: int = 0
) -> model_parts.TransformerFeedForward:
  """GeGLU MLP: ``out(gelu_tanh(gate(x)) * value(x))``, layer ``layer``'s width."""
  d = {"embedding": config.embedding_dim}
  f = {"neurons": config.layer_mlp_dim(layer)}
  return model_parts.TransformerFeedForward(
    [
      positional_layers.PositionalBranchAndMultiplyTogether(
        branches=[
          pz.nn.NamedGroup(
            "gate",
            [
              _linear(f"{name}/gating_linear", rng, d, f, config),
              positional_layers.PositionalElementwise(gelu_tanh),
            ],
          ),
          _linear(f"{name}/value_linear", rng, d, f, config),
        ]
      ),
      _linear(f"{name}/out_linear", rng, f, d, config),
    ]
  )


def build_block(
  name: str, rng: jax.Array | None, config: GemmaConfig, layer: int
) -> model_parts.TransformerBlock:
  """One transformer block: attention then MLP, each in a ``Residual``."""
  d = {"embedding": config.embedding_dim}
  attn = [
    _rms_norm(f"{name}/pre_attention_norm", rng, d, config),
    build_attention(f"{name}/attention", rng, config, layer),
  ]
  if config.use_post_attn_norm:
    attn.append(_rms_norm(f"{name}/post_attention_norm", rng, d, config))
  ffw = [
    _rms_norm(f"{name}/pre_ffw_norm", rng, d, config),
    build_feedforward(f"{name}/mlp", rng, config, layer),
  ]
  if config.uses_moe:  # Gemma 4 26B-A4B: dense MLP + mixture of experts.
    ffw.append(_rms_norm(f"{name}/post_ffw_norm_1", rng, d, config))
    experts = build_gemma4.build_moe(name, rng, config)
    ffw = [pz.nn.BranchAndAddTogether([pz.nn.Sequential(ffw), experts])]
  if config.use_post_ffw_norm:
    ffw.append(_rms_norm(f"{name}/post_ffw_norm", rng, d, config))
  sublayers: list[pz.nn.Layer] = [
    positional_layers.PositionalResidual(pz.nn.Sequential(attn)),
    positional_layers.PositionalResidual(pz.nn.Sequential(ffw)),
  ]
  sublayers += build_gemma4.block_extras(name, rng, config, layer)
  return model_parts.TransformerBlock(sublayers=sublayers)


def build_model(
  config: GemmaConfig,
  init_base_rng: jax.Array | None = None,
  name: str = "transformer",
) -> GemmaTransformerLM:
  """Builds a Gemma model.

  Args:
    config: The architecture.
    init_base_rng: RNG to initialize random parameters, or None to leave
      parameter slots to be bound with ``pz.bind_variables`` (what the loaders
      do).
    name: Prefix of every parameter label.

  Returns:
    A `GemmaTransformerLM` mapping ``{batch, seq}`` token ids to
    ``{batch, seq, vocabulary}`` logits.
  """
  if not config.tie_embeddings:
    raise errors.ConfigError(
      "Untied embeddings are not a Gemma architecture; tie_embeddings must be True."
    )
  act = _dtype(config.compute_dtype)
  table = pz.nn.EmbeddingTable.from_config(
    name=f"{name}/embedder",
    init_base_rng=init_base_rng,
    vocab_size=config.vocab_size,
    embedding_axes={"embedding": config.embedding_dim},
    dtype=_dtype(config.parameter_dtype),
  )
  layers: list[pz.nn.Layer] = [pz.nn.EmbeddingLookup(table)]
  if config.compute_dtype != config.parameter_dtype:
    layers.append(pz.nn.CastToDType(act))
  layers.append(
    positional_layers.PositionalConstantRescale(
      by=jnp.sqrt(config.embedding_dim).astype(act)
    )
  )
  for i in range(config.num_layers):
    layers.append(build_block(f"{name}/block_{i}", init_base_rng, config, i))
  layers.append(
    _rms_norm(
      f"{name}/final_norm",
      init_base_rng,
      {"embedding": config.embedding_dim},
      config,
    )
  )
  layers.append(pz.nn.EmbeddingDecode(table))
  if config.final_logit_softcap is not None:
    layers.append(
      positional_layers.PositionalTanhSoftCap(
        soft_cap=jnp.array(config.final_logit_softcap, act)
      )
    )
  common, q_only = head_axes(config)
  if config.family == "gemma4":
    body = gemma4.Gemma4Body(
      sublayers=layers,
      per_layer_inputs=(
        build_gemma4.build_per_layer_inputs(name, init_base_rng, config, table)
        if config.per_layer_input_dim
        else None
      ),
    )
  else:
    body = pz.nn.Sequential(layers)
  return GemmaTransformerLM(
    body=body,
    metadata=model_parts.TransformerMetadata(
      common_head_axes=common,
      query_only_head_axes=q_only,
      embedding_dim=config.embedding_dim,
      projection_dim=config.head_dim,
      mlp_hidden_dim=config.mlp_hidden_dim,
      vocab_size=config.vocab_size,
      activation_dtype=act,
    ),
    config=config,
  )
