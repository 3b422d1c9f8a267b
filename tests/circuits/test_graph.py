"""Replacement model and attribution graphs on the embedded model.

The replacement must reproduce the real logits; every edge must equal the
Jacobian entry of the frozen-attention replacement (autodiff, float64) times
the source's value; rows must be complete (row sum + bias terms = the
target's pre-activation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.circuits import random_set, tiny, traced
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.circuits.graph import attribute, attribute_replacement
from gemma_surgery.circuits.linear import linear_reads
from gemma_surgery.circuits.replacement import AddInput, replacement_model
from gemma_surgery.errors import InputError, SAEError
from gemma_surgery.sae.clt import TranscoderSet
from gemma_surgery.surgery import sites


def _tokens(tok, text="The value is 3 and the value is"):
  return gs.named_tokens([tok.encode(text)])


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_replacement_reproduces_logits(kind):
  model, _, _, tokens, rep, _ = traced(kind)
  real = np.asarray(model(tokens).unwrap("batch", "seq", "vocabulary"))[0]
  got = np.asarray(rep.model(tokens).unwrap("batch", "seq", "vocabulary"))[0]
  np.testing.assert_allclose(got, real, atol=1e-4, rtol=0)
  assert sum(int((f > 0).sum()) for f in rep.features) > 20
  assert all((f[0] == 0).all() for f in rep.features)  # BOS excluded.
  # Negative control: without the error nodes the logits move.
  no_err = linear_reads(rep)(
    jnp.zeros(rep.embed.shape), jnp.asarray(rep.written - rep.errors)
  )[1]
  assert np.abs(np.asarray(no_err) - real[-1]).max() > 1e-2


def _edge_reference(rep, graph):
  """Float64 Jacobian of the frozen replacement wrt feature activations,
  error scales and embedding scales, evaluated at the prompt."""
  dictionary = rep.dictionary
  n, n_pos, d = rep.errors.shape
  reads = linear_reads(rep, jnp.float64)
  feats0 = [jnp.asarray(f, jnp.float64) for f in rep.features]
  idx = graph.features

  def targets(a, err_scale, tok_scale):
    feats = list(feats0)
    for layer in range(n):
      rows = np.flatnonzero(idx[:, 0] == layer)
      feats[layer] = feats[layer].at[idx[rows, 1], idx[rows, 2]].set(a[rows])
    written = []
    for k in range(n):
      out = dictionary.bias(k).unwrap("embedding").astype(jnp.float64)
      for source in range(k + 1):
        dec = dictionary.decoder(source, k)
        if dec is not None:
          w = dec.unwrap("latents", "embedding").astype(jnp.float64)
          out = out + feats[source] @ w
      written.append(out + err_scale[k][:, None] * rep.errors[k])
    written = jnp.stack(written)
    embed = jnp.asarray(rep.embed, jnp.float64)
    mlp_in, logits = reads((tok_scale[:, None] - 1.0) * embed, written)
    pre = []
    for layer, pos, latent in idx:
      w = dictionary.encoder(int(layer)).unwrap("embedding", "latents")[:, latent]
      b = dictionary.encoder_bias(int(layer)).unwrap("latents")[latent]
      pre.append(mlp_in[layer, pos] @ w.astype(jnp.float64) + b)
    demeaned = logits[graph.logit_ids] - logits.mean()
    return jnp.concatenate([jnp.stack(pre), demeaned])

  a0 = jnp.asarray(graph.activations, jnp.float64)
  ones_e, ones_t = jnp.ones((n, n_pos)), jnp.ones(n_pos)
  jac = jax.jacfwd(targets, argnums=(0, 1, 2))(a0, ones_e, ones_t)
  value = targets(a0, ones_e, ones_t)
  bias = targets(jnp.zeros_like(a0), 0 * ones_e, 0 * ones_t)
  return [np.asarray(j) for j in jac], np.asarray(value), np.asarray(bias)


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_edges_equal_frozen_jacobian_float64(kind):
  _, _, _, _, rep, _ = traced(kind)
  with jax.enable_x64():
    graph = attribute_replacement(
      rep, max_n_logits=3, max_feature_nodes=40, progress=False, dtype=jnp.float64
    )
    (j_feat, j_err, j_tok), value, bias = _edge_reference(rep, graph)
  n_f = graph.n_features
  rows = np.concatenate([np.arange(n_f), graph.logit_start + np.arange(3)])
  adj = graph.adjacency[rows]
  scale = np.abs(adj).max()
  want_feat = j_feat * graph.activations[None, :]
  np.testing.assert_allclose(adj[:, :n_f], want_feat, atol=1e-9 * scale, rtol=1e-6)
  np.testing.assert_allclose(
    adj[:, graph.error_start : graph.token_start],
    j_err.reshape(len(rows), -1),
    atol=1e-9 * scale,
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    adj[:, graph.token_start : graph.logit_start], j_tok, atol=1e-9 * scale, rtol=1e-6
  )
  # Complete: each row sums to the target's value minus its bias terms.
  np.testing.assert_allclose(adj.sum(1), value - bias, rtol=1e-7, atol=1e-9 * scale)
  # Same-layer and later features never feed a feature (causality).
  later = graph.features[:, 0][None, :] >= graph.features[:, 0][:n_f, None]
  if kind == "transcoders":
    assert (adj[:n_f, :n_f][later] == 0).all()
  assert np.abs(adj[:, :n_f]).max() > 0
  # The feature activations really are the model's (encode of the clean mlp.in).
  np.testing.assert_allclose(
    value[:n_f][graph.activations > 0], graph.activations, rtol=1e-5, atol=1e-5
  )


def test_real_model_gradient_differs_from_frozen():
  """Negative control: the unfrozen model's embedding gradient is not the
  token edges (attention patterns and norms also depend on the input)."""
  model, _, _, tokens, rep, graph = traced("transcoders")
  top = int(graph.logit_ids[0])
  n_pos, d = rep.embed.shape

  def real_target(delta):
    patched = sites.insert(
      model,
      "embed",
      None,
      lambda _: AddInput(
        delta=pz.nx.wrap(delta[None]).tag("batch", "seq", "embedding")
      ),
    )
    logits = patched(tokens).unwrap("batch", "seq", "vocabulary")[0, -1]
    return logits[top] - logits.mean()

  grad = np.asarray(jax.grad(real_target)(jnp.zeros((n_pos, d))))
  real_edges = (grad * rep.embed).sum(-1)
  frozen = graph.adjacency[graph.logit_start, graph.token_start : graph.logit_start]
  assert np.abs(real_edges - frozen).max() > 1e-2 * np.abs(frozen).max()


def test_bad_inputs():
  model, tok = tiny()
  with pytest.raises(InputError, match="batch: 1"):
    replacement_model(model, random_set(0), gs.named_tokens([[2, 5], [2, 6]]))
  small = TranscoderSet.of(list(random_set(0).transcoders[:3]))
  with pytest.raises(SAEError, match="covers 3 layers"):
    replacement_model(model, small, _tokens(tok))
  for bad in (
    {"max_feature_nodes": 0},
    {"max_feature_nodes": -5},
    {"batch_size": 0},
    {"max_n_logits": 0},
    {"desired_logit_prob": float("nan")},
  ):
    with pytest.raises(InputError, match="max_feature_nodes"):
      attribute(model, random_set(0), _tokens(tok), **bad)
