"""SAE feature analysis and corpus metrics vs numpy on the gemma2 fixture.

The reference: the clean model's captured ``resid_post`` pushed through the
published JumpReLU equations (`sae_writers.np_encode`), brute-force search for
max-activating examples, the numpy read-out head for the decoder lens, and the
array-level metric functions on the concatenated corpus.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sae_writers as W
from helpers.paths import HF_FIXTURES
from helpers.reference import rms_norm
from penzai import pz
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.sae import AutoEncoder, SAEInfo, evaluate, features, metrics

LAYER = 2


@pytest.fixture(scope="module")
def model():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


def _tokens(seed, batch=2, seq=10):
  ids = np.random.default_rng(seed).integers(4, 512, (batch, seq)).astype(np.int32)
  ids[:, 0] = 2
  return ids


def _resid(model, ids):
  patched, acts = gs.capture(model, "resid_post", [LAYER])
  patched(pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq"))
  return np.asarray(acts["resid_post", LAYER].unwrap("batch", "seq", "embedding"))


@pytest.fixture(scope="module")
def sae(model):
  calib = _resid(model, _tokens(99, 4, 16)).reshape(-1, 64)
  arrays = W.random_sae(5, inputs=calib)
  info = SAEInfo(family="res", layer=LAYER, site="resid_post", d_in=64, width=W.WIDTH)
  return AutoEncoder.from_arrays(arrays, info), arrays


def test_top_features_match_numpy(model, sae):
  enc, arrays = sae
  ids = _tokens(1)
  f = W.np_encode(_resid(model, ids), arrays)
  got_ids, got_values = features.top_features(model, enc, ids, k=4)
  expected = np.sort(f, axis=-1)[..., ::-1][..., :4]
  np.testing.assert_allclose(got_values[:, 1:], expected[:, 1:], atol=1e-4)
  picked = np.take_along_axis(f, got_ids, -1)
  np.testing.assert_allclose(picked[:, 1:], expected[:, 1:], atol=1e-4)
  assert (got_values[:, 0] == 0).all()  # BOS passes through the splice


def test_max_activating_examples_equal_brute_force(model, sae):
  enc, arrays = sae
  corpus = [_tokens(10, 2, 12), _tokens(11, 3, 9), _tokens(12, 1, 14)]
  chosen = [3, 40]
  got = features.max_activating_examples(
    model, enc, corpus, chosen, n=5, before=3, after=2, progress=False
  )
  rows = [row for batch in corpus for row in batch]
  for feature in chosen:
    found = []
    for r, row in enumerate(rows):
      f = W.np_encode(_resid(model, row[None]), arrays)[0, :, feature]
      found += [(f[p], r, p) for p in range(1, len(row)) if row[p] not in (0, 1, 2)]
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    examples = got[feature]
    assert [(e.row, e.position) for e in examples] == [(r, p) for _, r, p in found[:5]]
    np.testing.assert_allclose(
      [e.value for e in examples], [v for v, _, _ in found[:5]], atol=1e-4
    )
    for e in examples:
      row = rows[e.row]
      start = max(0, e.position - 3)
      assert e.context == [int(t) for t in row[start : e.position + 3]]
      assert e.context[e.index] == row[e.position]
      # the activations across the context come from the same numpy encode
      f = W.np_encode(_resid(model, row[None]), arrays)[0, :, feature]
      f[0] = 0.0  # BOS passes through the splice: no features there
      np.testing.assert_allclose(e.activations, f[start : e.position + 3], atol=1e-4)


def _np_readout(vector, weights):
  logits = rms_norm(vector, weights["model.norm.weight"], 1e-6) @ weights[
    "model.embed_tokens.weight"
  ].T.astype(np.float64)
  return np.tanh(logits / 30.0) * 30.0


def test_decoder_lens_and_steering_direction(model, sae):
  enc, arrays = sae
  weights = load_file(HF_FIXTURES / "gemma2" / "model.safetensors")
  lens = features.feature_logit_lens(model, enc, 7, k=5)
  expected = _np_readout(arrays["w_dec"][7].astype(np.float64), weights)
  order = np.argsort(-expected)
  np.testing.assert_allclose(lens["top"][1], expected[order[:5]], atol=1e-4)
  np.testing.assert_allclose(lens["bottom"][1], expected[order[::-1][:5]], atol=1e-4)
  vector = features.feature_direction(enc, 7, scale=3.0)
  np.testing.assert_allclose(
    np.asarray(vector.unwrap("embedding")), 3.0 * arrays["w_dec"][7], rtol=1e-6
  )
  unit = features.feature_direction(enc, 7, normalize=True)
  assert np.linalg.norm(np.asarray(unit.unwrap("embedding"))) == pytest.approx(
    1.0, abs=1e-5
  )


def test_steering_with_a_feature_raises_its_lens_tokens(model, sae):
  """Adding the decoder row at resid_post[2] raises the logits of the row's
  top lens tokens at the last position; subtracting it lowers them."""
  enc, _ = sae
  top = features.feature_logit_lens(model, enc, 7, k=10)["top"][0]
  ids = pz.nx.wrap(jnp.asarray(_tokens(3))).tag("batch", "seq")

  def mean_top_logit(m):
    logits = np.asarray(m(ids).unwrap("batch", "seq", "vocabulary"))[:, -1]
    return (logits[:, top] - logits.mean(-1, keepdims=True)).mean()

  base = mean_top_logit(model)
  up = mean_top_logit(features.steer_with_feature(model, enc, 7, 20.0))
  down = mean_top_logit(features.steer_with_feature(model, enc, 7, -20.0))
  assert up > base + 0.1 and down < base - 0.1


def test_neuronpedia_urls(sae):
  enc, _ = sae
  with pytest.raises(errors.SAEError, match="No Neuronpedia id"):
    features.neuronpedia_url(enc, 3)
  assert features.neuronpedia_url(
    enc, 3, source="gemma-2-2b/20-gemmascope-res-16k"
  ) == ("https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/3")
  known = dataclasses.replace(
    enc,
    info=dataclasses.replace(enc.info, neuronpedia="gemma-2-2b/2-gemmascope-res-16k"),
  )
  assert features.neuronpedia_url(known, 9, embed=True).startswith(
    "https://www.neuronpedia.org/gemma-2-2b/2-gemmascope-res-16k/9?embed=true"
  )


def test_corpus_metrics_equal_array_metrics_on_the_concatenation(model, sae):
  enc, arrays = sae
  corpus = [_tokens(20, 2, 10), _tokens(21, 3, 10)]
  got = evaluate(model, enc, corpus, progress=False)
  ids = np.concatenate(corpus)
  named = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
  x = _resid(model, ids)
  f = W.np_encode(x, arrays)
  x_hat = W.np_decode(f, arrays)
  mask = metrics.token_mask(ids)
  clean = model(named)
  spliced = gs.sae.splice_sae(model, enc)(named)
  ablated = gs.interventions.ablate(model, "resid_post", LAYER)(named)
  ce = [metrics.cross_entropy(lg, ids, mask) for lg in (clean, spliced, ablated)]
  kl = [metrics.kl_divergence(clean, lg, mask) for lg in (spliced, ablated)]
  expected = {
    "l0": metrics.l0(f, mask),
    "mse": metrics.mse(x, x_hat, mask),
    "explained_variance": metrics.explained_variance(x, x_hat, mask),
    "cosine_similarity": metrics.cosine_similarity(x, x_hat, mask),
    "dead_fraction": metrics.dead_fraction(metrics.feature_density(f, mask)),
    "delta_lm_loss": ce[1] - ce[0],
    "ce_loss_recovered": metrics.ce_loss_recovered(*ce),
    "kl_score": metrics.kl_score(*kl),
  }
  for key, value in expected.items():
    assert getattr(got, key) == pytest.approx(value, rel=1e-3, abs=1e-4), key
  assert got.num_tokens == int(mask.sum())
  other = AutoEncoder.from_arrays(W.random_sae(6, inputs=x.reshape(-1, 64)), enc.info)
  assert evaluate(model, other, corpus, progress=False).mse != pytest.approx(got.mse)


@pytest.mark.parametrize(
  "call",
  [
    lambda m, e: features.feature_direction(e, 128),
    lambda m, e: features.feature_logit_lens(m, e, -1),
    lambda m, e: features.steer_with_feature(m, e, 1000, 1.0),
    lambda m, e: features.max_activating_examples(
      m, e, [_tokens(0)], [2, 128], progress=False
    ),
    lambda m, e: features.neuronpedia_url(e, 128, source="a/b"),
    lambda m, e: features.top_features(m, e, _tokens(0), k=0),
  ],
)
def test_out_of_range_features_raise_sae_error(model, sae, call):
  with pytest.raises(errors.SAEError, match="0..127|1..128"):
    call(model, sae[0])


def test_logit_lens_of_an_sae_of_another_width_is_refused(model):
  arrays = W.random_sae(5, d_in=32)
  info = SAEInfo(family="res", layer=LAYER, site="resid_post", d_in=32, width=W.WIDTH)
  enc = AutoEncoder.from_arrays(arrays, info)
  with pytest.raises(errors.SAEError, match=r"input size is 32.* has 64 dim"):
    features.feature_logit_lens(model, enc, 0)


def test_evaluate_on_an_empty_corpus_is_an_input_error(model, sae):
  with pytest.raises(errors.InputError, match="corpus yielded no batch"):
    evaluate(model, sae[0], [], progress=False)
  only_specials = np.array([[2, 0, 1, 0]], np.int32)  # nothing counted: no NaNs
  with pytest.raises(errors.InputError, match=r"no counted token.*\(0, 1, 2\)"):
    evaluate(model, sae[0], [only_specials], progress=False)
