"""Attribution rows on the device (`circuits.rows`): one compile per prompt
length, and the chunked feature-edge products equal a numpy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers.circuits import count_compiles, random_set, tiny

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
  site = rng.integers(0, n * n_pos, e)
  node = rng.integers(0, n_feat + 1, e)  # n_feat: padding rows, dropped.
  sources = Sources(
    embed=jnp.asarray(rng.normal(size=(n_pos, d)), jnp.float32),
    errors=jnp.asarray(rng.normal(size=(n, n_pos, d)), jnp.float32),
    dec=jnp.asarray(dec),
    site=jnp.asarray(site, jnp.int32),
    node=jnp.asarray(node, jnp.int32),
    slots=jnp.zeros(n_feat),
  )
  want = np.zeros((t, n_feat + 1))
  flat = g_mlp.reshape(t, n * n_pos, d)
  for j in range(e):
    want[:, node[j]] += flat[:, site[j]] @ dec[j]
  want_err = np.einsum("tkpd,kpd->tkp", g_mlp, sources.errors).reshape(t, -1)
  want_tok = np.einsum("tpd,pd->tp", g_embed, sources.embed)
  for chunk in (4, 16):
    got = np.asarray(edge_rows(g_embed, g_mlp, sources, chunk=chunk))
    np.testing.assert_allclose(got[:, :n_feat], want[:, :n_feat], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, n_feat:-n_pos], want_err, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, -n_pos:], want_tok, rtol=1e-5, atol=1e-5)
