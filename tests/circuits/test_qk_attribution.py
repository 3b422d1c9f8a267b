"""QK attribution: the pairs split the real model's q · k exactly, and each
node's query share equals the change of q when that node is removed (a
forward evaluation, independent of the vjp that computed it)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.circuits import random_clt, random_set, tiny

import gemma_surgery as gs
from gemma_surgery.circuits.linear import site_reads
from gemma_surgery.circuits.qk import qk_attribution
from gemma_surgery.circuits.replacement import replacement_model
from gemma_surgery.errors import InputError
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import heads

LAYER, HEAD = 2, 3


def _real_qk(model, tokens, query_pos, key_pos):
  """q_t · k_u of the real model, from captured attn.q / attn.k."""
  patched, q_cap = gs.capture(model, "attn.q", LAYER)
  patched, k_cap = gs.capture(patched, "attn.k", LAYER)
  patched(tokens)
  q = heads.to_user_heads(q_cap["attn.q", LAYER])
  k = heads.to_user_heads(k_cap["attn.k", LAYER])
  q = to_numpy(q.unwrap("batch", "seq", "heads", "projection"), np.float64)[0]
  k = to_numpy(k.unwrap("batch", "seq", "heads", "projection"), np.float64)[0]
  group = q.shape[1] // k.shape[1]
  return q[query_pos, HEAD], k[key_pos, HEAD // group]


def test_pairs_split_the_score_and_shares_are_node_removals():
  """On a CLT (decoders into every later layer: the harder case)."""
  model, tok = tiny()
  dictionary = random_clt(2)
  tokens = gs.named_tokens([tok.encode("a b c d a b c")])
  rep = replacement_model(model, dictionary, tokens)
  n_pos = rep.errors.shape[1]
  query_pos, key_pos = n_pos - 1, 2
  qk = qk_attribution(rep, LAYER, HEAD, query_pos, key_pos)
  q, k = _real_qk(model, tokens, query_pos, key_pos)
  np.testing.assert_allclose(qk.query_vectors.sum(0), q, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(qk.key_vectors.sum(0), k, atol=2e-4, rtol=1e-4)
  assert qk.score == pytest.approx(float(q @ k), rel=1e-4, abs=1e-3)
  # Only nodes below the layer and at or before the position take part.
  for node in qk.query_nodes + qk.key_nodes:
    if node[0] in ("feature", "error"):
      assert node[1] < LAYER

  def pos(node):
    return node[1] if node[0] == "token" else node[2]

  assert all(pos(n) <= key_pos for n in qk.key_nodes if n[0] != "bias")
  assert max(pos(n) for n in qk.query_nodes if n[0] != "bias") == query_pos
  features = [i for i, n in enumerate(qk.query_nodes) if n[0] == "feature"]
  assert features, "some feature must feed the query"
  # Independent check: remove the biggest feature's writes, run forward.
  i = max(features, key=lambda j: np.abs(qk.query_vectors[j]).max())
  _, source, pos, latent = qk.query_nodes[i]
  written = np.array(rep.written, np.float64)
  act = float(rep.features[source][pos][latent])
  for target in range(source, rep.num_layers):
    dec = dictionary.decoder(source, target)
    if dec is not None:
      row = to_numpy(dec.unwrap("latents", "embedding"), np.float64)[latent]
      written[target, pos] -= act * row
  reads = site_reads(rep, [("attn.q", LAYER)])

  def q_of(w):
    (value,), _ = reads(jnp.zeros(rep.embed.shape), jnp.asarray(w, jnp.float32))
    user = heads.to_user_heads(value).unwrap("seq", "heads", "projection")
    return to_numpy(user, np.float64)[query_pos, HEAD]

  removed = q_of(rep.written) - q_of(written)
  np.testing.assert_allclose(qk.query_vectors[i], removed, atol=1e-4, rtol=1e-3)
  assert np.abs(removed).max() > 1e-3
  # Negative control: without the bias node the pairs do not add up.
  kept = [j for j, n in enumerate(qk.query_nodes) if n != ("bias",)]
  partial = float(qk.pairs[kept].sum())
  assert abs(partial - float(q @ k)) > 1e-3
  top = qk.top(3)
  assert len(top) == 3 and abs(top[0][2]) >= abs(top[1][2]) >= abs(top[2][2])


def test_qk_attribution_errors():
  model, tok = tiny()
  rep = replacement_model(model, random_set(2), gs.named_tokens([tok.encode("a b")]))
  with pytest.raises(InputError, match="layer 9"):
    qk_attribution(rep, 9, 0, 1, 0)
  with pytest.raises(InputError, match="need 0 <= key <= query"):
    qk_attribution(rep, 1, 0, 0, 1)
  with pytest.raises(InputError, match="head 99"):
    qk_attribution(rep, 1, 99, 1, 0)
