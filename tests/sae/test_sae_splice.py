"""Splicing SAEs and transcoders into the tiny HF fixture models.

Reference values come from the clean model's captured activations pushed
through the numpy JumpReLU equations of `sae_writers`; SAEs are random with
thresholds calibrated on other tokens so that 10-30% of the latents fire.
Every eager call uses the same ``[2, 12]`` token shape (so JAX's per-op
compile cache is reused) and clean runs are computed once per fixture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sae_writers as W
from helpers.paths import HF_FIXTURES
from penzai import pz
from penzai.models.transformer import sampling_mode
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.sae import (
  AutoEncoder,
  FeatureEdits,
  SAEInfo,
  Transcoder,
  feature_edits,
  set_edits,
  shard_sae,
  splice_sae,
)
from gemma_surgery.surgery import run
from gemma_surgery.surgery.layers.base import SurgeryLayer

TOL = 1e-5
BOS = 2
SITES = ("resid_post", "attn.z", "mlp.in", "mlp.in_unscaled", "mlp.out")
_CACHE: dict = {}


def _tokens(seed: int, batch: int = 2, seq: int = 12) -> np.ndarray:
  tokens = np.random.default_rng(seed).integers(3, 512, size=(batch, seq))
  tokens[:, 0] = BOS
  return tokens.astype(np.int32)


TOKENS = _tokens(0)


def _named(tokens: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")


def _model(variant: str):
  if variant not in _CACHE:
    _CACHE[variant] = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False)
  return _CACHE[variant].model


def _flat(value: pz.nx.NamedArray, site: str) -> np.ndarray:
  """``[batch, seq, d]`` float64 (attn.z flattened head-major)."""
  axes = ("heads", "projection") if site == "attn.z" else ("embedding",)
  array = np.asarray(value.unwrap("batch", "seq", *axes), np.float64)
  return array.reshape(*array.shape[:2], -1)


def _run(model, wanted, tokens=TOKENS) -> tuple[np.ndarray, dict]:
  """Logits and ``{(site, layer): [batch, seq, d]}`` in one forward pass."""
  patched = model
  captures = []
  for site, layer in wanted:
    patched, acts = gs.capture(patched, site, layer)
    captures.append(acts)
  logits = np.asarray(patched(_named(tokens)).unwrap("batch", "seq", "vocabulary"))
  pairs = zip(wanted, captures, strict=True)
  values = {key: _flat(acts[key], key[0]) for key, acts in pairs}
  return logits, values


def _clean(variant: str, tokens_seed: int = 0) -> tuple[np.ndarray, dict]:
  """Clean logits and activations at every SAE site and layer (cached)."""
  key = ("clean", variant, tokens_seed)
  if key not in _CACHE:
    model = _model(variant)
    wanted = [(s, i) for s in SITES for i in range(gs.sites.num_layers(model))]
    _CACHE[key] = _run(model, wanted, _tokens(tokens_seed) if tokens_seed else TOKENS)
  return _CACHE[key]


def _sae(variant, family, layer, *, seed=0, affine=False, gain=False):
  """A random SAE/transcoder for a fixture model; returns ``(sae, arrays)``."""
  site, out_site = {
    "res": ("resid_post", None),
    "mlp": ("mlp.out", None),
    "att": ("attn.z", None),
    "transcoder": ("mlp.in" if gain else "mlp.in_unscaled", "mlp.out"),
  }[family]
  calibration = _clean(variant, tokens_seed=100)[1][site, layer][:, 1:]
  arrays = W.random_sae(seed, affine=affine, inputs=calibration.reshape(-1, W.D))
  info = SAEInfo(
    family=family,
    layer=layer,
    site=site,
    d_in=W.D,
    width=W.WIDTH,
    out_site=out_site,
    d_out=W.D,
    source=f"test/{variant}/{family}/{layer}/{seed}",
  )
  cls = Transcoder if family == "transcoder" else AutoEncoder
  return cls.from_arrays(arrays, info), arrays


CASES = [
  ("gemma2", "res", 1, False),
  ("gemma2", "mlp", 0, False),
  ("gemma2", "att", 2, False),
  ("gemma3", "transcoder", 2, False),
  ("gemma3", "transcoder", 4, True),
]


# --- Error term, reconstruction, BOS -------------------------------------------


@pytest.mark.parametrize("variant,family,layer,affine", CASES)
def test_error_term_is_exact_and_features_match(variant, family, layer, affine):
  sae, arrays = _sae(variant, family, layer, affine=affine, gain=affine)
  clean_logits, clean = _clean(variant)
  spliced, feats = splice_sae(
    _model(variant), sae, use_error_term=True, capture_features=True
  )
  logits, _ = _run(spliced, [])
  np.testing.assert_array_equal(logits, clean_logits)
  f = np.asarray(feats.value().unwrap("batch", "seq", "latents"))
  expected = W.np_encode(clean[sae.info.site, layer], arrays)
  np.testing.assert_allclose(f[:, 1:], expected[:, 1:], atol=TOL, rtol=0)
  assert (f[:, 0] == 0).all(), "BOS features are not computed by default"
  assert 0.05 <= (f[:, 1:] > 0).mean() <= 0.4
  bare = splice_sae(_model(variant), sae, use_error_term=True)  # Short-circuits.
  np.testing.assert_array_equal(_run(bare, [])[0], clean_logits)


@pytest.mark.parametrize("variant,family,layer,affine", CASES)
def test_reconstruction_replaces_the_activation_except_at_bos(
  variant, family, layer, affine
):
  sae, arrays = _sae(variant, family, layer, seed=1, affine=affine, gain=affine)
  clean_logits, clean = _clean(variant)
  out = (sae.info.out_site or sae.info.site, layer)
  expected = W.np_forward(clean[sae.info.site, layer], arrays)
  logits, got = _run(splice_sae(_model(variant), sae), [out])
  assert np.abs(logits - clean_logits).max() > 1e-3
  np.testing.assert_allclose(got[out][:, 1:], expected[:, 1:], atol=TOL, rtol=0)
  np.testing.assert_array_equal(got[out][:, 0], clean[out][:, 0])
  if variant == "gemma2":  # include_bos=True splices position 0 too.
    _, with_bos = _run(splice_sae(_model(variant), sae, include_bos=True), [out])
    np.testing.assert_allclose(with_bos[out], expected, atol=TOL, rtol=0)


def test_att_sae_reads_z_flattened_head_major():
  """Flat index = head * head_dim + p over the user heads (GQA fixture)."""
  model = _model("gemma2")
  patched, acts = gs.capture(model, "attn.z", 1)
  patched(_named(TOKENS))
  z = np.asarray(acts["attn.z", 1].unwrap("batch", "seq", "heads", "projection"))
  flat = np.stack([z[:, :, h, :] for h in range(4)], axis=2).reshape(2, 12, 64)
  sae, arrays = _sae("gemma2", "att", 1, seed=2)
  spliced, feats = splice_sae(model, sae, capture_features=True, include_bos=True)
  after, after_acts = gs.capture(spliced, "attn.z", 1)
  after(_named(TOKENS))
  f = np.asarray(feats.value().unwrap("batch", "seq", "latents"))
  np.testing.assert_allclose(f, W.np_encode(flat, arrays), atol=TOL, rtol=0)
  recon = after_acts["attn.z", 1].unwrap("batch", "seq", "heads", "projection")
  expected = W.np_forward(flat, arrays).reshape(2, 12, 4, 16)
  np.testing.assert_allclose(np.asarray(recon), expected, atol=TOL, rtol=0)
  # Head-minor flattening is a different input: the check above discriminates.
  wrong = z.transpose(0, 1, 3, 2).reshape(2, 12, 64)
  assert np.abs(W.np_encode(wrong, arrays) - f).max() > 1e-2


# --- Feature edits ---------------------------------------------------------------


@pytest.mark.parametrize("family,layer", [("res", 3), ("transcoder", 1)])
def test_clamp_adds_exactly_delta_f_times_decoder_row(family, layer):
  sae, arrays = _sae("gemma2", family, layer, seed=3)
  _, clean = _clean("gemma2")
  out = (sae.info.out_site or sae.info.site, layer)
  f = W.np_encode(clean[sae.info.site, layer], arrays)
  i, value = 5, 40.0
  edits = feature_edits(sae, clamp={i: value})
  _, got = _run(
    splice_sae(_model("gemma2"), sae, use_error_term=True, edits=edits), [out]
  )
  delta = got[out] - clean[out]
  expected = (value - f[..., i, None]) * arrays["w_dec"][i].astype(np.float64)
  np.testing.assert_allclose(delta[:, 1:], expected[:, 1:], atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(delta[:, 0], 0.0)


def test_clamp_moves_logits_along_the_decoder_rows_logit_lens():
  """Clamping a latent at the last layer moves the logits along the logit
  lens of its decoder row (final norm gain, tied unembedding): linearly for
  a moderate clamp, and a huge clamp makes the logits the lens itself."""
  sae, arrays = _sae("gemma2", "res", 3, seed=4)
  clean_logits, clean = _clean("gemma2")
  weights = load_file(HF_FIXTURES / "gemma2" / "model.safetensors")
  gain = 1.0 + weights["model.norm.weight"]
  lens = (arrays["w_dec"][7] * gain) @ weights["model.embed_tokens.weight"].T
  delta_f = 3.0 - W.np_encode(clean["resid_post", 3], arrays)[..., 7]
  for value in (3.0, 300.0):
    edits = feature_edits(sae, clamp={7: value})
    model = splice_sae(_model("gemma2"), sae, use_error_term=True, edits=edits)
    logits, _ = _run(model, [])
    assert np.abs(logits[:, 0] - clean_logits[:, 0]).max() == 0.0  # BOS.
    for b in range(2):
      for t in range(1, 12):
        if value == 3.0:
          change = (logits - clean_logits)[b, t] * np.sign(delta_f[b, t])
          assert np.corrcoef(change, lens)[0, 1] > 0.8
        else:
          assert np.corrcoef(logits[b, t], lens)[0, 1] > 0.95


def test_ablate_and_scale():
  sae, arrays = _sae("gemma2", "res", 1, seed=5)
  f = W.np_encode(_clean("gemma2")[1]["resid_post", 1], arrays)
  edits = feature_edits(sae, ablate=[1, 2], scale={3: 2.5})
  edited = f.copy()
  edited[..., [1, 2]] = 0.0
  edited[..., 3] *= 2.5
  _, got = _run(splice_sae(_model("gemma2"), sae, edits=edits), [("resid_post", 1)])
  expected = W.np_decode(edited, arrays)
  np.testing.assert_allclose(got["resid_post", 1][:, 1:], expected[:, 1:], atol=TOL)


def test_new_edit_values_reuse_the_compiled_model():
  sae, _ = _sae("gemma2", "res", 2, seed=6)
  spliced, feats = splice_sae(
    _model("gemma2"),
    sae,
    use_error_term=True,
    capture_features=True,
    edits=feature_edits(sae, clamp={3: 10.0}),
  )
  first = run.jit_forward(spliced)(_named(TOKENS))
  size = run._call._cache_size()
  assert feats.value().named_shape["latents"] == W.WIDTH
  other = set_edits(spliced, feature_edits(sae, ablate=[9], scale={4: 3.0}))
  second = run.jit_forward(other)(_named(TOKENS))
  assert run._call._cache_size() == size
  first, second = (
    np.asarray(x.unwrap("batch", "seq", "vocabulary")) for x in (first, second)
  )
  assert np.abs(first - second).max() > 1e-3
  np.testing.assert_allclose(second, _run(other, [])[0], atol=1e-4, rtol=1e-5)


def _layers(model) -> list:
  return list(pz.select(model).at_instances_of(SurgeryLayer).get_sequence())


def test_set_edits_targets_one_sae_and_checks_widths():
  res, _ = _sae("gemma2", "res", 1)
  tc, _ = _sae("gemma2", "transcoder", 2)
  model = splice_sae(splice_sae(_model("gemma2"), res), tc)
  edited = set_edits(model, feature_edits(res, ablate=[4]), sae=res)
  by_family = {type(x).__name__: x for x in _layers(edited)}
  assert by_family["SpliceSAE"].edits is not None
  assert by_family["TranscoderOutput"].edits is None
  cleared = set_edits(edited, None)
  assert all(getattr(x, "edits", None) is None for x in _layers(cleared))
  with pytest.raises(errors.SAEError, match="FeatureEdits for 128 latents"):
    set_edits(model, feature_edits(16, ablate=[1]))


# --- KV caching, generation, padding -----------------------------------------------


def _three_saes():
  """res (error term + clamp), att (plain) and an affine GS2 transcoder."""
  model = _model("gemma2")
  res, _ = _sae("gemma2", "res", 1, seed=7)
  att, _ = _sae("gemma2", "att", 2, seed=7)
  tc, _ = _sae("gemma2", "transcoder", 0, seed=7, affine=True, gain=True)
  model = splice_sae(
    model, res, use_error_term=True, edits=feature_edits(res, clamp={2: 20.0})
  )
  return splice_sae(splice_sae(model, att), tc)


def test_kv_cached_decode_matches_uncached():
  """One token at a time through Penzai's KV-caching model (jitted step)."""
  spliced = _three_saes()
  full, _ = _run(spliced, [])
  assert np.abs(full - _clean("gemma2")[0]).max() > 1e-3
  cached = sampling_mode.KVCachingTransformerLM.from_uncached(
    spliced, cache_len=12, batch_axes={"batch": 2}
  )
  unbound, state = pz.unbind_state_vars(cached, freeze=True)
  unbound = pz.freeze_params(unbound)

  @jax.jit
  def step(state, tokens):
    variables = [v.unfreeze_as_copy() for v in state]
    logits = pz.bind_variables(unbound, variables)(_named(tokens))
    return logits.unwrap("batch", "seq", "vocabulary"), [v.freeze() for v in variables]

  steps = []
  for t in range(12):
    logits, state = step(state, TOKENS[:, t : t + 1])
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_fused_generation_with_left_padding():
  """Greedy tokens equal the argmax of the uncached spliced model (teacher
  forcing); a left-padded row behaves as its unpadded prompt (BOS found)."""
  spliced = _three_saes()
  prompt, other = _tokens(8, 1, 6)[0], _tokens(9, 1, 8)[0]
  batch = np.stack([np.concatenate([[0, 0], prompt]), other])
  new = gs.greedy_generate(spliced, batch, max_new_tokens=4)
  forced = np.stack(
    [np.concatenate([prompt, new[0], [5, 5]]), np.concatenate([other, new[1]])]
  )
  predicted = _run(spliced, [], forced)[0].argmax(-1)
  np.testing.assert_array_equal(predicted[0, 5:9], new[0])
  np.testing.assert_array_equal(predicted[1, 7:11], new[1])


def test_feature_captures_cover_a_whole_generation():
  """capture_features under `gs.generate`: the features of every prompt and
  generated position equal those of one forward pass over the sequence."""
  sae, _ = _sae("gemma2", "res", 1)
  edits = feature_edits(sae, clamp={3: 2.0})
  spliced, feats = splice_sae(
    _model("gemma2"), sae, use_error_term=True, capture_features=True, edits=edits
  )
  prompt = _tokens(11, 2, 6)
  out = gs.generate(spliced, prompt, max_new_tokens=4)
  during = np.asarray(out.captures["sae.features", 1].unwrap("batch", "seq", "latents"))
  np.testing.assert_array_equal(
    during, np.asarray(feats.value().unwrap("batch", "seq", "latents"))
  )
  full = np.concatenate([prompt, out.tokens], axis=1)
  spliced(_named(full))
  forward = np.asarray(feats.value().unwrap("batch", "seq", "latents"))
  assert during.shape == forward.shape == (2, 10, W.WIDTH)
  assert (forward[:, 1:] > 0).any()
  np.testing.assert_allclose(during, forward, atol=1e-4, rtol=0)


# --- Unpatch, sharding --------------------------------------------------------------


def test_unpatch_removes_every_sae_layer():
  model = _model("gemma2")
  tc, _ = _sae("gemma2", "transcoder", 1)
  spliced, _ = splice_sae(model, tc, capture_features=True)
  spliced = splice_sae(spliced, _sae("gemma2", "res", 2)[0])
  assert pz.select(spliced).at_instances_of(SurgeryLayer).count() == 3
  restored = gs.unpatch(spliced)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(model)


def test_sharded_sae_matches_unsharded():
  sae, _ = _sae("gemma2", "res", 1, seed=9)
  x = pz.nx.wrap(jnp.asarray(_clean("gemma2")[1]["resid_post", 1], jnp.float32))
  x = x.tag("batch", "seq", "embedding")
  mesh = gs.make_mesh({"data": 2, "model": 4})
  sharded = shard_sae(sae, mesh)
  assert tuple(sharded.w_enc.value.data_array.sharding.spec) == (None, "model")
  assert sharded.w_dec.value.data_array.addressable_shards[0].data.shape == (32, 64)
  for a, b in [(sharded.encode(x), sae.encode(x)), (sharded(x), sae(x))]:
    np.testing.assert_allclose(
      np.asarray(a.unwrap(*a.named_shape)),
      np.asarray(b.unwrap(*a.named_shape)),
      atol=TOL,
    )
  over8 = shard_sae(sae, gs.make_mesh({"model": 8}))  # Default rules: latents only.
  shards = over8.activation.threshold.value.data_array.addressable_shards
  assert len(shards) == 8 and shards[0].data.shape == (16,)
  got = over8(x)
  np.testing.assert_allclose(
    np.asarray(got.unwrap(*got.named_shape)),
    np.asarray(sae(x).unwrap(*got.named_shape)),
    atol=TOL,
  )
  # shard_model of a spliced model places the SAE along latents too, and the
  # sharded model (batch over data) computes the same logits.
  spliced = splice_sae(_model("gemma2"), sae)
  placed = gs.shard_model(spliced, mesh)
  (layer,) = pz.select(placed).at_instances_of(SurgeryLayer).get_sequence()
  assert tuple(layer.sae.b_enc.value.data_array.sharding.spec) == ("model",)
  logits = run.jit_forward(placed)(_named(TOKENS)).unwrap("batch", "seq", "vocabulary")
  np.testing.assert_allclose(
    np.asarray(logits), _run(spliced, [])[0], atol=1e-4, rtol=1e-5
  )


# --- Bad inputs ---------------------------------------------------------------------


def _with(sae, **changes):
  return dataclasses.replace(sae, info=dataclasses.replace(sae.info, **changes))


def test_splice_errors():
  model = _model("gemma2")
  sae, _ = _sae("gemma2", "res", 1)
  with pytest.raises(errors.SAEError, match="input size is 32.*has 64 dimensions"):
    splice_sae(model, _with(sae, d_in=32))
  with pytest.raises(errors.SAEError, match="layer 20, but the model has 4 layers"):
    splice_sae(model, _with(sae, layer=20))
  with pytest.raises(errors.SAEError, match="'attn.pattern' is not one an SAE"):
    splice_sae(model, _with(sae, site="attn.pattern"))
  with pytest.raises(errors.SAEError, match="positions="):
    splice_sae(model, sae, positions="middle")
  with pytest.raises(errors.SAEError, match="FeatureEdits for 128 latents"):
    splice_sae(model, sae, edits=feature_edits(64, clamp={1: 1.0}))
  tc, _ = _sae("gemma2", "transcoder", 1)
  with pytest.raises(errors.SAEError, match="before the site it writes"):
    splice_sae(model, _with(tc, site="resid_post"))
  with pytest.raises(errors.SAEError, match="output size is 32"):
    splice_sae(model, _with(tc, d_out=32))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"clamp": {128: 1.0}}, r"index 128 is out of range.*0\.\.127"),
    ({"ablate": [-1]}, "index -1 is out of range"),
    ({"scale": {1.5: 2.0}}, "not an int"),
    ({"clamp": {3: 1.0}, "ablate": [3]}, "edited twice"),
    ({"scale": {3: float("nan")}}, "not finite"),
  ],
)
def test_feature_index_errors(kwargs, match):
  with pytest.raises(errors.SAEError, match=match):
    feature_edits(W.WIDTH, **kwargs)


def test_feature_edits_are_array_leaves():
  edits = feature_edits(W.WIDTH, clamp={0: 1.0})
  assert isinstance(edits, FeatureEdits)
  leaves = jax.tree_util.tree_leaves(edits)
  assert len(leaves) == 3 and all(isinstance(x, jax.Array) for x in leaves)
