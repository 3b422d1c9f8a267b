"""Top-k and top-p masks over a whole vocabulary, without sorting it.

The rank order is by logit, ties broken by the lower token id (a stable
descending sort's order). A token is in a "prefix by weight" if the summed
weight of the tokens ranked strictly above it is below a limit: with weight 1
and limit ``k`` that is top-k; with the probabilities and limit ``p`` it is
the nucleus. `prefix_mask` finds the boundary logit by bisecting on the
float's bit pattern (32 masked sums over the row instead of a sort), then
resolves a tie group at the boundary by token id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INT_MIN = jnp.iinfo(jnp.int32).min
_INT_MAX = jnp.iinfo(jnp.int32).max


def sortable(x: jax.Array) -> jax.Array:
  """float32 → int32 whose integer order is the float order (``-0 < +0``)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(_INT_MAX), bits)


def prefix_mask(keys: jax.Array, weight: jax.Array, limit: jax.Array) -> jax.Array:
  """Tokens whose higher-ranked tokens' summed ``weight`` is ``< limit``.

  Args:
    keys: ``[rows, vocabulary]`` int32 sort keys (`sortable`), larger first.
    weight: ``[rows, vocabulary]`` non-negative float weights.
    limit: Scalar (or ``[rows, 1]``) > 0.

  Returns:
    ``[rows, vocabulary]`` bool mask (a prefix of the rank order).
  """

  def above(s):
    return jnp.sum(jnp.where(keys > s, weight, 0), axis=-1, keepdims=True)

  low = jnp.min(keys, axis=-1, keepdims=True)
  lo = jnp.where(low == _INT_MIN, low, low - 1)
  hi = jnp.max(keys, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    gap = jax.lax.bitcast_convert_type(hi - lo, jnp.uint32)
    active = gap > 1
    mid = lo + jax.lax.bitcast_convert_type(gap >> 1, jnp.int32)
    below = above(mid) < limit
    return jnp.where(active & ~below, mid, lo), jnp.where(active & below, mid, hi)

  # The smallest key s with above(s) < limit (above(max) = 0 < limit).
  _, start = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  boundary = jnp.min(jnp.where(keys >= start, keys, _INT_MAX), axis=-1, keepdims=True)
  group = keys == boundary
  group_weight = jnp.where(group, weight, 0)
  before = above(boundary) + jnp.cumsum(group_weight, axis=-1) - group_weight
  return (keys > boundary) | (group & (before < limit))


def keep_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """The top-k-then-top-p kept set of each row (the most likely always kept).

  Args:
    logits: ``[rows, vocabulary]`` float logits.
    top_k: Int scalar >= 1 (>= vocabulary: no top-k).
    top_p: Float scalar > 0 (> 1: no top-p).

  Returns:
    ``[rows, vocabulary]`` bool.
  """
  vocab = logits.shape[-1]
  keys = sortable(logits)
  in_k = jax.lax.cond(
    top_k >= vocab,
    lambda: jnp.ones(logits.shape, bool),
    lambda: prefix_mask(keys, jnp.ones(logits.shape, jnp.float32), top_k),
  )
  top = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(in_k, jnp.exp(logits - top), 0.0)
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  keep = in_k & prefix_mask(keys, probs, top_p)
  first = jnp.arange(vocab) == jnp.argmax(logits, axis=-1, keepdims=True)
  return keep | first
