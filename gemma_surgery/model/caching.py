"""KV-caching conversion that knows Gemma 4's per-layer caches and KV sharing.

Penzai's ``KVCachingTransformerLM.from_uncached`` gives every attention layer
a cache of one model-wide shape. Gemma 4 layers differ (global layers: wider
heads, fewer kv heads), and its KV-shared layers must not cache at all:
`kv_caching_lm` gives each producing layer a cache of its own shape and turns
each `gemma4.SharedKVAttention` into a `gemma4.SharedKVCachingAttention`
holding the very ``StateVariable`` of the layer it reads (``config.kv_source``).
Other models go through Penzai's conversion unchanged.

``cache_dtype`` stores keys and values in another dtype than the activations
(e.g. bfloat16 beside float32 activations, halving the bytes a decoding step
reads from the cache): `CastingKVCachingAttention` rounds each step's keys and
values into the cache; attention then promotes them back to the activation
dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import sampling_mode

from gemma_surgery import errors
from gemma_surgery.model import build, gemma4

_MASKS = pz.nn.ApplyCausalAttentionMask | pz.nn.ApplyCausalSlidingWindowAttentionMask


def _cached_masks(layer: Any) -> Any:
  """Masks of a cached layer compare queries with ``kv_token_positions``."""
  return (
    pz.select(layer)
    .at_instances_of(_MASKS)
    .apply(
      lambda m: dataclasses.replace(m, kv_positions_input_name="kv_token_positions")
    )
  )


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class CastingKVCachingAttention(pz.nn.KVCachingAttention):
  """``pz.nn.KVCachingAttention`` whose cache holds another dtype.

  Keys and values (axes: the batch axes, the head axes, ``seq``,
  ``projection``) are cast to the cache's dtype before they are written at
  ``cache_end_index`` (side input, as in Penzai); the queries and the
  attention arithmetic keep the activation dtype (the einsums promote the
  cached values).
  """

  def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
    end = side_inputs[self.kv_cache_end_index_key]
    old_keys, old_values = self.kv_cache.value
    query = self.input_to_query(x, **side_inputs)
    written = []
    for old, new in (
      (old_keys, self.input_to_key(x, **side_inputs)),
      (old_values, self.input_to_value(x, **side_inputs)),
    ):
      new = new.astype(old.dtype).untag(self.sequence_axis)
      update = pz.nx.nmap(jax.lax.dynamic_update_slice)
      written.append(
        update(old.untag(self.sequence_axis), new, (end,)).tag(self.sequence_axis)
      )
    self.kv_cache.value = tuple(written)
    attn = self.query_key_to_attn((query, written[0]), **side_inputs)
    return self.attn_value_to_output((attn, written[1]), **side_inputs)


def _with_cache_dtype(
  attn: pz.nn.KVCachingAttention, dtype: Any
) -> pz.nn.KVCachingAttention:
  """``attn`` with its (fresh, all-zero) cache stored in ``dtype``."""
  if jnp.dtype(dtype) == attn.kv_cache.value[0].dtype:
    return attn
  fields = {
    f.name: getattr(attn, f.name)
    for f in dataclasses.fields(attn)
    if f.name != "kv_cache"
  }
  cache = pz.StateVariable(
    value=tuple(a.astype(dtype) for a in attn.kv_cache.value),
    label=attn.kv_cache.label,
  )
  return CastingKVCachingAttention(kv_cache=cache, **fields)


def kv_caching_lm(
  uncached: Any,
  cache_len: int,
  batch_axes: dict[str, int],
  pad_id: int = 0,
  variable_name_prefix: str = "sampler",
  cache_dtype: Any = None,
) -> sampling_mode.KVCachingTransformerLM:
  """``KVCachingTransformerLM.from_uncached``, Gemma 4 aware (same arguments).

  Args:
    uncached: A Penzai ``TransformerLM`` (patched or not).
    cache_len: Length of the key/value caches.
    batch_axes: Batch axis names and sizes.
    pad_id: Padding token id.
    variable_name_prefix: Prefix of the cache variables' labels
      (``{prefix}/cache_{layer}``).
    cache_dtype: dtype the key/value caches are stored in (None: the
      activation dtype, as in Penzai).

  Raises:
    SurgeryError: If a Gemma 4 model's attention layers can't be matched to
      its blocks one to one.
  """
  config = getattr(uncached, "config", None)
  dtype = cache_dtype or uncached.metadata.activation_dtype
  if config is None or config.family != "gemma4":
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(
      uncached,
      cache_len=cache_len,
      batch_axes=batch_axes,
      pad_id=pad_id,
      variable_name_prefix=variable_name_prefix,
    )
    return (
      pz.select(cached)
      .at_instances_of(pz.nn.KVCachingAttention)
      .apply(lambda attn: _with_cache_dtype(attn, dtype))
    )
  selection = pz.select(uncached.body).at_instances_of(
    pz.nn.Attention | gemma4.SharedKVAttention
  )
  if selection.count() != config.num_layers:
    raise errors.SurgeryError(
      f"Expected one attention layer per block ({config.num_layers}), found"
      f" {selection.count()}; cannot build the Gemma 4 KV caches."
    )
  converted, caches = {}, {}
  for layer, (path, attn) in enumerate(selection.selected_by_path.items()):
    attn = _cached_masks(attn)
    if isinstance(attn, gemma4.SharedKVAttention):
      converted[path] = attn  # linked below, once its producer is converted
      continue
    common, _ = build.head_axes(config, layer)
    converted[path] = pz.nn.KVCachingAttention.from_uncached(
      attn,
      cache_len=cache_len,
      cached_axes={
        **batch_axes,
        **common,
        "projection": config.layer_head_dim(layer),
      },
      cache_dtype=uncached.metadata.activation_dtype,
      sequence_axis="seq",
      cache_end_index_key="cache_end_index",
      cache_label=f"{variable_name_prefix}/cache_{layer}",
    )
    converted[path] = _with_cache_dtype(converted[path], dtype)
    caches[layer] = converted[path].kv_cache
  for layer, path in enumerate(selection.selected_by_path):
    attn = converted[path]
    if isinstance(attn, gemma4.SharedKVAttention):
      converted[path] = gemma4.SharedKVCachingAttention(
        input_to_query=attn.input_to_query,
        query_key_to_attn=attn.query_key_to_attn,
        attn_value_to_output=attn.attn_value_to_output,
        kv_cache=caches[config.kv_source(layer)],
      )
  return sampling_mode.KVCachingTransformerLM(
    metadata=uncached.metadata,
    cache_len=cache_len,
    batch_axes=batch_axes,
    pad_id=pad_id,
    previous_tokens=pz.StateVariable(
      value=pz.nx.zeros({**batch_axes, "seq": cache_len}, dtype="int32"),
      label=f"{variable_name_prefix}/previous_tokens",
    ),
    cache_end_index=pz.StateVariable(
      value=0, label=f"{variable_name_prefix}/cache_end_index"
    ),
    body=selection.set_by_path(converted),
  )
