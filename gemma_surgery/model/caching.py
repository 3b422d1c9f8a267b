"""KV-caching conversion that knows Gemma 4's per-layer caches and KV sharing.

Penzai's ``KVCachingTransformerLM.from_uncached`` gives every attention layer
a cache of one model-wide shape. Gemma 4 layers differ (global layers: wider
heads, fewer kv heads), and its KV-shared layers must not cache at all:
`kv_caching_lm` gives each producing layer a cache of its own shape and turns
each `gemma4.SharedKVAttention` into a `gemma4.SharedKVCachingAttention`
holding the very ``StateVariable`` of the layer it reads (``config.kv_source``).
Other models go through Penzai's conversion unchanged.

Every cached attention layer becomes a
`decode_layers.InPlaceKVCachingAttention` (its cache written in place, its
einsums `decode_layers.SingleQueryEinsum`) and the unembedding a
`decode_layers.SingleTokenEmbeddingDecode`: the same computation in a form
XLA:CPU runs faster one token at a time (see `decode_layers`). Key caches
keep Penzai's layout ``{batch, heads..., projection, seq}``, value caches are
``{batch, heads..., seq, projection}``. ``cache_dtype`` stores keys
and values in another dtype than the activations (e.g. bfloat16 beside
float32 activations, halving the bytes a decoding step reads from the cache):
keys and values are rounded into the cache; attention then promotes them back
to the activation dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from penzai import pz
from penzai.models.transformer import sampling_mode

from gemma_surgery import errors
from gemma_surgery.model import (
  build,
  decode_layers,
  gemma4,
  positional_layers,
)

# Exactly these (a subclass may observe or edit the logits).
_SOFT_CAPS = (pz.nn.TanhSoftCap, positional_layers.PositionalTanhSoftCap)
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


def _seq_major(array: pz.nx.NamedArray, seq: str) -> pz.nx.NamedArray:
  """``array`` laid out with ``seq`` just before ``projection`` (if both exist).

  Penzai allocates ``{batch, heads..., projection, seq}`` caches. That suits
  the keys (the query-key product sums over ``projection``, XLA reads each
  position's keys as a row either way) but not the values: the weighted sum
  over ``seq`` then transposes the whole value cache at every step. Named axes
  make the order a layout choice, nothing else.
  """
  names = [n for n in array.named_shape if n != seq]
  if seq not in array.named_shape or "projection" not in names:
    return array
  names.insert(names.index("projection"), seq)
  return array.order_as(*names)


def _in_place(
  attn: pz.nn.KVCachingAttention, dtype: Any
) -> decode_layers.InPlaceKVCachingAttention:
  """``attn`` as a `decode_layers.InPlaceKVCachingAttention`.

  Its (fresh, all-zero) cache in ``dtype``, the values ``seq``-major
  (`_seq_major`), its attention einsums `decode_layers.SingleQueryEinsum`.
  """
  fields = {
    f.name: getattr(attn, f.name)
    for f in dataclasses.fields(attn)
    if f.name != "kv_cache"
  }
  keys, values = attn.kv_cache.value
  cache = pz.StateVariable(
    value=(
      keys.astype(dtype),
      _seq_major(values, attn.sequence_axis).astype(dtype),
    ),
    label=attn.kv_cache.label,
  )
  layer = decode_layers.InPlaceKVCachingAttention(kv_cache=cache, **fields)
  return _single_query_einsums(layer)


def _single_query_einsums(layer: Any) -> Any:
  """``layer`` with its attention einsums as `decode_layers.SingleQueryEinsum`."""
  return (
    pz.select(layer)
    .at(lambda a: (a.query_key_to_attn, a.attn_value_to_output), multiple=True)
    .at_instances_of(pz.nn.NamedEinsum)
    .apply(
      lambda e: decode_layers.SingleQueryEinsum(
        input_axes=e.input_axes, output_axes=e.output_axes
      )
    )
  )


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
    return _single_token_decode(
      pz.select(cached)
      .at_instances_of(pz.nn.KVCachingAttention)
      .apply(lambda attn: _in_place(attn, dtype))
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
    converted[path] = _in_place(converted[path], dtype)
    caches[layer] = converted[path].kv_cache
  for layer, path in enumerate(selection.selected_by_path):
    attn = converted[path]
    if isinstance(attn, gemma4.SharedKVAttention):
      converted[path] = _single_query_einsums(
        gemma4.SharedKVCachingAttention(
          input_to_query=attn.input_to_query,
          query_key_to_attn=attn.query_key_to_attn,
          attn_value_to_output=attn.attn_value_to_output,
          kv_cache=caches[config.kv_source(layer)],
        )
      )
  cached = sampling_mode.KVCachingTransformerLM(
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
  return _single_token_decode(cached)


def _logits_unobserved(body: Any) -> bool:
  """Whether only soft caps follow the unembedding in ``body`` (no surgery).

  Then a prompt's logits are needed at its last position only (see
  `decode_layers.SingleTokenEmbeddingDecode`); a capture, edit or any other
  layer after the unembedding (the ``logits`` site) needs every position.
  """
  sublayers = getattr(body, "sublayers", [])
  found = [i for i, x in enumerate(sublayers) if isinstance(x, pz.nn.EmbeddingDecode)]
  return len(found) == 1 and all(
    type(x) in _SOFT_CAPS for x in sublayers[found[0] + 1 :]
  )


def _single_token_decode(cached: Any) -> Any:
  """``cached`` with `decode_layers.SingleTokenEmbeddingDecode` unembeddings.

  They compute a prompt's logits at its last position only where nothing
  observes the logits (`_logits_unobserved`): the decode loops read only the
  last position (prompts are left-padded).
  """
  last_only = _logits_unobserved(cached.body)
  return (
    pz.select(cached)
    .at_instances_of(pz.nn.EmbeddingDecode)
    .apply(
      lambda layer: decode_layers.SingleTokenEmbeddingDecode(
        table=layer.table, last_position_only=last_only
      )
    )
  )
