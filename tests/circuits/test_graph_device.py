"""Attribution rows on the device (`circuits.rows`): one compile per prompt
length, and the chunked feature-edge products equal a numpy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers.circuits import random_set, tiny
from helpers.compiles import count_compiles

import gemma_surgery as gs
from gemma_surgery.circuits.graph import attribute_replacement
from gemma_surgery.circuits.replacement import replacement_model
from gemma_surgery.circuits.rows import Sources, edge_rows


def _graph(rep):
  return attribute_replacement(
    rep, max_n_logits=3, max_feature_nodes=40, progress=False
  )


def test_second_prompt_of_same_length_compiles_nothing():
  model, tok = tiny()
  dictionary = random_set(2)
  texts = ["x y z x y", "p q r p q", "the cat sat on the mat"]
  ids = [tok.encode(t) for t in texts]
  assert len(ids[0]) == len(ids[1]) != len(ids[2])
  reps = [replacement_model(model, dictionary, gs.named_tokens([i])) for i in ids]
  first = _graph(reps[0])
  with count_compiles() as same:
    second = _graph(reps[1])
  # Preconditions: one feature batch (reaching the last layer) of one size,
  # else a compile would be expected.
  assert first.n_features == second.n_features == 40
  assert first.features[:, 0].max() == second.features[:, 0].max()
  assert same["compiles"] == 0
  assert not np.allclose(first.adjacency[:, :20], second.adjacency[:, :20])
  # Negative control: another length compiles anew.
  with count_compiles() as other:
    _graph(reps[2])
  assert other["compiles"] > 0


def test_chunked_feature_edges_equal_numpy():
  rng = np.random.default_rng(0)
  t, n, n_pos, d, n_feat, e = 3, 2, 5, 8, 6, 16
  g_embed = rng.normal(size=(t, n_pos, d)).astype(np.float32)
  g_mlp = rng.normal(size=(t, n, n_pos, d)).astype(np.float32)
  dec = rng.normal(size=(e, d)).astype(np.float32)
  # Sorted sites: the first 8 rows are written at layer 0, the rest at 1.
  site = np.sort(np.r_[rng.integers(0, n_pos, 8), rng.integers(n_pos, 2 * n_pos, 8)])
  node = rng.integers(0, n_feat + 1, e)  # n_feat: padding rows, dropped.
  embed = rng.normal(size=(n_pos, d)).astype(np.float32)
  errs = rng.normal(size=(n, n_pos, d)).astype(np.float32)

  def sources(dec):
    return Sources(
      embed=jnp.asarray(embed),
      errors=jnp.asarray(errs),
      dec=jnp.asarray(dec),
      site=jnp.asarray(site, jnp.int32),
      node=jnp.asarray(node, jnp.int32),
      slots=jnp.zeros(n_feat),
    )

  def want(rows):
    out = np.zeros((t, n_feat + 1))
    flat = g_mlp.reshape(t, n * n_pos, d)
    for j in rows:
      out[:, node[j]] += flat[:, site[j]] @ dec[j]
    return out[:, :n_feat]

  want_err = np.einsum("tkpd,kpd->tkp", g_mlp, errs).reshape(t, -1)
  want_tok = np.einsum("tpd,pd->tp", g_embed, embed)
  close = dict(rtol=1e-5, atol=1e-5)
  for chunk in (4, 16):
    got = edge_rows(g_embed, g_mlp, sources(dec), n, n_pos - 1, chunk=chunk)
    got = np.asarray(got)
    np.testing.assert_allclose(got[:, :n_feat], want(range(e)), **close)
    np.testing.assert_allclose(got[:, n_feat:-n_pos], want_err, **close)
    np.testing.assert_allclose(got[:, -n_pos:], want_tok, **close)
  # Rows written at layer >= depth or after last_pos are never read (NaN
  # there stays out), whatever the chunk boundaries.
  for depth, last in ((1, n_pos - 1), (2, 1), (1, 0)):
    read = (site < depth * n_pos) & (site % n_pos <= last)
    poisoned = np.where(read[:, None], dec, np.nan)
    for chunk in (2, 4):
      got = edge_rows(g_embed, g_mlp, sources(poisoned), depth, last, chunk=chunk)
      np.testing.assert_allclose(
        np.asarray(got)[:, :n_feat], want(np.flatnonzero(read)), **close
      )
