"""Tests of `gemma_surgery.surgery.interventions` on the tiny Hugging Face fixtures.

Exact arithmetic checks against the safetensors weights (zeroing a head at
``attn.z`` removes ``z_h · W_O[h]``; deactivating a neuron removes
``hidden_j · W_down[:, j]``), activation patching between prompts, attention
knockout with left padding and under Penzai's KV-cached decoding, top-k
captures against ``jax.lax.top_k``, zero-effect settings, and every bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import random_tokens
from helpers.paths import HF_FIXTURES, HF_VARIANTS
from penzai import pz
from penzai.models.transformer import sampling_mode
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.surgery import interventions as iv
from gemma_surgery.surgery.layers.ablate import Patch

SEQ = 12  # > gemma2's sliding window (8).
_MODELS: dict[str, object] = {}


def _model(variant: str):
  if variant not in _MODELS:
    path = HF_FIXTURES / variant
    _MODELS[variant] = gs.load(path, dtype="float32", progress=False).model
  return _MODELS[variant]


def _tokens(seed: int = 0, batch: int = 2, seq: int = SEQ) -> np.ndarray:
  return random_tokens(batch, seq, seed)


def _named(x: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq")


def _np(x: pz.nx.NamedArray, *axes: str) -> np.ndarray:
  return np.asarray(x.unwrap(*axes), np.float64)


def _logits(model, tokens, **side) -> np.ndarray:
  return _np(model(_named(tokens), **side), "batch", "seq", "vocabulary")


def _heads(h: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(h, jnp.float32)).tag("heads")


# --- No-op settings -------------------------------------------------------------


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_zero_effect_settings_leave_logits_identical(variant):
  model = _model(variant)
  tokens = _tokens()
  noop = gs.chain(
    model,
    lambda m: iv.boost_neurons(m, None, [0, 5], 1.0),
    lambda m: iv.knock_out_heads(m, None, []),
    lambda m: iv.rescale_pattern(m, None, _heads(np.ones(4))),
    lambda m: iv.ablate(m, "attn.z", None, heads=[]),
    lambda m: iv.ablate(m, "mlp.hidden", None, neurons=[]),
  )
  np.testing.assert_allclose(_logits(noop, tokens), _logits(model, tokens), atol=1e-6)
  assert gs.unpatch(noop) == model


# --- Exact arithmetic on Gemma 1 (no post-sublayer norms) -----------------------


@pytest.mark.parametrize("variant", ["gemma1_mha", "gemma1_mqa"])
def test_zeroing_head_z_removes_its_output_projection(variant):
  model, layer, head = _model(variant), 1, 2
  weights = load_file(HF_FIXTURES / variant / "model.safetensors")
  w_o = weights[f"model.layers.{layer}.self_attn.o_proj.weight"]  # [D, N*H]
  tokens = _tokens()
  clean, acts = gs.capture(model, ["attn.z", "resid_mid"], layer)
  clean(_named(tokens))
  ablated, after = gs.capture(
    iv.ablate(model, "attn.z", layer, heads=[head]), ["attn.z", "resid_mid"], layer
  )
  ablated(_named(tokens))
  z = _np(acts["attn.z", layer], "batch", "seq", "heads", "projection")
  h = z.shape[-1]
  expected = -z[:, :, head] @ w_o[:, head * h : (head + 1) * h].T
  delta = _np(after["resid_mid", layer], "batch", "seq", "embedding") - _np(
    acts["resid_mid", layer], "batch", "seq", "embedding"
  )
  np.testing.assert_allclose(delta, expected, atol=2e-5)
  z_after = _np(after["attn.z", layer], "batch", "seq", "heads", "projection")
  assert np.all(z_after[:, :, head] == 0)
  others = [i for i in range(4) if i != head]
  np.testing.assert_array_equal(z_after[:, :, others], z[:, :, others])


@pytest.mark.parametrize("variant", ["gemma1_mha", "gemma1_mqa"])
def test_deactivating_a_neuron_removes_its_down_projection(variant):
  model, layer, neuron = _model(variant), 0, 7
  w_down = load_file(HF_FIXTURES / variant / "model.safetensors")[
    f"model.layers.{layer}.mlp.down_proj.weight"
  ]  # [D, F]
  tokens = _tokens(1)
  clean, acts = gs.capture(model, ["mlp.hidden", "mlp.out"], layer)
  clean(_named(tokens))
  edited, after = gs.capture(
    iv.deactivate_neurons(model, layer, [neuron]), ["mlp.out"], layer
  )
  edited(_named(tokens))
  hidden = _np(acts["mlp.hidden", layer], "batch", "seq", "neurons")
  expected = -hidden[:, :, neuron, None] * w_down[:, neuron]
  delta = _np(after["mlp.out", layer], "batch", "seq", "embedding") - _np(
    acts["mlp.out", layer], "batch", "seq", "embedding"
  )
  np.testing.assert_allclose(delta, expected, atol=2e-5)


def test_boost_scales_only_the_chosen_neurons():
  model, tokens = _model("gemma2"), _tokens(2)
  clean, acts = gs.capture(model, "mlp.hidden", 2)
  clean(_named(tokens))
  boosted, after = gs.capture(iv.boost_neurons(model, 2, [3, 9], 3.0), "mlp.hidden", 2)
  boosted(_named(tokens))
  before = _np(acts["mlp.hidden", 2], "batch", "seq", "neurons")
  factor = np.ones(before.shape[-1])
  factor[[3, 9]] = 3.0
  np.testing.assert_allclose(
    _np(after["mlp.hidden", 2], "batch", "seq", "neurons"), before * factor, rtol=1e-6
  )


def test_mean_and_value_ablation():
  model, tokens = _model("gemma2"), _tokens(3)
  clean, acts = gs.capture(model, "resid_post", 1)
  clean(_named(tokens))
  x = _np(acts["resid_post", 1], "batch", "seq", "embedding")
  mean, after = gs.capture(
    iv.ablate(model, "resid_post", 1, mode="mean"), "resid_post", 1
  )
  mean(_named(tokens))
  got = _np(after["resid_post", 1], "batch", "seq", "embedding")
  np.testing.assert_allclose(got, np.broadcast_to(x.mean((0, 1)), x.shape), atol=1e-5)
  value = pz.nx.wrap(jnp.arange(64.0)).tag("embedding")
  fixed, after = gs.capture(
    iv.ablate(model, "resid_post", 1, mode="value", value=value), "resid_post", 1
  )
  fixed(_named(tokens))
  got = _np(after["resid_post", 1], "batch", "seq", "embedding")
  np.testing.assert_array_equal(got, np.broadcast_to(np.arange(64.0), x.shape))


# --- Activation patching ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["gemma1_mha", "gemma2"])
def test_patching_resid_post_from_another_prompt(variant):
  model, layer = _model(variant), 0
  a, b = _tokens(10), _tokens(11)
  source, acts = gs.capture(model, "resid_post", layer)
  logits_b = _logits(source, b)
  stored = acts["resid_post", layer]
  logits_a = _logits(model, a)
  full = iv.patch(model, "resid_post", layer, stored)
  np.testing.assert_allclose(_logits(full, a), logits_b, atol=1e-5)
  p = 5
  partial = _logits(iv.patch(model, "resid_post", layer, stored, positions=[p]), a)
  np.testing.assert_allclose(partial[:, :p], logits_a[:, :p], atol=1e-6)
  assert np.all(np.abs(partial[:, p:] - logits_a[:, p:]).max(-1) > 1e-3)


def test_patching_chosen_heads_of_attn_z():
  model, layer, head = _model("gemma2"), 2, 1
  a, b = _tokens(12), _tokens(13)
  source, acts = gs.capture(model, "attn.z", layer)
  source(_named(b))
  z_b = acts["attn.z", layer]
  source(_named(a))
  z_a = _np(acts["attn.z", layer], "batch", "seq", "heads", "projection")
  patched, after = gs.capture(
    iv.patch(model, "attn.z", layer, z_b, heads=[head]), "attn.z", layer
  )
  patched(_named(a))
  got = _np(after["attn.z", layer], "batch", "seq", "heads", "projection")
  expected = z_a.copy()
  expected[:, :, head] = _np(z_b, "batch", "seq", "heads", "projection")[:, :, head]
  np.testing.assert_array_equal(got, expected)


# --- Attention patterns -----------------------------------------------------------


def _pattern(acts, layer) -> np.ndarray:
  return _np(acts["attn.pattern", layer], "batch", "seq", "heads", "kv_seq")


def test_knockout_puts_all_mass_on_bos_within_reach():
  """gemma2: layer 0 is local (window 8), layer 1 global."""
  model, knocked_heads = _model("gemma2"), [0, 3]
  tokens = _tokens(4)
  clean, acts = gs.capture(model, "attn.pattern", [0, 1])
  clean(_named(tokens))
  knocked, after = gs.capture(
    iv.knock_out_heads(model, [0, 1], knocked_heads), "attn.pattern", [0, 1]
  )
  knocked(_named(tokens))
  for layer, window in [(0, 8), (1, None)]:
    got = _pattern(after, layer)
    bos = np.zeros((SEQ, SEQ))
    bos[: window or SEQ, 0] = 1.0
    for h in range(4):
      if h in knocked_heads:
        np.testing.assert_array_equal(got[:, :, h], np.broadcast_to(bos, (2, SEQ, SEQ)))
      elif layer == 0:  # Later layers see the knockout's effect.
        np.testing.assert_array_equal(got[:, :, h], _pattern(acts, layer)[:, :, h])


def test_override_with_bos_pattern_equals_knockout():
  model, tokens = _model("gemma1_mha"), _tokens(5)
  bos = np.zeros((SEQ, SEQ), np.float32)
  bos[:, 0] = 1.0
  pattern = pz.nx.wrap(jnp.asarray(bos)).tag("seq", "kv_seq")
  overridden = iv.override_pattern(model, None, pattern, heads=[1])
  knocked = iv.knock_out_heads(model, None, [1])
  np.testing.assert_allclose(
    _logits(overridden, tokens), _logits(knocked, tokens), atol=1e-6
  )


def test_rescaling_a_head_to_zero_equals_zeroing_its_z():
  model, tokens = _model("gemma3"), _tokens(6)
  rescaled = iv.rescale_pattern(model, 1, _heads([1, 1, 0, 1]))
  ablated = iv.ablate(model, "attn.z", 1, heads=[2])
  np.testing.assert_allclose(
    _logits(rescaled, tokens), _logits(ablated, tokens), atol=1e-6
  )


def test_rescale_over_kv_seq_with_renormalisation():
  model, tokens = _model("gemma1_mqa"), _tokens(7)
  factors = np.linspace(0.5, 2.0, SEQ).astype(np.float32)
  clean, acts = gs.capture(model, "attn.pattern", 0)
  clean(_named(tokens))
  named = pz.nx.wrap(jnp.asarray(factors)).tag("kv_seq")
  edited, after = gs.capture(
    iv.rescale_pattern(model, 0, named, renormalize=True), "attn.pattern", 0
  )
  edited(_named(tokens))
  expected = _pattern(acts, 0) * factors
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(_pattern(after, 0), expected, atol=1e-6)


def _left_padded(pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Row 0 is row 1's first SEQ - pad tokens behind ``pad`` pad tokens (id 0)."""
  tokens = _tokens(8)
  tokens[0, pad:] = tokens[1, : SEQ - pad]
  tokens[0, :pad] = 0
  positions = np.tile(np.arange(SEQ, dtype=np.int32), (2, 1))
  positions[0] = np.arange(SEQ) - pad
  positions[0, :pad] = -1
  return tokens, positions


def test_knockout_with_left_padding():
  model, pad = _model("gemma2"), 3
  tokens, positions = _left_padded(pad)
  knocked, acts = gs.capture(iv.knock_out_heads(model, None, [1, 2]), "attn.pattern")
  logits = _logits(knocked, tokens, token_positions=_named(positions))
  np.testing.assert_allclose(logits[0, pad:], logits[1, : SEQ - pad], atol=1e-5)
  got = _pattern(acts, 1)  # Global layer.
  assert np.all(got[0, pad:, 1:3, pad] == 1.0)
  assert np.all(got[0, :pad, 1:3] == 0.0)
  assert got[0, pad:, 1:3].sum() == (SEQ - pad) * 2


@pytest.mark.parametrize("variant", ["gemma2"])
def test_knockout_under_kv_cached_decoding(variant):
  model, pad = _model(variant), 2
  tokens, positions = _left_padded(pad)
  knocked = iv.knock_out_heads(model, None, [0, 3])
  expected = _logits(knocked, tokens, token_positions=_named(positions))
  cached = sampling_mode.KVCachingTransformerLM.from_uncached(
    knocked, cache_len=SEQ, batch_axes={"batch": 2}
  )
  step = gs.jit_forward(cached)  # One compile; threads the cache through.
  steps = []
  for t in range(SEQ):  # Token by token, past gemma2's window (8).
    steps.append(_np(step(_named(tokens[:, t : t + 1])), "batch", "seq", "vocabulary"))
  got = np.concatenate(steps, axis=1)
  tol = 1e-5 * np.abs(expected).max()  # float32 noise of cache vs full-seq sums.
  np.testing.assert_allclose(got[0, pad:], expected[0, pad:], rtol=0, atol=tol)
  np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=tol)
  unknocked = _logits(model, tokens, token_positions=_named(positions))
  assert np.abs(expected[1] - unknocked[1]).max() > 1e-3


# --- Top-k captures ----------------------------------------------------------------


@pytest.mark.parametrize(
  ("site", "axis", "k"), [("mlp.hidden", "neurons", 5), ("attn.pattern", "kv_seq", 3)]
)
def test_topk_capture_equals_lax_top_k_of_full_capture(site, axis, k):
  model, tokens = _model("gemma2"), _tokens(9)
  full, acts = gs.capture(model, site, [0, -1])
  both, top = iv.capture_topk(full, site, [0, -1], k)
  both(_named(tokens))
  for layer in (0, -1):
    values, indices = top[site, layer]
    rest = [a for a in acts[site, layer].named_axes if a != axis]
    ref_v, ref_i = jax.lax.top_k(acts[site, layer].unwrap(*rest, axis), k)
    np.testing.assert_array_equal(values.unwrap(*rest, "top_k"), ref_v)
    np.testing.assert_array_equal(indices.unwrap(*rest, "top_k"), ref_i)


def test_topk_capture_records_every_step_of_fused_generation():
  """Top-k buffers in the fused loop equal top-k of the full generation capture."""
  model, tokens = _model("gemma2"), _tokens(3, batch=2, seq=6)
  full, _ = gs.capture(model, "mlp.hidden", [1])
  both, top = iv.capture_topk(full, "mlp.hidden", [1], 4)
  out = gs.generate(both, tokens, max_new_tokens=5)
  hidden = out.captures["mlp.hidden", 1]
  assert hidden.named_shape["seq"] == 6 + 5
  values, indices = top["mlp.hidden", 1]
  ref_v, ref_i = jax.lax.top_k(hidden.unwrap("batch", "seq", "neurons"), 4)
  np.testing.assert_array_equal(values.unwrap("batch", "seq", "top_k"), ref_v)
  np.testing.assert_array_equal(indices.unwrap("batch", "seq", "top_k"), ref_i)
  assert ("mlp.hidden", 1) in out.captures and len(out.captures.keys()) == 1


# --- Bad inputs ------------------------------------------------------------------


def _z(**shape):
  return pz.nx.zeros(shape)


BAD = {
  "head out of range": (lambda m: iv.ablate(m, "attn.z", 0, heads=[4]), "0..3"),
  "kv head out of range (MQA has 1)": (
    lambda m: iv.ablate(m, "attn.k", 0, heads=[2]),
    "0..0",
  ),
  "negative head": (lambda m: iv.knock_out_heads(m, 0, [-1]), "0..3"),
  "neuron out of range": (lambda m: iv.deactivate_neurons(m, 0, [128]), "0..127"),
  "float index": (lambda m: iv.deactivate_neurons(m, 0, [1.0]), "ints"),
  "unknown mode": (lambda m: iv.ablate(m, "resid_post", 0, mode="half"), "valid"),
  "value without value mode": (
    lambda m: iv.ablate(m, "resid_post", 0, value=_z(embedding=64)),
    "mode='value'",
  ),
  "value with a wrong size": (
    lambda m: iv.ablate(m, "resid_post", 0, mode="value", value=_z(embedding=63)),
    "embedding=63",
  ),
  "value with a foreign axis": (
    lambda m: iv.ablate(m, "resid_post", 0, mode="value", value=_z(neurons=128)),
    "neurons",
  ),
  "plain array value": (
    lambda m: iv.patch(m, "resid_post", 0, np.zeros((2, SEQ, 64))),
    "NamedArray",
  ),
  "patch value missing site axes": (
    lambda m: iv.patch(m, "attn.z", 0, _z(batch=2, seq=SEQ, projection=16)),
    "heads",
  ),
  "patch value with wrong heads": (
    lambda m: iv.patch(m, "attn.z", 0, _z(seq=SEQ, heads=2, projection=16)),
    "heads=2",
  ),
  "patch positions out of range": (
    lambda m: iv.patch(m, "resid_post", 0, _z(seq=SEQ, embedding=64), positions=[SEQ]),
    f"0..{SEQ - 1}",
  ),
  "patch position mask of another length": (
    lambda m: iv.patch(
      m,
      "resid_post",
      0,
      _z(seq=SEQ, embedding=64),
      positions=pz.nx.ones({"seq": 3}, bool),
    ),
    "seq=3",
  ),
  "NaN patch": (
    lambda m: iv.patch(m, "resid_post", 0, _z(seq=SEQ, embedding=64) * jnp.nan),
    "NaN",
  ),
  "infinite boost": (lambda m: iv.boost_neurons(m, 0, [1], jnp.inf), "NaN"),
  "no neurons to scale": (lambda m: iv.boost_neurons(m, 0, None, 2.0), "neuron"),
  "pattern without kv_seq": (
    lambda m: iv.override_pattern(m, 0, _z(seq=SEQ)),
    "kv_seq",
  ),
  "rescale with embedding axis": (
    lambda m: iv.rescale_pattern(m, 0, _z(embedding=64)),
    "embedding",
  ),
  "rescale with wrong heads": (
    lambda m: iv.rescale_pattern(m, 0, _z(heads=5)),
    "heads=5",
  ),
  "top-k k too large": (lambda m: iv.capture_topk(m, "mlp.hidden", 0, 129), "1..128"),
  "top-k k zero": (lambda m: iv.capture_topk(m, "attn.pattern", 0, 0), "k=0"),
}
SITE_ERRORS = {
  "patch of several layers": (
    lambda m: iv.patch(m, "resid_post", [0, 1], _z(seq=SEQ, embedding=64)),
    "one layer",
  ),
  "neurons at a non-MLP site": (
    lambda m: iv.ablate(m, "attn.z", 0, neurons=[0]),
    "mlp.hidden",
  ),
  "heads at a non-head site": (
    lambda m: iv.ablate(m, "resid_post", 0, heads=[0]),
    "head site",
  ),
  "unknown site": (lambda m: iv.ablate(m, "resid", 0), "valid sites"),
  "layer out of range": (lambda m: iv.knock_out_heads(m, 9, [0]), "valid: -3..2"),
  "top-k without axis": (lambda m: iv.capture_topk(m, "resid_post", 0, 2), "axis="),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_surgery_error(case):
  rewrite, fragment = BAD[case]
  with pytest.raises(errors.SurgeryError) as info:
    rewrite(_model("gemma1_mqa"))
  assert fragment in str(info.value)


@pytest.mark.parametrize("case", list(SITE_ERRORS))
def test_bad_sites_raise_site_error(case):
  rewrite, fragment = SITE_ERRORS[case]
  with pytest.raises(errors.SiteError) as info:
    rewrite(_model("gemma1_mqa"))
  assert fragment in str(info.value)


def test_patch_of_another_length_fails_when_run():
  layer = Patch(value=_z(seq=SEQ, embedding=64), site="resid_post")
  with pytest.raises(errors.SurgeryError, match="seq=12"):
    layer(_z(batch=2, seq=6, embedding=64))
