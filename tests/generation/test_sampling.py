"""Sort-free top-k / top-p sampling gives the tokens of the full-sort version.

`_reference_filter` and `_reference_choose` are the implementation this
project used before (two stable argsorts of the vocabulary per step), kept
here as the reference. The new code must pick the same token for the same key
on many seeds, temperatures, top-k and top-p values, with ties in the logits,
through both of its paths (candidates from ``lax.top_k``, and the bisection
over the whole vocabulary when the nucleus is wider than the candidates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import load, random_tokens
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import gumbel, nucleus, sampling

ROWS, VOCAB = 48, 700


def _reference_filter(logits, top_k, top_p):
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


@jax.jit
def _reference_choose(logits, rng, temperature, top_k, top_p):
  _, key = jax.random.split(rng)
  scaled = logits / temperature
  scaled = pz.nx.nmap(_reference_filter)(scaled.untag("vocabulary"), top_k, top_p)
  keys = pz.nx.random_split(key, {"batch": ROWS})
  tokens = pz.nx.nmap(jax.random.categorical)(keys, scaled)
  return tokens.unwrap("batch")


def _choose(logits, rng, temperature, top_k, top_p):
  mode = sampling.SamplingMode(greedy=False, filtered=True)
  tokens, _ = sampling.choose_tokens(
    logits,
    rng,
    mode,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    batch_axes={"batch": ROWS},
  )
  return tokens.unwrap("batch")


def _logits(seed, scale, ties):
  x = np.random.default_rng(seed).normal(size=(ROWS, VOCAB)) * scale
  if ties:
    x = np.round(x * 2) / 2  # many exactly equal logits
  return pz.nx.wrap(jnp.asarray(x, jnp.float32)).tag("batch", "vocabulary")


CASES = [
  # (scale, ties, temperature, top_k, top_p): peaked and flat rows, with ties.
  (4.0, False, 0.7, VOCAB, 0.9),
  (4.0, True, 1.0, VOCAB, 0.9),
  (0.5, False, 1.3, VOCAB, 0.95),  # flat: the nucleus spans most tokens
  (0.5, True, 1.0, 40, 0.8),
  (2.0, True, 0.5, 5, 2.0),  # top-k only
  (2.0, False, 1.0, 300, 2.0),
  (3.0, True, 2.0, 100, 0.3),
  (1.0, False, 1.0, VOCAB, 1.0),
  (8.0, True, 0.9, 3, 1e-6),
]


@pytest.mark.parametrize("fast_k", [1024, 64, 4])
def test_same_tokens_as_the_full_sort(monkeypatch, fast_k):
  monkeypatch.setattr(sampling, "FAST_K", fast_k)
  choose = jax.jit(_choose)
  different_seed = 0
  for n, (scale, ties, temperature, top_k, top_p) in enumerate(CASES):
    logits = _logits(n, scale, ties)
    for seed in range(4):
      args = (
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
      )
      ours = np.asarray(choose(logits, jax.random.key(seed), *args))
      reference = np.asarray(_reference_choose(logits, jax.random.key(seed), *args))
      np.testing.assert_array_equal(ours, reference, err_msg=f"case {n} seed {seed}")
      other = np.asarray(_reference_choose(logits, jax.random.key(seed + 99), *args))
      different_seed += int((other != reference).any())
  # Negative control: the comparison sees a change of key.
  assert different_seed > 0.8 * len(CASES) * 4


def test_filter_logits_keeps_the_reference_set_with_ties():
  for seed in range(12):
    x = np.random.default_rng(seed).normal(size=(8, 301)) * (0.5 + seed)
    x = jnp.asarray(np.round(x * 4) / 4, jnp.float32)
    top_k = jnp.int32([1, 2, 7, 50, 301, 400][seed % 6])
    top_p = jnp.float32([0.1, 0.5, 0.9, 0.99, 0.999, 2.0][seed // 2 % 6])
    ours = np.isfinite(np.asarray(sampling.filter_logits(x, top_k, top_p)))
    reference = np.isfinite(np.asarray(_reference_filter(x, top_k, top_p)))
    np.testing.assert_array_equal(ours, reference, err_msg=f"seed {seed}")


def test_top_p_one_keeps_every_top_k_token():
  """The full sort dropped tail tokens whose float32 cumulative mass had
  rounded to 1.0; top_p = 1 now keeps them (generate passes it as "no top-p")."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3000)) * 6, jnp.float32)
  k = jnp.int32(3000)
  kept = np.isfinite(np.asarray(sampling.filter_logits(x, k, jnp.float32(2.0))))
  assert kept.all()
  dropped = ~np.isfinite(np.asarray(_reference_filter(x, k, jnp.float32(1.0))))
  assert dropped.any()  # the rounding the reference suffered
  probs = np.asarray(jax.nn.softmax(x, axis=-1))
  assert (probs * dropped).sum(axis=-1).max() < 1e-5


def test_sortable_keeps_the_float_order():
  x = jnp.asarray([-jnp.inf, -3.5, -1e-30, 0.0, 1e-30, 2.0, 7.25, jnp.inf])
  keys = np.asarray(nucleus.sortable(x))
  assert (np.diff(keys) > 0).all()


def test_gumbel_at_is_the_full_draw_bit_for_bit():
  keys = jax.random.split(jax.random.key(3), 5)
  assert gumbel.exact(keys)
  index = jax.random.randint(jax.random.key(4), (5, 64), 0, 5000)
  ours = np.asarray(jax.jit(gumbel.gumbel_at, static_argnums=2)(keys, index, 5000))
  full = jax.vmap(lambda k: jax.random.gumbel(k, (5000,), jnp.float32))(keys)
  theirs = np.asarray(jnp.take_along_axis(full, index, axis=-1))
  np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
  # Negative control: other positions give other noise.
  shifted = np.asarray(gumbel.gumbel_at(keys, (index + 1) % 5000, 5000))
  assert (shifted != theirs).mean() > 0.99


def test_a_filter_keeping_everything_samples_like_no_filter():
  model, prompt = load(), random_tokens(2, 6)

  def run(**kwargs):
    return gs.generate(model, prompt, max_new_tokens=8, temperature=0.8, **kwargs)

  plain = run(seed=5).tokens
  np.testing.assert_array_equal(run(seed=5, top_p=1.0).tokens, plain)
  np.testing.assert_array_equal(run(seed=5, top_k=512, top_p=1.0).tokens, plain)
  assert (run(seed=5, top_k=2).tokens != plain).any()  # a real filter changes them
