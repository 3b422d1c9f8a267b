"""Choosing the next token from logits, inside ``jit``: greedy, temperature,
top-k and top-p (nucleus) sampling.

Random keys follow Penzai's ``temperature_sample_pyloop`` exactly: each step
splits the carried key (``rng, key = jax.random.split(rng)``) and splits
``key`` over the batch axes with ``pz.nx.random_split``, then draws with
``jax.random.categorical``. So pure temperature sampling with the same seed
draws the same tokens as the Penzai loop.

Filtering follows Hugging Face's order: divide by the temperature, keep the
``top_k`` most likely tokens, then keep the smallest set of those whose
cumulative probability reaches ``top_p`` (always at least one token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from penzai import pz


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  """The static (compile-time) part of a sampling choice.

  Temperature, ``top_k`` and ``top_p`` values are traced arrays, so changing
  them never recompiles; only switching between these modes does.

  Attributes:
    greedy: Take the argmax (temperature 0); no randomness.
    filtered: Apply top-k / top-p filtering before sampling.
  """

  greedy: bool
  filtered: bool = False


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks all but the top-k / nucleus tokens with ``-inf``.

  Args:
    logits: ``[..., vocabulary]`` float logits (already temperature-scaled).
    top_k: Integer scalar; tokens of rank ``>= top_k`` are dropped (pass the
      vocabulary size to keep all).
    top_p: Float scalar in ``(0, 1]``; a token is kept if the probability of
      the tokens ranked above it (among the top-k) is ``< top_p``, so the kept
      set is the smallest whose cumulative probability is ``>= top_p``. Pass
      a value ``> 1`` to disable.

  Returns:
    Logits of the same shape with dropped tokens set to ``-inf``. The most
    likely token is always kept.
  """
  order = jnp.argsort(-logits, axis=-1, stable=True)
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])
  keep = rank < top_k
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = keep & ((mass_before < top_p) | (rank == 0))
  inverse = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep, inverse, axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def choose_tokens(
  logits: pz.nx.NamedArray,
  rng: jax.Array,
  mode: SamplingMode,
  *,
  temperature: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  batch_axes: dict[str, int],
) -> tuple[pz.nx.NamedArray, jax.Array]:
  """Picks one token per batch row.

  Args:
    logits: ``{batch…, vocabulary}`` logits of the last position.
    rng: The carried PRNG key; split once per call (also when greedy, so the
      key schedule doesn't depend on the mode).
    mode: Greedy or sampling, filtered or not (static).
    temperature: Float scalar > 0 (ignored when greedy).
    top_k: Int scalar (used when ``mode.filtered``).
    top_p: Float scalar (used when ``mode.filtered``).
    batch_axes: Batch axis names and sizes, for splitting the key.

  Returns:
    ``({batch…} int32 tokens, next rng)``.
  """
  rng, key = jax.random.split(rng)
  if mode.greedy:
    return pz.nx.nmap(jnp.argmax)(logits.untag("vocabulary")).astype(jnp.int32), rng
  scaled = logits / temperature
  if mode.filtered:
    scaled = pz.nx.nmap(filter_logits)(scaled.untag("vocabulary"), top_k, top_p).tag(
      "vocabulary"
    )
  keys = pz.nx.random_split(key, batch_axes)
  tokens = pz.nx.nmap(jax.random.categorical)(keys, scaled.untag("vocabulary"))
  return tokens.astype(jnp.int32), rng
