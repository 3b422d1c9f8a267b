"""Gumbel noise at chosen vocabulary positions, equal to a full draw's.

``jax.random.categorical(key, logits)`` is ``argmax(logits + g)`` with ``g =
jax.random.gumbel(key, logits.shape)``: on a 256 000-token vocabulary drawing
``g`` costs about 5 ms per row on a CPU, more than the rest of a filtered
sampling step. When only a few positions can win (top-k keeps them),
`gumbel_at` computes ``g`` at those positions only, bit for bit the values the
full draw has there.

That relies on how JAX draws bits: with the partitionable threefry (the
default, ``jax_threefry_partitionable``) the bits of element ``i`` of a 1-D
draw are ``threefry2x32(key, (0, i))`` xor-ed, and the low-dynamic-range
Gumbel maps them as ``jax.random.uniform`` does. `exact` says whether the
running configuration is that one; otherwise `gumbel_at` gathers from a full
draw (same values, full cost). tests/generation/test_sampling.py checks the
equality against ``jax.random.gumbel`` itself, so a JAX change that breaks it
fails a test rather than changing samples silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

_TINY = np.float32(np.finfo(np.float32).tiny)


def exact(keys: jax.Array) -> bool:
  """Whether `gumbel_at` can compute the noise directly for these keys."""
  return (
    bool(jax.config.jax_threefry_partitionable)
    and not bool(jax.config.jax_high_dynamic_range_gumbel)
    and str(jax.random.key_impl(keys)) == "threefry2x32"
  )


def gumbel_at(keys: jax.Array, index: jax.Array, size: int) -> jax.Array:
  """``jax.random.gumbel(keys[n], (size,), float32)[index[n]]`` per row.

  Args:
    keys: ``[rows]`` typed PRNG keys.
    index: ``[rows, k]`` int positions in ``[0, size)``.
    size: Length of the full draw (the vocabulary).

  Returns:
    ``[rows, k]`` float32 Gumbel noise.
  """
  if not exact(keys) or size >= 2**32:
    full = jax.vmap(lambda key: jax.random.gumbel(key, (size,), jnp.float32))(keys)
    return jnp.take_along_axis(full, index, axis=-1)
  data = jax.random.key_data(keys)
  k1 = jnp.broadcast_to(data[:, :1], index.shape)
  k2 = jnp.broadcast_to(data[:, 1:], index.shape)
  lo = index.astype(jnp.uint32)
  bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(lo), lo)
  bits = bits1 ^ bits2
  # jax.random.uniform(minval=tiny, maxval=1): 23 random mantissa bits in [1, 2).
  mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(9))
  one = jnp.uint32(np.float32(1.0).view(np.uint32))
  floats = jax.lax.bitcast_convert_type(mantissa | one, jnp.float32) - jnp.float32(1)
  uniform = jax.lax.max(_TINY, floats * (jnp.float32(1) - _TINY) + _TINY)
  return -jnp.log(-jnp.log(uniform))
