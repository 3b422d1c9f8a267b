"""Penzai layers for what Gemma 4 adds: per-layer embeddings, KV sharing.

Written on Penzai's public API (``pz.nn.Layer``, ``Linear``, ``RMSLayerNorm``,
``EmbeddingTable``); see `gemma_surgery.model.moe` for the mixture of experts
and `gemma_surgery.model.build` for how they are assembled.

Per-layer embeddings (PLE, E2B/E4B). `PerLayerInputs` maps the token ids to
``{batch, seq, layers, per_layer}``::

  ((norm(W_proj · embed(t) / sqrt(D)) + E_ple[t] · sqrt(P)) / sqrt(2)

computed once by the body (`Gemma4Body`) and handed to every block as the side
input ``per_layer_inputs``. At the end of block ``i``, `PerLayerInput` adds
``norm(W_up · (gelu(W_gate · x) * per_layer_inputs[i]))`` to the residual
stream, then `LayerScalar` multiplies it by the block's learned scalar.

KV sharing. The last ``num_kv_shared_layers`` layers compute only queries:
`SharedKVAttention` attends over the keys/values of the last earlier layer of
the same attention kind (``config.kv_source``). That layer's key and value
paths end in a `ShareKV` tap, which files them under ``(kind, "key"|"value")``
in the per-call dict side input ``shared_kv`` that `Gemma4Body` creates fresh
for every call; nothing persists between calls, so the model is stateless.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from penzai import pz

SHARED_KV = "shared_kv"
PER_LAYER_INPUTS = "per_layer_inputs"


@pz.pytree_dataclass
class ShareKV(pz.nn.Layer):
  """Files its input (keys or values of a producer layer) for later layers.

  The identity on its input. Under the uncached forward it stores the input
  in the ``shared_kv`` side input dict under ``(kind, role)``; without that
  side input (e.g. inside a KV-caching model, where consumers read the
  producer's cache) it does nothing.

  Attributes:
    kind: ``"local"`` or ``"global"``.
    role: ``"key"`` or ``"value"``.
  """

  kind: str = dataclasses.field(metadata={"pytree_node": False})
  role: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    slot = side_inputs.get(SHARED_KV)
    if slot is not None:
      slot[(self.kind, self.role)] = x
    return x


@pz.pytree_dataclass
class SharedKVAttention(pz.nn.Layer):
  """Attention of a KV-shared layer: own queries, a producer's keys/values.

  Attributes:
    input_to_query: ``{batch, seq, embedding}`` -> queries (as in
      ``pz.nn.Attention``).
    query_key_to_attn: ``(queries, keys)`` -> attention weights.
    attn_value_to_output: ``(weights, values)`` -> output.
    kind: Attention kind whose shared keys/values are read.
  """

  input_to_query: pz.nn.Layer
  query_key_to_attn: pz.nn.Layer
  attn_value_to_output: pz.nn.Layer
  kind: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    slot = side_inputs.get(SHARED_KV) or {}
    if (self.kind, "key") not in slot:
      raise ValueError(
        f"No shared {self.kind} keys/values: a KV-shared layer runs inside the"
        " Gemma 4 body after its producer layer."
      )
    key, value = slot[(self.kind, "key")], slot[(self.kind, "value")]
    query = self.input_to_query(x, **side_inputs)
    attn = self.query_key_to_attn((query, key), **side_inputs)
    return self.attn_value_to_output((attn, value), **side_inputs)


@pz.pytree_dataclass
class SharedKVCachingAttention(pz.nn.Layer):
  """`SharedKVAttention` in KV-caching mode: reads its producer's cache.

  Holds the *same* ``pz.StateVariable`` as the producer layer's
  ``pz.nn.KVCachingAttention``, so a KV-shared layer allocates no cache of its
  own; the producer (an earlier layer) has already written this step's keys
  and values when this layer runs. Built by
  `gemma_surgery.model.caching.kv_caching_lm`.

  Attributes:
    input_to_query: As in `SharedKVAttention`.
    query_key_to_attn: Masks use ``kv_token_positions`` (cached mode).
    attn_value_to_output: As in `SharedKVAttention`.
    kv_cache: The producer's ``(keys, values)`` cache variable.
  """

  input_to_query: pz.nn.Layer
  query_key_to_attn: pz.nn.Layer
  attn_value_to_output: pz.nn.Layer
  kv_cache: pz.StateVariable

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    key, value = self.kv_cache.value
    query = self.input_to_query(x, **side_inputs)
    attn = self.query_key_to_attn((query, key), **side_inputs)
    return self.attn_value_to_output((attn, value), **side_inputs)


@pz.pytree_dataclass
class LayerScalar(pz.nn.Layer):
  """Multiplies by a learned scalar (HF ``layer_scalar``, Flax ``skip_scale``).

  Attributes:
    scale: A parameter with no axes.
  """

  scale: pz.ParameterLike[pz.nx.NamedArray]

  @classmethod
  def from_config(cls, name: str, init_base_rng: Any, dtype: Any) -> LayerScalar:
    return cls(
      scale=pz.nn.make_parameter(
        f"{name}.weights",
        init_base_rng,
        lambda _key: pz.nx.wrap(jnp.ones((), dtype)),
      )
    )

  def __call__(self, x: pz.nx.NamedArray, **_side_inputs) -> pz.nx.NamedArray:
    return x * self.scale.value.astype(x.dtype)


@pz.pytree_dataclass
class PerLayerInputSource(pz.nn.Layer):
  """Layer ``layer``'s slice of the ``per_layer_inputs`` side input.

  Ignores its input; returns ``{batch, seq, per_layer}``. The site
  ``per_layer.input`` anchors after it.

  Attributes:
    layer: Block index.
  """

  layer: int = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, _x: Any, **side_inputs) -> pz.nx.NamedArray:
    return side_inputs[PER_LAYER_INPUTS][{"layers": self.layer}]


@pz.pytree_dataclass
class PerLayerInput(pz.nn.Layer):
  """``x + norm(up(act(gate(x)) * source()))``: a block's per-layer input.

  Attributes:
    gate: ``{embedding}`` -> ``{per_layer}``, through ``activation``.
    source: A Sequential holding a `PerLayerInputSource`, giving
      ``{per_layer}`` (the site ``per_layer.input`` anchors at its last item).
    projection: ``{per_layer}`` -> ``{embedding}``.
    norm: RMSNorm over ``embedding``.
  """

  gate: pz.nn.Layer
  source: pz.nn.Layer
  projection: pz.nn.Layer
  norm: pz.nn.Layer

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    gated = self.gate(x, **side_inputs) * self.source(x, **side_inputs)
    return x + self.norm(self.projection(gated, **side_inputs), **side_inputs)


@pz.pytree_dataclass
class PerLayerInputs(pz.nn.Layer):
  """Token ids ``{batch, seq}`` -> ``{batch, seq, layers, per_layer}``.

  Attributes:
    table: The main (tied) embedding table, shared with the body.
    per_layer_table: ``{vocabulary, layers, per_layer}`` embeddings.
    projection: ``{embedding}`` -> ``{layers, per_layer}``.
    norm: RMSNorm over ``per_layer``.
    embedding_dim: ``D`` (static).
    per_layer_dim: ``P`` (static).
    dtype: Activation dtype name (static).
  """

  table: pz.nn.EmbeddingTable
  per_layer_table: pz.nn.EmbeddingTable
  projection: pz.nn.Layer
  norm: pz.nn.Layer
  embedding_dim: int = dataclasses.field(metadata={"pytree_node": False})
  per_layer_dim: int = dataclasses.field(metadata={"pytree_node": False})
  dtype: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, tokens: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    act = jnp.dtype(self.dtype)
    embed = pz.nn.EmbeddingLookup(self.table)(tokens).astype(act)
    embed = embed * jnp.sqrt(self.embedding_dim).astype(act)
    proj = self.projection(embed, **side_inputs)
    proj = self.norm(proj * jnp.asarray(self.embedding_dim**-0.5, act), **side_inputs)
    own = pz.nn.EmbeddingLookup(self.per_layer_table)(tokens).astype(act)
    own = own * jnp.sqrt(self.per_layer_dim).astype(act)
    return (proj + own) * jnp.asarray(2.0**-0.5, act)


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class Gemma4Body(pz.nn.Sequential):
  """The body ``Sequential`` of a Gemma 4 model, with its per-call side inputs.

  Runs its sublayers like ``pz.nn.Sequential`` after adding two side inputs:
  a fresh ``shared_kv`` dict (KV sharing) and, when the model has per-layer
  embeddings, ``per_layer_inputs`` computed from the token ids it receives.

  Attributes:
    per_layer_inputs: `PerLayerInputs`, or None without per-layer embeddings.
  """

  per_layer_inputs: pz.nn.Layer | None = None

  def __call__(self, x: Any, **side_inputs) -> Any:
    side_inputs = {**side_inputs, SHARED_KV: {}}
    if self.per_layer_inputs is not None:
      side_inputs[PER_LAYER_INPUTS] = self.per_layer_inputs(x, **side_inputs)
    return super().__call__(x, **side_inputs)
