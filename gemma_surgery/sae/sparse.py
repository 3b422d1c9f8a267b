"""Exact sparse decoding of JumpReLU features.

A JumpReLU SAE fires only a few latents per token (Gemma Scope's L0 is ~20 to
~200 of 16k–1M latents), so ``f · W_dec`` is mostly multiplications by zero.
Here a token's features are compacted to its ``active`` nonzero latents
(`sparsify`) and the decoder reads only those rows (`sparse_decode`): the
result equals the dense ``decode`` (up to float32 summation order) whenever
no token has more nonzero latents than the ``active`` size, and `sparsify`
reports how many tokens overflowed so callers can check.

`reconstruct` is the eager entry point: it encodes, measures the largest L0
of the batch, picks the ``active`` size from a few power-of-two buckets (one
compile each) and decodes sparsely when the slots are a small part of the
width or the batch is small (`decodes_sparsely`), densely otherwise; it never
drops a latent. At Gemma Scope's L0 a 1024-token batch decodes several times
faster sparsely than densely on CPU (``bench/sae.py``).

Axes: features ``{..., latents}`` → `SparseFeatures` ``{..., active}`` →
output ``{..., embedding}``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.errors import SAEError
from gemma_surgery.sae.autoencoders import AutoEncoder, Transcoder

MIN_ACTIVE = 8
# `reconstruct` decodes sparsely while the slots per token are at most
# 1/SLOTS_FRACTION of the width (beyond that, on CPU, a dense matmul beats
# reading the rows one by one: bench/sae.py), or for any slot count while the
# rows to read (tokens × slots) are at most 1/ROWS_FRACTION of the decoder
# (a few tokens: the dense decode reads the whole decoder for them).
SLOTS_FRACTION = 16
ROWS_FRACTION = 4
# `sparse_decode` gathers all rows at once up to this many (tokens × slots),
# else it loops over the slots of TILE tokens at a time.
GATHER_ROWS = 4096
TILE = 256


@pz.pytree_dataclass
class SparseFeatures(pz.Struct):
  """Per-token compacted JumpReLU features.

  Attributes:
    values: ``{..., active}`` float32 values of the nonzero latents, zero in
      unused slots.
    indices: ``{..., active}`` int32 latent ids (``0`` in unused slots, where
      the value is zero).
    overflow: Scalar int32: how many tokens had more nonzero latents than
      ``active`` slots (their extra latents are dropped; zero means exact).
  """

  values: pz.nx.NamedArray
  indices: pz.nx.NamedArray
  overflow: jax.Array


def _compact_row(row: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The ``size`` first nonzero entries of a ``[latents]`` row and their ids.

  One ``lax.top_k`` on ``-id`` (``-inf`` at zeros) instead of ``jnp.nonzero``
  (a cumulative sum and a scatter, 3x slower on CPU); float32 holds the ids
  exactly up to 2**24 latents, beyond that ``jnp.nonzero`` is used.
  """
  width = row.shape[-1]
  if width > 2**24:
    (idx,) = jnp.nonzero(row, size=size, fill_value=0)
    used = jnp.arange(size) < jnp.count_nonzero(row)
    return jnp.where(used, row[idx], 0.0), idx.astype(jnp.int32)
  key = jnp.where(row != 0, -jnp.arange(width, dtype=jnp.float32), -jnp.inf)
  first, idx = jax.lax.top_k(key, size)
  used = first > -jnp.inf
  return jnp.where(used, row[idx], 0.0), jnp.where(used, idx, 0).astype(jnp.int32)


def sparsify(features: pz.nx.NamedArray, active: int) -> SparseFeatures:
  """Compacts ``{..., latents}`` features to ``{..., active}`` slots.

  Args:
    features: JumpReLU features (any sign; zeros are the inactive latents).
    active: Slots per token; exact when every token's L0 is ``<= active``.

  Returns:
    The `SparseFeatures` (``overflow`` counts tokens whose L0 exceeded
    ``active``): nonzero latents in increasing id order, then empty slots.
  """
  width = features.named_shape["latents"]
  if not 1 <= active <= width:
    raise SAEError(f"active={active} must be in [1, {width}] (the SAE width).")
  f = features.astype(jnp.float32).untag_prefix("latents")
  compact = pz.nx.nmap(functools.partial(_compact_row, size=active))
  values, indices = compact(f)
  counts = pz.nx.nmap(jnp.count_nonzero)(f)
  return SparseFeatures(
    values=values.tag_prefix("active"),
    indices=indices.tag_prefix("active"),
    overflow=jnp.sum(counts.data_array > active).astype(jnp.int32),
  )


def _decode_tiles(values: jax.Array, indices: jax.Array, w_dec: jax.Array):
  """``[tokens, active]`` → ``[tokens, embedding]``, `TILE` tokens at a time.

  Per tile, a loop over the slots up to the tile's last nonzero one adds
  ``value · W_dec[index]`` for the tile's tokens: the accumulator stays in
  cache and no ``[tokens, active, embedding]`` gather is materialised.
  """
  tokens, active = values.shape
  tile = min(TILE, tokens)
  pad = -tokens % tile
  values = jnp.pad(values, ((0, pad), (0, 0)))
  indices = jnp.pad(indices, ((0, pad), (0, 0)))
  slot = jnp.arange(1, active + 1)
  last = jnp.max(jnp.where(values != 0, slot, 0).reshape(-1, tile * active), axis=-1)

  def one_tile(args):
    v, i, n = args

    def add(a, acc):
      return acc + v[:, a, None] * w_dec[i[:, a]]

    return jax.lax.fori_loop(0, n, add, jnp.zeros((tile, w_dec.shape[1]), jnp.float32))

  shape = (-1, tile, active)
  out = jax.lax.map(one_tile, (values.reshape(shape), indices.reshape(shape), last))
  return out.reshape(-1, w_dec.shape[1])[:tokens]


def sparse_decode(sae: AutoEncoder, sparse: SparseFeatures) -> pz.nx.NamedArray:
  """``Σ_active value · W_dec[index] + b_dec`` → ``{..., embedding}`` (f32).

  Reads only the decoder rows of active latents: gathered at once for a few
  tokens, in tiles of `TILE` tokens (`_decode_tiles`) for more. Transcoders'
  affine skip term needs the input and is not included (see `reconstruct`).
  """
  w_dec = sae.w_dec.value.astype(jnp.float32).unwrap("latents", "embedding")
  names = tuple(n for n in sparse.values.named_shape if n != "active")
  values = sparse.values.unwrap(*names, "active")
  indices = sparse.indices.unwrap(*names, "active")
  active = values.shape[-1]
  values, indices = values.reshape(-1, active), indices.reshape(-1, active)
  if values.shape[0] * active <= GATHER_ROWS:
    out = jnp.einsum(
      "ta,tad->td", values, w_dec[indices], precision=jax.lax.Precision.HIGHEST
    )
  else:
    out = _decode_tiles(values, indices, w_dec)
  shape = tuple(sparse.values.named_shape[n] for n in names)
  out = pz.nx.wrap(out.reshape(*shape, -1)).tag(*names, "embedding")
  return out + sae.b_dec.value.astype(jnp.float32)


def active_slots(max_l0: int, width: int) -> int:
  """The power-of-two slot count (at least `MIN_ACTIVE`, at most ``width``)
  that holds ``max_l0`` latents; few sizes, so few compiles."""
  return min(width, max(MIN_ACTIVE, 1 << max(0, int(max_l0) - 1).bit_length()))


def decodes_sparsely(tokens: int, active: int, width: int) -> bool:
  """Whether `reconstruct` uses the sparse decoder for ``tokens`` tokens with
  ``active`` slots each (see `SLOTS_FRACTION`, `ROWS_FRACTION`)."""
  return active * SLOTS_FRACTION <= width or tokens * active * ROWS_FRACTION <= width


@functools.partial(jax.jit, static_argnames="active")
def _decode(sae: AutoEncoder, features: pz.nx.NamedArray, active: int):
  sparse = sparsify(features, active)
  return sparse_decode(sae, sparse), sparse.overflow


@jax.jit
def _dense_decode(sae: AutoEncoder, features: pz.nx.NamedArray):
  return sae.decode(features)


@jax.jit
def _encode(sae: AutoEncoder, x: pz.nx.NamedArray):
  features = sae.encode(x)
  l0 = pz.nx.nmap(jnp.count_nonzero)(features.untag_prefix("latents"))
  return features, jnp.max(l0.data_array)


def reconstruct(
  sae: AutoEncoder, x: pz.nx.NamedArray
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Encodes and decodes ``{..., embedding}`` activations, decoding sparsely.

  The slot count is chosen from this batch's largest L0, so no latent is ever
  dropped (when the rows to gather exceed a quarter of the decoder, see
  `decodes_sparsely`, the dense decoder is used instead): the reconstruction
  equals ``sae.decode(sae.encode(x))`` up to float32 summation order. Runs
  eagerly (it reads the L0 back to the host); inside a jitted function use
  `sparsify` + `sparse_decode` with a fixed size, or the dense ``sae(x)``.

  Args:
    sae: An `AutoEncoder` or `Transcoder` (its affine skip term is added).
    x: Activations with an ``embedding`` axis of size ``sae.d_in``.

  Returns:
    ``(features {..., latents}, reconstruction {..., embedding})``, float32.

  Raises:
    SAEError: If ``x`` has no ``embedding`` axis of the SAE's input size.
  """
  size = x.named_shape.get("embedding")
  if size != sae.d_in:
    raise SAEError(
      f"Activations have embedding={size} (axes {dict(x.named_shape)}); the SAE"
      f" reads {sae.d_in}."
    )
  sae = pz.freeze_params(sae)
  features, max_l0 = _encode(sae, x)
  active = active_slots(int(max_l0), sae.width)
  tokens = math.prod(x.named_shape.values()) // sae.d_in
  if not decodes_sparsely(tokens, active, sae.width):
    out = _dense_decode(sae, features)
  else:
    out, overflow = _decode(sae, features, active)
    if int(overflow):  # Cannot happen: `active` holds the largest L0.
      raise AssertionError(f"{int(overflow)} tokens overflowed {active} slots")
  if isinstance(sae, Transcoder):
    skip = sae.skip(x)
    if skip is not None:
      out = out + skip
  return features, out
