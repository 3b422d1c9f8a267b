"""Acceptance tests of the site vocabulary against an independent reference.

Every site of `gemma_surgery.surgery.sites` is captured on each tiny Hugging Face
fixture (Gemma 1 MHA and MQA, Gemma 2 GQA with soft caps, Gemma 3 GQA with
QK-norm and per-layer RoPE) at every layer, local and global, and compared
with a plain numpy float64 forward pass written from the published
architecture directly on the safetensors weights (HF names, read with
``safetensors.numpy``; no gemma_surgery code). The sequence (20 tokens) is
longer than the sliding window (8), so local and global layers differ.

Also: axes, negative controls showing the comparison is discriminating,
transparency of captures, `unpatch`, error messages, stacking and exact
steering arithmetic.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES, HF_VARIANTS
from helpers.reference import layer_types, reference_forward
from penzai import pz
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.surgery import sites

TOLERANCE = 1e-4  # float32 model vs float64 reference, relative to max(1, |ref|).
SEQ = 20  # > sliding window (8): local layers really are local.
BATCH = 2
BOS = 2

PER_LAYER_SITES = [name for name, info in sites.SITES.items() if info.per_layer]
GLOBAL_SITES = [name for name, info in sites.SITES.items() if not info.per_layer]


# --- Fixtures ----------------------------------------------------------------


def _tokens(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 512, size=(BATCH, SEQ)).astype(np.int32)
  tokens[:, 0] = BOS
  return tokens


def _named(tokens: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq")


def _site_key(site: str, layer: int | None):
  return site if layer is None else (site, layer)


def _array(captures, site: str, layer: int | None = None) -> np.ndarray:
  """A capture as ``[batch, seq, *axes]`` float64 numpy."""
  value = captures[_site_key(site, layer)]
  return np.asarray(value.unwrap("batch", "seq", *sites.SITES[site].axes), np.float64)


class Run:
  """One fixture variant, captured at every site and every layer."""

  def __init__(self, variant: str):
    self.variant = variant
    self.directory = HF_FIXTURES / variant
    self.lm = gs.load(self.directory, dtype="float32", progress=False)
    self.config = json.loads((self.directory / "config.json").read_text())
    self.tokens = _tokens()
    self.patched, self.captures = gs.capture(self.lm.model, list(sites.SITES))
    self.logits = np.asarray(
      self.patched(_named(self.tokens)).unwrap("batch", "seq", "vocabulary")
    )
    self.reference = reference_forward(self.directory, self.tokens)
    self.num_layers = self.config["num_hidden_layers"]


_RUNS: dict[str, Run] = {}


def _get_run(variant: str) -> Run:
  """Each variant is loaded, run and referenced once per test session."""
  if variant not in _RUNS:
    _RUNS[variant] = Run(variant)
  return _RUNS[variant]


@pytest.fixture(scope="module", params=HF_VARIANTS)
def run(request) -> Run:
  return _get_run(request.param)


@pytest.fixture(scope="module")
def gemma2() -> Run:
  return _get_run("gemma2")


def _max_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """Max |ours - ref| over the entries where ref is defined (not NaN)."""
  defined = ~np.isnan(ref)
  assert defined.any()
  diff = np.abs(ours[defined] - ref[defined]).max()
  return float(diff / max(1.0, np.abs(ref[defined]).max()))


# --- Every site matches the reference ----------------------------------------


def test_fixtures_have_local_and_global_layers():
  """Local/global coverage: Gemma 2 and 3 have both kinds, Gemma 1 is global."""
  for variant in HF_VARIANTS:
    config = json.loads((HF_FIXTURES / variant / "config.json").read_text())
    kinds = set(layer_types(config))
    if variant.startswith("gemma1"):
      assert kinds == {"full_attention"}
    else:
      assert kinds == {"full_attention", "sliding_attention"}
      assert config["sliding_window"] < SEQ


@pytest.mark.parametrize("site", PER_LAYER_SITES)
def test_per_layer_site_matches_reference(run, site):
  for layer in range(run.num_layers):
    ours = _array(run.captures, site, layer)
    ref = run.reference[site, layer]
    assert ours.shape == ref.shape, (site, layer, ours.shape, ref.shape)
    err = _max_error(ours, ref)
    assert err <= TOLERANCE, f"{run.variant} {site}[{layer}]: error {err}"


@pytest.mark.parametrize("site", GLOBAL_SITES)
def test_global_site_matches_reference(run, site):
  ours, ref = _array(run.captures, site), run.reference[site]
  assert ours.shape == ref.shape
  err = _max_error(ours, ref)
  assert err <= TOLERANCE, f"{run.variant} {site}: error {err}"


def test_masked_scores_hold_a_large_negative_constant(run):
  for layer in range(run.num_layers):
    ours = _array(run.captures, "attn.scores", layer)
    masked = np.isnan(run.reference["attn.scores", layer])
    assert masked.any()
    assert (ours[masked] < -1e30).all()
    assert (ours[~masked] > -1e3).all()
    pattern = _array(run.captures, "attn.pattern", layer)
    assert (pattern[masked] == 0).all()


def test_axes_and_sizes(run):
  c = run.config
  n, kv = c["num_attention_heads"], c["num_key_value_heads"]
  sizes = {
    "embedding": c["hidden_size"],
    "projection": c["head_dim"],
    "neurons": c["intermediate_size"],
    "vocabulary": c["vocab_size"],
    "kv_seq": SEQ,
  }
  for site, info in sites.SITES.items():
    layers = range(run.num_layers) if info.per_layer else [None]
    for layer in layers:
      value = run.captures[_site_key(site, layer)]
      assert not value.positional_shape
      expected = {"batch": BATCH, "seq": SEQ}
      for axis in info.axes:
        if axis == "heads":
          expected[axis] = kv if site in ("attn.k", "attn.v") else n
        else:
          expected[axis] = sizes[axis]
      assert dict(value.named_shape) == expected, (site, layer)
  if run.variant == "gemma1_mqa":
    assert run.captures["attn.k", 0].named_shape["heads"] == 1


def test_logits_capture_is_the_output(run):
  np.testing.assert_array_equal(
    run.logits, np.asarray(run.captures["logits"].unwrap("batch", "seq", "vocabulary"))
  )


# --- Negative controls: the comparison is discriminating --------------------


def test_negative_control_wrong_layer(run):
  """resid_post of layer L is far from the reference of layer L + 1."""
  for layer in range(run.num_layers - 1):
    err = _max_error(
      _array(run.captures, "resid_post", layer),
      run.reference["resid_post", layer + 1],
    )
    assert err > 100 * TOLERANCE, f"{run.variant} layer {layer}: {err}"


_GEMMA3_ROPE_UNSCALED = {
  "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
}
_GEMMA3_ROPE_LOCAL_BASE = {
  "full_attention": {"factor": 8.0, "rope_theta": 1e4, "rope_type": "linear"},
  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
}


@pytest.mark.parametrize(
  "variant,changes,site,layer",
  [
    ("gemma2", {"sliding_window": 9}, "attn.pattern", 0),
    ("gemma3", {"sliding_window": 9}, "attn.pattern", 0),
    ("gemma2", {"sliding_window": 9}, "attn.scores", 2),
    ("gemma2", {"attn_logit_softcapping": None}, "attn.scores", 1),
    ("gemma2", {"final_logit_softcapping": None}, "logits", None),
    ("gemma2", {"query_pre_attn_scalar": 16}, "attn.scores", 0),
    ("gemma1_mha", {"query_pre_attn_scalar": 24}, "attn.scores", 0),
    ("gemma3", {"rope_parameters": _GEMMA3_ROPE_UNSCALED}, "attn.q", 5),
    ("gemma3", {"rope_parameters": _GEMMA3_ROPE_LOCAL_BASE}, "attn.k", 5),
  ],
)
def test_negative_control_wrong_architecture(variant, changes, site, layer):
  """A reference with a wrong window, scale, cap or RoPE fails at the site."""
  run = _get_run(variant)
  wrong = reference_forward(run.directory, run.tokens, config_changes=changes)
  # At attn.scores a wider window compares our masked constant with a logit.
  err = _max_error(_array(run.captures, site, layer), wrong[_site_key(site, layer)])
  assert err > 100 * TOLERANCE, f"{changes} went unnoticed at {site}: {err}"


def test_negative_control_wrong_head_grouping(gemma2):
  """GQA: kv head h % K instead of h // (N / K) is detected at attn.z."""
  c = gemma2.config
  kv = c["num_key_value_heads"]
  wrong = reference_forward(
    gemma2.directory, gemma2.tokens, kv_head_of=lambda head: head % kv
  )
  err = _max_error(_array(gemma2.captures, "attn.z", 0), wrong["attn.z", 0])
  assert err > 100 * TOLERANCE, err


def test_mlp_in_unscaled_is_mlp_in_without_the_gain(run):
  """mlp.in = mlp.in_unscaled * gain, and the gain is not the identity."""
  prefix = "model.layers.1."
  weights = load_file(run.directory / "model.safetensors")
  gemma1 = run.variant.startswith("gemma1")
  name = "post_attention_layernorm" if gemma1 else "pre_feedforward_layernorm"
  gain = 1.0 + weights[prefix + name + ".weight"].astype(np.float64)
  unscaled = _array(run.captures, "mlp.in_unscaled", 1)
  scaled = _array(run.captures, "mlp.in", 1)
  assert _max_error(unscaled * gain, scaled) <= TOLERANCE
  assert _max_error(unscaled, scaled) > 100 * TOLERANCE


# --- Captures are transparent; unpatch ---------------------------------------


def test_captures_do_not_change_logits(run):
  plain = np.asarray(
    run.lm.model(_named(run.tokens)).unwrap("batch", "seq", "vocabulary")
  )
  np.testing.assert_array_equal(run.logits, plain)


def test_unpatch_restores_the_original_model(run):
  restored = gs.unpatch(run.patched)
  assert sites.num_layers(run.patched) == sites.num_layers(run.lm.model)
  assert sites.num_layers(restored) == run.num_layers
  assert pz.select(restored).at_instances_of(gs.SaveIntermediate).count() == 0
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(
    run.lm.model
  )
  assert pz.select(run.patched).at_instances_of(gs.SaveIntermediate).count() == len(
    PER_LAYER_SITES
  ) * run.num_layers + len(GLOBAL_SITES)


def test_stacked_has_a_layer_axis(run):
  for site in ("resid_post", "attn.pattern", "attn.k"):
    stacked = run.captures.stacked(site)
    assert stacked.named_shape["layer"] == run.num_layers
    for layer in range(run.num_layers):
      np.testing.assert_array_equal(
        np.asarray(
          stacked[{"layer": layer}].unwrap("batch", "seq", *sites.SITES[site].axes)
        ),
        np.asarray(
          run.captures[site, layer].unwrap("batch", "seq", *sites.SITES[site].axes)
        ),
      )
  np.testing.assert_array_equal(
    np.asarray(run.captures["resid_post", -1].unwrap("batch", "seq", "embedding")),
    np.asarray(
      run.captures["resid_post", run.num_layers - 1].unwrap("batch", "seq", "embedding")
    ),
  )


# --- Errors ------------------------------------------------------------------


def test_capture_read_before_running(gemma2):
  _, captures = gs.capture(gemma2.lm.model, ["resid_post", "logits"], 1)
  with pytest.raises(errors.SurgeryError, match="run the patched model first"):
    captures["resid_post", 1]
  with pytest.raises(errors.SurgeryError, match="run the patched model first"):
    captures["logits"]


def test_unknown_site(gemma2):
  model = gemma2.lm.model
  for call in (
    lambda: gs.capture(model, "resid_psot"),
    lambda: sites.select(model, "attn.scores2", 0),
    lambda: gs.steer(model, "mlp", 0, pz.nx.wrap(jnp.ones(64)).tag("embedding")),
  ):
    with pytest.raises(errors.SiteError) as info:
      call()
    message = str(info.value)
    assert "valid sites" in message
    assert all(site in message for site in sites.SITES)


@pytest.mark.parametrize("layer", [99, -99, 4, -5, [0, 99]])
def test_layer_out_of_range(gemma2, layer):
  n = gemma2.num_layers
  assert n == 4
  with pytest.raises(errors.SiteError, match=f"{-n}\\.\\.{n - 1}"):
    gs.capture(gemma2.lm.model, "resid_post", layer)
  with pytest.raises(errors.SiteError, match=f"{-n}\\.\\.{n - 1}"):
    sites.select(gemma2.lm.model, "attn.q", layer)


@pytest.mark.parametrize("site", GLOBAL_SITES)
def test_global_site_with_layers(gemma2, site):
  with pytest.raises(errors.SiteError, match="global"):
    sites.select(gemma2.lm.model, site, 0)
  with pytest.raises(errors.SiteError, match="global"):
    sites.insert(gemma2.lm.model, site, [0, 1], lambda _: None)


@pytest.mark.parametrize(
  "vector",
  [
    pz.nx.wrap(np.ones(128, np.float32)).tag("neurons"),  # Wrong axis.
    pz.nx.wrap(np.ones(63, np.float32)).tag("embedding"),  # Wrong size.
    pz.nx.wrap(np.ones((4, 64), np.float32)).tag("heads", "embedding"),
    pz.nx.wrap(np.ones(64, np.float32)),  # Positional axis.
    np.ones(64, np.float32),  # Not a NamedArray.
  ],
)
def test_steering_vector_that_does_not_fit(gemma2, vector):
  with pytest.raises(errors.SurgeryError):
    gs.steer(gemma2.lm.model, "resid_post", 1, vector)


def test_steering_heads_of_the_wrong_size(gemma2):
  # attn.z has 4 query heads, attn.k 2 kv heads.
  with pytest.raises(errors.SurgeryError, match="heads"):
    gs.steer(
      gemma2.lm.model,
      "attn.k",
      1,
      pz.nx.wrap(jnp.ones((4, 16))).tag("heads", "projection"),
    )
  with pytest.raises(errors.SurgeryError, match="heads"):
    gs.steer(
      gemma2.lm.model,
      "attn.z",
      1,
      pz.nx.wrap(jnp.ones((2, 16))).tag("heads", "projection"),
    )


@pytest.mark.parametrize(
  "vector,scale",
  [
    (np.full(64, np.nan), 1.0),
    (np.concatenate([np.ones(63), [np.inf]]), 1.0),
    (np.ones(64), np.nan),
    (np.ones(64), -np.inf),
  ],
)
def test_non_finite_steering(gemma2, vector, scale):
  named = pz.nx.wrap(jnp.asarray(vector, jnp.float32)).tag("embedding")
  with pytest.raises(errors.SurgeryError, match="NaN or infinite"):
    gs.steer(gemma2.lm.model, "resid_post", 1, named, scale=scale)


# --- Steering arithmetic -----------------------------------------------------


def _steer_vector(run: Run, site: str, seed: int = 1) -> pz.nx.NamedArray:
  """A random vector over all of the site's axes (user-facing heads)."""
  c = run.config
  sizes = {
    "embedding": c["hidden_size"],
    "projection": c["head_dim"],
    "neurons": c["intermediate_size"],
    "vocabulary": c["vocab_size"],
    "kv_seq": SEQ,
    "heads": c["num_key_value_heads"]
    if site in ("attn.k", "attn.v")
    else c["num_attention_heads"],
  }
  axes = sites.SITES[site].axes
  data = np.random.default_rng(seed).normal(size=[sizes[a] for a in axes])
  return pz.nx.wrap(jnp.asarray(data, jnp.float32)).tag(*axes)


def _capture_one(model, site: str, layer: int | None, tokens) -> np.ndarray:
  patched, captures = gs.capture(model, site, layer)
  patched(_named(tokens))
  return _array(captures, site, layer)


@pytest.mark.parametrize("site", list(sites.SITES))
def test_steering_adds_exactly_scale_times_vector(gemma2, site):
  """capture(steer(model)) at the same site sees exactly x + s * v.

  Every site alike: a rewrite applied later sees the earlier ones.
  """
  layer = 1 if sites.SITES[site].per_layer else None
  scale = 2.5
  vector = _steer_vector(gemma2, site)
  model = gemma2.lm.model
  steered = gs.steer(model, site, layer, vector, scale=scale)
  # Captures are transparent (test_captures_do_not_change_logits): the run
  # capturing every site saw the unsteered values bit for bit.
  before = _array(gemma2.captures, site, layer).astype(np.float32)
  after = _capture_one(steered, site, layer, gemma2.tokens).astype(np.float32)
  v = np.asarray(vector.unwrap(*sites.SITES[site].axes))
  np.testing.assert_array_equal(after, before + np.float32(scale) * v)


def test_steering_resid_post_skip_bos_and_downstream(gemma2):
  model, tokens, layer, scale = gemma2.lm.model, gemma2.tokens, 1, -3.0
  vector = _steer_vector(gemma2, "resid_post", seed=5)
  v = np.asarray(vector.unwrap("embedding"))
  plain = _array(gemma2.captures, "resid_post", layer).astype(np.float32)
  steered = gs.steer(model, "resid_post", layer, vector, scale=scale, skip_bos=True)
  patched, captures = gs.capture(
    steered, ["resid_post", "resid_pre"], [layer, layer + 1]
  )
  patched(_named(tokens))
  after = _array(captures, "resid_post", layer).astype(np.float32)
  np.testing.assert_array_equal(after[:, 0], plain[:, 0])  # BOS unchanged.
  np.testing.assert_array_equal(after[:, 1:], plain[:, 1:] + np.float32(scale) * v)
  # The next block reads the steered residual; earlier layers are untouched.
  np.testing.assert_array_equal(_array(captures, "resid_pre", layer + 1), after)
  np.testing.assert_array_equal(
    _array(captures, "resid_post", layer + 1)[:, 0],
    _array(gemma2.captures, "resid_post", layer + 1)[:, 0],
  )
  assert (
    np.abs(
      _array(captures, "resid_post", layer + 1)[:, 1:]
      - _array(gemma2.captures, "resid_post", layer + 1)[:, 1:]
    ).max()
    > 1.0
  )
