"""Filtered sampling against a numpy re-implementation of the published rule.

The rule (Holtzman et al. 2020, as Hugging Face applies it after top-k):
rank the tokens by logit (ties: the lower id first, a stable sort), keep the
``top_k`` first, renormalise, keep a token while the probability ranked
before it is ``< top_p`` (the smallest prefix reaching ``top_p``; the first
token always). The draw is ``jax.random.categorical`` on the kept logits:
the argmax of ``logit + g`` over the kept set, ``g`` the key's Gumbel draw.

The reference works in float64 on the same float32 scaled logits and noise.
Where the probability before a token lies within float32 summation error of
``top_p``, summation order decides; so the kept set must lie between the
reference's sets for ``top_p - MARGIN`` and ``top_p + MARGIN`` (equal to
both when they agree), and the draw must be the reference's wherever those
two sets give the same draw. Rows where they do not are counted; they must
stay rare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_surgery.generation import sampling

VOCAB, ROWS = 3000, 64
MARGIN = 1e-5  # float32 sums of <= 3000 probabilities are far closer than this


def published_keep(scaled, top_k, top_p, ties_high_first=False, strict=True):
  """``[rows, vocab]`` kept set, in float64."""
  keep = np.zeros(scaled.shape, bool)
  ids = np.arange(scaled.shape[1])
  for r, row in enumerate(scaled.astype(np.float64)):
    order = np.lexsort((-ids if ties_high_first else ids, -row))
    ranked = row[order][:top_k]
    p = np.exp(ranked - ranked[0])
    p /= p.sum()
    before = np.cumsum(p) - p
    kept = (before < top_p) if strict else (before <= top_p)
    kept[0] = True
    keep[r, order[: len(ranked)]] = kept
  return keep


def published_draw(keep, scaled, noise):
  return np.argmax(np.where(keep, scaled + noise, -np.inf), axis=-1)


def bounds(scaled, top_k, top_p):
  """The kept sets for ``top_p -/+ MARGIN``."""
  return (
    published_keep(scaled, top_k, top_p - MARGIN),
    published_keep(scaled, top_k, top_p + MARGIN),
  )


def _rows(kind, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(ROWS, VOCAB))
  if kind == "flat":
    x *= 0.3
  elif kind == "peaked":
    x *= 6.0
  elif kind == "ties":  # equal logits everywhere, groups across the boundary
    x = np.round(x * 3) / 3
  elif kind == "few_ties":  # a few large tied logits on a flat floor
    x = x * 0.2
    x[:, rng.integers(0, VOCAB, 6)] = 4.0
  return x.astype(np.float32)


CASES = [
  # kind, temperature, top_k, top_p
  ("flat", 0.7, VOCAB, 0.9),
  ("flat", 1.0, VOCAB, 0.3),
  ("normal", 0.7, VOCAB, 0.9),
  ("normal", 1.5, VOCAB, 0.05),
  ("peaked", 0.7, VOCAB, 0.9),
  ("peaked", 1.0, VOCAB, 0.999),
  ("ties", 1.0, VOCAB, 0.5),
  ("ties", 0.8, 40, 0.9),
  ("ties", 1.0, 500, 0.95),  # top-k wider than the candidates
  ("few_ties", 1.0, VOCAB, 0.7),
  ("normal", 1.0, 7, 2.0),  # top-k only
  ("normal", 1.0, 200, 0.6),
  ("flat", 2.0, VOCAB, 1.0),
]


def _scaled(kind, n, temperature):
  return np.asarray(jnp.asarray(_rows(kind, n)) / jnp.float32(temperature))


def _noise(keys):
  draw = jax.vmap(lambda k: jax.random.gumbel(k, (VOCAB,), jnp.float32))(keys)
  return np.asarray(draw)


@pytest.mark.parametrize(("fast_k", "tries"), [(64, 8), (64, 1), (4096, 8)])
def test_draws_follow_the_published_rule(monkeypatch, fast_k, tries):
  monkeypatch.setattr(sampling, "FAST_K", fast_k)
  monkeypatch.setattr(sampling, "TRIES", tries)
  draw = jax.jit(sampling.sample_filtered)
  checked = skipped = 0
  for n, (kind, temperature, top_k, top_p) in enumerate(CASES):
    scaled = _scaled(kind, n, temperature)
    keys = jax.random.split(jax.random.key(n), ROWS)
    noise = _noise(keys)
    low, high = (published_draw(k, scaled, noise) for k in bounds(scaled, top_k, top_p))
    ambiguous = low != high
    expected = published_draw(published_keep(scaled, top_k, top_p), scaled, noise)
    ours = np.asarray(draw(keys, jnp.asarray(scaled), top_k, jnp.float32(top_p)))
    np.testing.assert_array_equal(
      ours[~ambiguous], expected[~ambiguous], err_msg=f"case {n}"
    )
    checked += int((~ambiguous).sum())
    skipped += int(ambiguous.sum())
  assert skipped <= 0.01 * checked


def test_the_kept_set_is_the_published_one():
  """`filter_logits` (the bisection mask) against the rule, ties included."""
  exact = []
  for n, (kind, temperature, top_k, top_p) in enumerate(CASES):
    scaled = _scaled(kind, n, temperature)
    low, high = bounds(scaled, top_k, top_p)
    out = sampling.filter_logits(jnp.asarray(scaled), top_k, jnp.float32(top_p))
    ours = np.isfinite(np.asarray(out))
    # Between the two; so equal to the rule's set where they agree.
    assert (low <= ours).all() and (ours <= high).all(), f"case {n}"
    exact.extend((low == high).all(axis=-1))
  assert np.mean(exact) > 0.9


def test_the_comparison_sees_a_wrong_rule():
  """Negative controls: ties broken the other way, ``<=`` for ``<``, and a
  different key each change draws the comparison above checks."""
  draw = jax.jit(sampling.sample_filtered)
  scaled = _scaled("ties", 0, 1.0)
  keys = jax.random.split(jax.random.key(0), ROWS)
  noise = _noise(keys)
  ours = np.asarray(draw(keys, jnp.asarray(scaled), VOCAB, jnp.float32(0.5)))
  right = published_keep(scaled, VOCAB, 0.5)
  assert (published_draw(right, scaled, noise) == ours).all()
  high_first = published_keep(scaled, VOCAB, 0.5, ties_high_first=True)
  assert (high_first != right).any(axis=-1).mean() > 0.5
  assert (published_draw(high_first, scaled, noise) != ours).any()
  other = _noise(jax.random.split(jax.random.key(1), ROWS))
  assert (published_draw(right, scaled, other) != ours).mean() > 0.5
  # "<=" differs only when a prefix sums exactly to top_p: 1/2 of two equal
  # probabilities (every other token impossible) does.
  pair = np.full((1, VOCAB), -np.inf, np.float32)
  pair[0, [5, 9]] = 0.0
  strict = published_keep(pair, VOCAB, 0.5)
  loose = published_keep(pair, VOCAB, 0.5, strict=False)
  ours = np.isfinite(np.asarray(sampling.filter_logits(pair, VOCAB, 0.5)))
  assert np.flatnonzero(strict[0]).tolist() == [5]
  assert np.flatnonzero(loose[0]).tolist() == [5, 9]
  np.testing.assert_array_equal(ours, strict)


def test_fast_argmax_is_jnp_argmax():
  x = np.round(np.random.default_rng(0).normal(size=(6, 50)) * 2).astype(np.float32)
  x[1, [3, 7]] = np.nan
  x[2, :] = -np.inf
  x[3, 9] = np.inf
  ours = np.asarray(jax.jit(sampling.argmax)(x))
  np.testing.assert_array_equal(ours, np.asarray(jnp.argmax(x, axis=-1)))
  assert ours[1] == 3 and ours[0] == np.argmax(x[0])  # ties: the lowest index
