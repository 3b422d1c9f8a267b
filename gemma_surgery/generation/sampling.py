"""Choosing the next token from logits, inside ``jit``: greedy, temperature,
top-k and top-p (nucleus) sampling.

Random keys follow Penzai's ``temperature_sample_pyloop`` exactly: each step
splits the carried key (``rng, key = jax.random.split(rng)``) and splits
``key`` over the batch axes with ``pz.nx.random_split``, then draws with
``jax.random.categorical``. So pure temperature sampling with the same seed
draws the same tokens as the Penzai loop.

Filtering follows Hugging Face's order: divide by the temperature, keep the
``top_k`` most likely tokens, then keep the smallest set of those whose
cumulative probability reaches ``top_p`` (always at least one token). Ranks
are by logit, ties broken by the lower token id (a stable sort's order).

No step sorts the vocabulary. With ``top_k <= FAST_K`` one ``lax.top_k``
takes the candidates and the draw happens among them alone, with the Gumbel
noise of ``jax.random.categorical`` computed at those positions only
(`gumbel.gumbel_at`). With top-p alone the draw comes from the unfiltered one
(`_nucleus_winner`: the best-scoring token is checked against the nucleus,
which fails with probability ``<= 1 - top_p``), so the kept set is never
built; a top-k wider than ``FAST_K`` takes the mask found by bisecting on the
logit value (`nucleus.keep_mask`). All give the tokens the former full-sort
implementation gave (tests/generation/test_sampling.py) and the published rule
gives (test_nucleus_rule.py); the only possible difference is a token whose
preceding probability mass lies within float32 rounding of ``top_p``, where
summation order decides.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.generation import gumbel, nucleus

FAST_K = 1024
"""Candidates taken by ``lax.top_k`` for top-k sampling (static)."""

TRIES = 8
"""Unfiltered-draw winners checked against the nucleus before the mask."""


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
      vocabulary size to keep all). Rank: by logit, ties by lower id.
    top_p: Float scalar in ``(0, 1]``; a token is kept if the probability of
      the tokens ranked above it (among the top-k) is ``< top_p``, so the kept
      set is the smallest whose cumulative probability is ``>= top_p``. Pass
      a value ``> 1`` to disable.

  Returns:
    Logits of the same shape with dropped tokens set to ``-inf``. The most
    likely token is always kept.
  """
  shape = logits.shape
  flat = logits.reshape(-1, shape[-1])
  keep = nucleus.keep_mask(flat, top_k, top_p)
  return jnp.where(keep, flat, -jnp.inf).reshape(shape)


def _fast(scaled, top_k, top_p, k: int):
  """Top-k / top-p among the ``k`` largest logits of each row.

  Returns ``(keep [rows, k], index [rows, k], values [rows, k])``; exact when
  ``top_k <= k`` or ``k`` is the vocabulary.
  """
  vocab = scaled.shape[-1]
  values, index = jax.lax.top_k(scaled, k)
  rank = jnp.arange(k)
  in_k = rank < top_k
  top = jnp.max(scaled, axis=-1, keepdims=True)
  e = jnp.exp(values - top)
  all_tokens = top_k >= vocab
  denom = jnp.where(
    all_tokens,
    jnp.sum(jnp.exp(scaled - top), axis=-1, keepdims=True),
    jnp.sum(jnp.where(in_k, e, 0.0), axis=-1, keepdims=True),
  )
  probs = jnp.where(in_k, e / denom, 0.0)
  cumulative = jnp.cumsum(probs, axis=-1)
  keep = in_k & ((cumulative - probs < top_p) | (rank == 0))
  return keep, index, values


def argmax(x: jax.Array) -> jax.Array:
  """``jnp.argmax(x, axis=-1)`` as two vectorised passes (a max, then the
  lowest index holding it) instead of XLA:CPU's slower variadic reduce.

  Like ``jnp.argmax``, a row with NaN gives its first NaN (the max is NaN).
  """
  best = jnp.max(x, axis=-1, keepdims=True)
  ids = jnp.arange(x.shape[-1])
  return jnp.min(jnp.where((x == best) | (x != x), ids, x.shape[-1]), axis=-1)


def _nucleus_winner(keys, scaled, top_p):
  """The draw among the nucleus (no top-k), found from the unfiltered draw.

  ``jax.random.categorical`` on the filtered logits is the argmax of ``scaled
  + g`` over the kept tokens (``g`` the key's full Gumbel draw). The kept set
  is a prefix of the rank order, so the winner is found without the set: take
  the argmax of ``scaled + g`` over the tokens ranked ahead of every rejected
  one; if the probability ranked ahead of it is ``< top_p`` it is kept and
  wins, else it is rejected (and with it every token ranked after it). A try
  is three fused passes over the vocabulary; the first fails only when the
  unfiltered draw lands outside the nucleus (probability ``<= 1 - top_p``).
  Rows still open after `TRIES` tries take the bisection mask.

  Returns ``[rows]`` tokens.
  """
  rows, vocab = scaled.shape
  noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys)
  score = scaled + noise
  order = nucleus.sortable(scaled)
  e = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  ids = jnp.arange(vocab)
  row = jnp.arange(rows)

  def ahead_of(key, index):
    """Tokens ranked before ``(key, index)`` (logit order, ties by id)."""
    return (order > key[:, None]) | ((order == key[:, None]) & (ids < index[:, None]))

  def open_rows(state):
    return (state[0] < TRIES) & ~jnp.all(state[1])

  def try_once(state):
    tries, found, token, key = state
    # Candidates: the tokens ranked ahead of the last rejected one.
    alive = jnp.where(ahead_of(key, token), score, -jnp.inf)
    j = argmax(alive)
    at = order[row, j]
    mass = jnp.sum(jnp.where(ahead_of(at, j), probs, 0.0), axis=-1)
    kept = mass < top_p  # the most likely token has mass 0
    token = jnp.where(found, token, j)
    key = jnp.where(found, key, at)
    return tries + 1, found | kept, token, key

  # (INT_MIN, vocab) has every token ahead: sortable gives INT_MIN only for
  # one NaN pattern.
  lowest = jnp.full(rows, jnp.iinfo(jnp.int32).min, jnp.int32)
  start = (jnp.int32(0), jnp.zeros(rows, bool), jnp.full(rows, vocab), lowest)
  _, found, token, _ = jax.lax.while_loop(open_rows, try_once, start)

  def by_mask(_):
    keep = nucleus.keep_mask(scaled, jnp.int32(vocab), top_p)
    return jnp.where(found, token, jnp.argmax(jnp.where(keep, score, -jnp.inf), -1))

  return jax.lax.cond(jnp.all(found), lambda _: token, by_mask, None)


def sample_filtered(
  keys: jax.Array, scaled: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """``jax.random.categorical(keys[n], filter_logits(scaled[n], ...))`` per row.

  Args:
    keys: ``[rows]`` PRNG keys.
    scaled: ``[rows, vocabulary]`` temperature-scaled logits.
    top_k: Int scalar (the vocabulary size: no top-k).
    top_p: Float scalar (> 1: no top-p).

  Returns:
    ``[rows]`` int32 tokens.
  """
  vocab = scaled.shape[-1]
  k = min(FAST_K, vocab)

  def among_candidates(_):
    keep, index, values = _fast(scaled, top_k, top_p, k)
    noise = gumbel.gumbel_at(keys, index, vocab)
    score = jnp.where(keep, values + noise, -jnp.inf)
    best = jnp.max(score, axis=-1, keepdims=True)
    # argmax over the vocabulary returns the lowest id among equal maxima.
    return jnp.min(jnp.where(score == best, index, vocab), axis=-1)

  def whole_vocabulary(_):
    filtered = filter_logits(scaled, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, filtered)

  if k == vocab:
    return among_candidates(None).astype(jnp.int32)
  # top-k within the candidates; top-p alone; a top-k wider than the candidates.
  branch = jnp.where(top_k <= k, 0, jnp.where(top_k >= vocab, 1, 2))
  paths = (among_candidates, lambda _: _nucleus_winner(keys, scaled, top_p))
  tokens = jax.lax.switch(branch, (*paths, whole_vocabulary), None)
  return tokens.astype(jnp.int32)


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
    return pz.nx.nmap(argmax)(logits.untag("vocabulary")).astype(jnp.int32), rng
  scaled = logits / temperature
  keys = pz.nx.random_split(key, batch_axes)
  if not mode.filtered:
    tokens = pz.nx.nmap(jax.random.categorical)(keys, scaled.untag("vocabulary"))
    return tokens.astype(jnp.int32), rng
  names = tuple(batch_axes)
  rows = math.prod(batch_axes.values())
  flat = scaled.unwrap(*names, "vocabulary").reshape(rows, -1)
  tokens = sample_filtered(keys.unwrap(*names).reshape(rows), flat, top_k, top_p)
  shape = tuple(batch_axes.values())
  return pz.nx.wrap(tokens.reshape(shape)).tag(*names), rng
