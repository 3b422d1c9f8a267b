"""Penzai layers for one decoding step at a time, as XLA:CPU runs them fast.

`gemma_surgery.model.caching.kv_caching_lm` puts these in place of Penzai's
layers when it converts a model for KV-cached decoding. Each computes what the
layer it replaces computes (same axes and dtypes; sums may round differently
within float32), in a form that XLA:CPU turns into fewer, cheaper kernels when
one token per row goes through the model:

* `InPlaceKVCachingAttention` writes the KV cache with one plain
  ``dynamic_update_slice`` (`write_seq`), updated in place in the decode loop;
  Penzai's vmapped update lowers to a scatter, and XLA then copies every cache
  at every step.
* `SingleQueryEinsum` contracts a single query with the cache by multiplying
  and summing (one fused loop) instead of a batched ``dot_general`` (a
  library call with layout copies of the cache).
* `SingleTokenEmbeddingDecode` computes one token's logits as ``x @ table.T``:
  XLA fuses the transpose into the product and emits its own matrix-vector
  loop, which reads the ``{vocabulary, embedding}`` table about 1.5x faster
  than the library matrix product Penzai's contraction becomes.

Every layer falls back to Penzai's computation when more than one token per
row goes through (the prompt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.model import positional, positional_layers


def write_seq(
  cache: pz.nx.NamedArray, new: pz.nx.NamedArray, axis: str, start: Any
) -> pz.nx.NamedArray:
  """``new`` written into ``cache`` at ``start`` along ``axis``, in place.

  One plain ``dynamic_update_slice`` on the cache's own data layout. Penzai's
  ``nmap(dynamic_update_slice)`` vmaps over the other axes, which JAX lowers to
  a scatter; XLA then keeps extra copies of every cache in the decode loop
  (one per consumer layout) instead of updating the carried buffer in place.

  Args:
    cache: ``{..., axis: N}`` NamedArray (no positional axes).
    new: ``{..., axis: n}`` with the same other axes (n <= N), cast to the
      cache's dtype.
    axis: The axis written along (``seq``).
    start: Int scalar (may be traced) index along ``axis``.
  """
  names = tuple(cache.named_shape)
  data = cache.unwrap(*names)
  update = new.unwrap(*names).astype(data.dtype)
  index = tuple(jnp.asarray(start if name == axis else 0, jnp.int32) for name in names)
  return pz.nx.wrap(jax.lax.dynamic_update_slice(data, update, index)).tag(*names)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class SingleQueryEinsum(positional_layers.PositionalNamedEinsum):
  """A named einsum that multiplies and sums for a single query.

  When the output's ``seq`` axis has size 1 (one decoding step), the two
  inputs are multiplied (broadcast by axis name) and summed over the
  contracted axes: XLA fuses that into one small loop, where a batched
  ``dot_general`` becomes a library call (and layout copies of the KV cache)
  costing tens of microseconds for a few thousand multiply-adds. Otherwise
  (the prompt) it is the plain einsum. Same axes and dtype as the einsum; the
  sums may round differently (float32 rounding).
  """

  def __call__(
    self, arrays: tuple[pz.nx.NamedArray, ...], **side_inputs: Any
  ) -> pz.nx.NamedArray:
    out = positional.index_map(self.output_axes)
    specs = [positional.index_map(spec) for spec in self.input_axes]
    sizes = {
      spec[name]: size
      for arr, spec in zip(arrays, specs, strict=True)
      for name, size in arr.named_shape.items()
      if name in spec
    }
    if len(arrays) != 2 or sizes.get(out.get("seq")) != 1:
      return super().__call__(arrays, **side_inputs)
    dtype = jnp.result_type(*(arr.dtype for arr in arrays))
    a, b = (
      arr.untag(*(n for n in arr.named_shape if n in spec)).tag(
        *(spec[n] for n in arr.named_shape if n in spec)
      )
      for arr, spec in zip(arrays, specs, strict=True)
    )
    product = positional.elementwise(
      lambda x, y: x.astype(dtype) * y.astype(dtype), a, b
    )
    summed = [i for i in sizes if i not in out.values()]
    if product is None:  # positional axes: Penzai's named-axis arithmetic
      product = a.astype(dtype) * b.astype(dtype)
      result = pz.nx.nmap(jnp.sum)(product.untag(*summed))
    else:
      result = positional.reduce_sum(product, summed)
    return result.untag(*out.values()).tag(*out)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class InPlaceKVCachingAttention(pz.nn.KVCachingAttention):
  """``pz.nn.KVCachingAttention`` writing its cache in place, in any dtype.

  Same computation as Penzai's layer: keys and values (axes: the batch axes,
  the head axes, ``seq``, ``projection``) are written at ``cache_end_index``
  (side input) with `write_seq` (one ``dynamic_update_slice``, no scatter),
  cast to the cache's dtype first (a no-op when it is the activations'); the
  queries and the attention arithmetic keep the activation dtype (the einsums
  promote the cached values).
  """

  def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
    end = side_inputs[self.kv_cache_end_index_key]
    old_keys, old_values = self.kv_cache.value
    query = self.input_to_query(x, **side_inputs)
    written = (
      write_seq(old_keys, self.input_to_key(x, **side_inputs), self.sequence_axis, end),
      write_seq(
        old_values, self.input_to_value(x, **side_inputs), self.sequence_axis, end
      ),
    )
    self.kv_cache.value = written
    attn = self.query_key_to_attn((query, written[0]), **side_inputs)
    return self.attn_value_to_output((attn, written[1]), **side_inputs)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class SingleTokenEmbeddingDecode(pz.nn.EmbeddingDecode):
  """``pz.nn.EmbeddingDecode`` computing one token's logits as ``x @ table.T``.

  When the input's axes besides the table's (batch, ``seq``) hold a single
  token, the logits are ``x @ table.T`` on plain arrays (``table`` as
  ``[vocabulary, embedding]``). XLA:CPU fuses that transpose into the product
  and emits its own matrix-vector loop over the table's rows, where Penzai's
  contraction becomes a library matrix product reading the table at about
  two thirds of the speed. Otherwise Penzai's contraction.

  With ``last_position_only`` a prompt (``seq`` longer than 1) gets logits
  for its last position only (``seq`` of size 1): decoding reads nothing
  else, and a ``{batch, seq, vocabulary}`` array for the whole prompt is
  ``seq × vocabulary`` floats per row (512 MiB for 512 tokens of a 262k
  vocabulary). The KV-cache conversion sets it only where nothing observes
  the logits (no capture or edit after the unembedding) and prompts are
  left-padded, so the last position is every row's last prompt token.

  Attributes:
    last_position_only: Static; see above.
  """

  last_position_only: bool = dataclasses.field(
    default=False, metadata={"pytree_node": False}
  )

  def __call__(
    self, out_embeddings: pz.nx.NamedArray, **side_inputs: Any
  ) -> pz.nx.NamedArray:
    if self.last_position_only and out_embeddings.named_shape.get("seq", 1) > 1:
      out_embeddings = out_embeddings[{"seq": pz.slice[-1:]}]
    table = self.table.embeddings.value
    vocab = self.table.vocabulary_axis
    inner = [name for name in table.named_shape if name != vocab]
    outer = {
      name: size
      for name, size in out_embeddings.named_shape.items()
      if name not in inner
    }
    if math.prod(outer.values()) != 1 or out_embeddings.positional_shape:
      return super().__call__(out_embeddings, **side_inputs)
    x = out_embeddings.unwrap(*outer, *inner).reshape(1, -1)
    rows = table.unwrap(vocab, *inner).reshape(table.named_shape[vocab], -1)
    logits = x @ rows.T
    return pz.nx.wrap(logits.reshape(*outer.values(), -1)).tag(*outer, vocab)
