"""Splicing a CLT / transcoder set into the real (embedded) model.

References: the clean model's captured ``mlp.in``/``mlp.out`` pushed through
the numpy CLT equations (f_l = JumpReLU(x_l W_enc + b_enc), y_k = Σ_{l≤k}
f_l W_dec[l→k] + b_dec[k] + x_k W_skip[k]); negative controls show each
check can fail.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from helpers.circuits import random_clt, random_set, tiny
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.errors import SAEError
from gemma_surgery.host import to_numpy
from gemma_surgery.sae import feature_edits, shard_sae, splice_clt
from gemma_surgery.sae.splice_clt import CLTEncode
from gemma_surgery.surgery import run
from gemma_surgery.surgery.layers.base import SurgeryLayer

N = 6
TEXT = "a b c a b c d"


def _arrays(clt) -> dict[str, np.ndarray]:
  axes = {
    "w_enc": ("layer", "embedding", "latents"),
    "b_enc": ("layer", "latents"),
    "threshold": ("layer", "latents"),
    "w_dec": ("layer", "latents", "out_layer", "embedding"),
    "b_dec": ("out_layer", "embedding"),
    "w_skip": ("out_layer", "embedding", "embedding_out"),
  }
  return {
    k: to_numpy(getattr(clt, k).value.unwrap(*a), np.float64) for k, a in axes.items()
  }


def _np_features(p, layer, x):
  pre = x @ p["w_enc"][layer] + p["b_enc"][layer]
  return np.where(pre > p["threshold"][layer], pre, 0.0)


def _np_output(p, k, feats, x_k):
  y = p["b_dec"][k] + x_k @ p["w_skip"][k]
  for source in range(k + 1):
    y = y + feats[source] @ p["w_dec"][source, :, k, :]
  return y


def _run(model, tokens, wanted=()):
  """Logits ``[seq, vocab]`` and ``{(site, layer): [seq, d]}`` float64."""
  captures = []
  for site, layer in wanted:
    model, acts = gs.capture(model, site, layer)
    captures.append(acts)
  logits = to_numpy(model(tokens).unwrap("batch", "seq", "vocabulary"), np.float64)
  values = {
    key: to_numpy(acts[key].unwrap("batch", "seq", "embedding"), np.float64)[0]
    for key, acts in zip(wanted, captures, strict=True)
  }
  return logits[0], values


def _setup():
  model, tok = tiny()
  return model, gs.named_tokens([tok.encode(TEXT)])


ALL_SITES = [(s, i) for s in ("mlp.in", "mlp.out") for i in range(N)]


def test_error_term_keeps_logits_and_features_match_numpy():
  model, tokens = _setup()
  clt = random_clt(3)
  p = _arrays(clt)
  clean_logits, clean = _run(model, tokens, ALL_SITES)
  spliced, feats = splice_clt(model, clt, use_error_term=True, capture_features=True)
  logits, _ = _run(spliced, tokens)
  np.testing.assert_allclose(logits, clean_logits, atol=1e-4, rtol=0)
  active = 0
  for layer in range(N):
    got = to_numpy(feats["sae.features", layer].unwrap("batch", "seq", "latents"))[0]
    want = _np_features(p, layer, clean["mlp.in", layer])
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-4, rtol=1e-4)
    assert (got[0] == 0).all()  # BOS is not spliced by default.
    active += int((got > 0).sum())
  assert active > 20
  # Negative control: without the error term the logits move.
  logits_no_err, _ = _run(splice_clt(model, clt), tokens)
  assert np.abs(logits_no_err - clean_logits).max() > 1e-2


def test_reconstruction_follows_the_clt_equations_on_its_own_run():
  """Without the error term every mlp.out[k] (k ≥ 0, non-BOS) equals the numpy
  CLT applied to the spliced run's own mlp.in[0..k]; BOS keeps the MLP."""
  model, tokens = _setup()
  clt = random_clt(4)
  p = _arrays(clt)
  # Captures inserted after the splice sit after its layers at each site.
  _, got = _run(splice_clt(model, clt), tokens, ALL_SITES)
  feats = [_np_features(p, i, got["mlp.in", i]) for i in range(N)]
  for k in range(N):
    want = _np_output(p, k, feats, got["mlp.in", k])
    np.testing.assert_allclose(got["mlp.out", k][1:], want[1:], atol=2e-4, rtol=1e-4)
  # Negative control: dropping the cross-layer decoders breaks the equality.
  p_local = dict(p, w_dec=p["w_dec"] * np.eye(N)[:, None, :, None])
  local = _np_output(p_local, N - 1, feats, got["mlp.in", N - 1])
  assert np.abs(local[1:] - got["mlp.out", N - 1][1:]).max() > 1e-2
  # The MLP itself still runs at BOS: its output there is the clean one.
  _, clean = _run(model, tokens, [("mlp.out", 0)])
  np.testing.assert_allclose(got["mlp.out", 0][0], clean["mlp.out", 0][0], atol=1e-5)


def test_clamp_with_error_term_adds_the_decoder_rows_of_every_later_layer():
  model, tokens = _setup()
  clt = random_clt(5)
  p = _arrays(clt)
  layer, latent, value = 2, 7, 3.0
  edits = {layer: feature_edits(clt, clamp={latent: value})}
  _, clean = _run(model, tokens, ALL_SITES)
  spliced = splice_clt(model, clt, use_error_term=True, edits=edits)
  _, got = _run(spliced, tokens, ALL_SITES)
  for k in range(layer):  # Untouched before the edited layer.
    np.testing.assert_allclose(got["mlp.out", k], clean["mlp.out", k], atol=1e-5)
  f = _np_features(p, layer, clean["mlp.in", layer])[:, latent]
  delta = (value - f)[1:, None] * p["w_dec"][layer, latent, layer][None]
  want = clean["mlp.out", layer][1:] + delta
  np.testing.assert_allclose(got["mlp.out", layer][1:], want, atol=1e-4, rtol=1e-4)
  assert np.abs(delta).max() > 1e-2
  # A later layer moves too (decoder to k > layer plus downstream effects).
  assert np.abs(got["mlp.out", N - 1] - clean["mlp.out", N - 1]).max() > 1e-3


def test_transcoder_set_splice():
  model, tokens = _setup()
  tcs = random_set(2)
  clean_logits, clean = _run(model, tokens, [("mlp.in", 1)])
  spliced, feats = splice_clt(model, tcs, use_error_term=True, capture_features=True)
  np.testing.assert_allclose(_run(spliced, tokens)[0], clean_logits, atol=1e-4)
  assert sorted(feats.keys()) == [("sae.features", i) for i in range(N)]
  tc = tcs.transcoders[1]
  w_enc = to_numpy(tc.w_enc.value.unwrap("embedding", "latents"), np.float64)
  b_enc = to_numpy(tc.b_enc.value.unwrap("latents"), np.float64)
  theta = to_numpy(tc.activation.threshold.value.unwrap("latents"), np.float64)
  pre = clean["mlp.in", 1] @ w_enc + b_enc
  want = np.where(pre > theta, pre, 0.0)
  got = to_numpy(feats["sae.features", 1].unwrap("batch", "seq", "latents"))[0]
  np.testing.assert_allclose(got[1:], want[1:], atol=1e-4, rtol=1e-4)
  assert np.abs(_run(splice_clt(model, tcs), tokens)[0] - clean_logits).max() > 1e-2


def test_sharded_clt_over_8_devices_matches_unsharded():
  model, tokens = _setup()
  clt = random_clt(6)
  want = _run(splice_clt(model, clt), tokens)[0]
  mesh = gs.make_mesh({"model": 8})
  sharded = shard_sae(clt, mesh)
  shards = sharded.w_dec.value.data_array.addressable_shards
  assert len(shards) == 8 and shards[0].data.shape[1] == clt.info.width // 8
  logits = run.jit_forward(splice_clt(model, sharded))(tokens)
  got = to_numpy(logits.unwrap("batch", "seq", "vocabulary"), np.float64)[0]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  # shard_model of a spliced model places the CLT along latents too.
  placed = gs.shard_model(splice_clt(model, clt), gs.make_mesh({"data": 2, "model": 4}))
  layer = pz.select(placed).at_instances_of(CLTEncode).get_sequence()[0]
  assert "model" in tuple(layer.clt.w_enc.value.data_array.sharding.spec)


def test_splice_is_pure_jittable_and_unpatches():
  model, tokens = _setup()
  clt = random_clt(7)
  spliced = splice_clt(model, clt)
  assert pz.select(model).at_instances_of(SurgeryLayer).count() == 0
  assert pz.select(spliced).at_instances_of(SurgeryLayer).count() == 2 * N
  eager = _run(spliced, tokens)[0]
  jitted = run.jit_forward(spliced)
  for _ in range(2):  # The pending state is reset after every call.
    out = to_numpy(jitted(tokens).unwrap("batch", "seq", "vocabulary"), np.float64)[0]
    np.testing.assert_allclose(out, eager, atol=1e-4, rtol=1e-5)
  restored = gs.unpatch(spliced)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(model)


def test_splice_clt_errors():
  model, _ = _setup()
  clt = random_clt(8)
  with pytest.raises(SAEError, match="CrossLayerTranscoder or TranscoderSet"):
    splice_clt(model, object())
  with pytest.raises(SAEError, match="layer 9"):
    splice_clt(model, clt, edits={9: feature_edits(clt, ablate=[0])})
  with pytest.raises(SAEError, match="FeatureEdits for 24"):
    splice_clt(model, clt, edits={1: feature_edits(5, ablate=[0])})
  with pytest.raises(SAEError, match="mapping"):
    splice_clt(model, clt, edits=feature_edits(clt, ablate=[0]))
  with pytest.raises(SAEError, match="positions"):
    splice_clt(model, clt, positions="middle")
  short = dataclasses.replace(clt, info=dataclasses.replace(clt.info, num_layers=3))
  with pytest.raises(SAEError, match="covers 3 layers"):
    splice_clt(model, short)


def test_fused_generation_with_a_clamped_clt_equals_the_uncached_model():
  """A CLT spliced with its error term and a clamp, in the fused KV-cached
  loop: the greedy tokens equal the argmax of the uncached spliced model run
  on the whole sequence (teacher forcing), the features captured while
  decoding equal one forward pass's, and the clamp changes the continuation
  (so the pending cross-layer state really flows through decoding)."""
  model, tok = tiny()
  clt = random_clt(9)
  edits = {1: feature_edits(clt, clamp={4: 40.0})}
  spliced, feats = splice_clt(
    model, clt, use_error_term=True, capture_features=True, edits=edits
  )
  prompt = np.array([tok.encode(TEXT)])
  steps = 8
  out = gs.generate(spliced, prompt, max_new_tokens=steps)
  full = np.concatenate([prompt, out.tokens], axis=1)
  logits, _ = _run(spliced, gs.named_tokens(full))
  n = prompt.shape[1]
  np.testing.assert_array_equal(logits[n - 1 : -1].argmax(-1), out.tokens[0])
  during = {
    layer: to_numpy(
      out.captures["sae.features", layer].unwrap("batch", "seq", "latents")
    )
    for layer in range(N)
  }
  for layer in range(N):  # `_run` above refilled feats with the forward's.
    forward = to_numpy(feats["sae.features", layer].unwrap("batch", "seq", "latents"))
    assert during[layer].shape == forward.shape == (1, n + steps, clt.info.width)
    np.testing.assert_allclose(during[layer], forward, atol=1e-4, rtol=1e-4)
  plain = gs.greedy_generate(model, prompt, max_new_tokens=steps)
  assert not np.array_equal(plain, out.tokens), "the clamp should change the tokens"
