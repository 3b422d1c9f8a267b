"""Input checks of `gs.steer` and rewrites at global sites (issue 13, part A).

Relative steering with a zero vector, steering masks with wrong axes, values
or lengths, and layers given for global sites: each is refused with a typed
error naming the problem, and the silent wrong results (NaN logits, an extra
``pos`` axis on the logits) can no longer occur.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import load, random_tokens
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.surgery import interventions as iv

SEQ = 8
D = 64


@pytest.fixture(scope="module")
def model():
  return load("gemma2")


@pytest.fixture(scope="module")
def tokens():
  return gs.named_tokens(random_tokens(2, SEQ))


def _vector(seed: int = 1, **axes) -> pz.nx.NamedArray:
  axes = axes or {"embedding": D}
  data = np.random.default_rng(seed).normal(size=tuple(axes.values()))
  return pz.nx.wrap(jnp.asarray(data, jnp.float32)).tag(*axes)


def _logits(model, tokens) -> np.ndarray:
  return np.asarray(model(tokens).unwrap("batch", "seq", "vocabulary"))


def _resid(model, tokens, layer: int = 1) -> np.ndarray:
  patched, acts = gs.capture(model, "resid_post", layer)
  patched(tokens)
  return np.asarray(acts["resid_post", layer].unwrap("batch", "seq", "embedding"))


# --- Item 4: relative steering with a zero vector ------------------------------


def test_relative_steering_refuses_a_zero_vector(model):
  with pytest.raises(errors.SurgeryError, match="zero norm"):
    gs.steer(model, "resid_post", 1, pz.nx.zeros({"embedding": D}), relative=True)


def test_relative_steering_refuses_a_zero_head_slice(model):
  vector = np.ones((4, 16), np.float32)
  vector[2] = 0.0  # head 2 has nothing to normalize
  named = pz.nx.wrap(jnp.asarray(vector)).tag("heads", "projection")
  with pytest.raises(errors.SurgeryError, match=r"zero norm.*1 of 4"):
    gs.steer(model, "attn.z", 1, named, relative=True)
  # A vector without the normalized axis cannot be normalized either.
  with pytest.raises(errors.SurgeryError, match="projection"):
    gs.steer(model, "attn.z", 1, _vector(heads=4), relative=True)


def test_relative_steering_layer_adds_nothing_for_a_zero_vector(model, tokens):
  """The layer itself never divides 0/0: no NaN from finite inputs."""
  layer = gs.SteerIntermediate(
    vector=pz.nx.zeros({"embedding": D}), scale=jnp.float32(3.0), relative=True
  )
  steered = gs.sites.insert(model, "resid_post", 1, lambda _: layer)
  logits = _logits(steered, tokens)
  assert np.isfinite(logits).all()
  np.testing.assert_allclose(logits, _logits(model, tokens), atol=1e-6)


def test_relative_steering_is_a_fraction_of_the_norm(model, tokens):
  vector = _vector()
  before = _resid(model, tokens)
  steered = gs.steer(model, "resid_post", 1, vector, 0.5, relative=True)
  after = _resid(steered, tokens)
  v = np.asarray(vector.unwrap("embedding"))
  expected = before + 0.5 * np.linalg.norm(before, axis=-1, keepdims=True) * (
    v / np.linalg.norm(v)
  )
  np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)


# --- Items 6 and 9: steering masks ----------------------------------------------


@pytest.mark.parametrize(
  "mask,fragment",
  [
    (pz.nx.ones({"pos": SEQ}, bool), "'pos'"),
    (pz.nx.ones({"batch": 2, "seq": SEQ, "heads": 4}, bool), "'heads'"),
    (pz.nx.wrap(jnp.ones(SEQ, bool)), "positional"),
    (pz.nx.wrap(jnp.full(SEQ, 0.5)).tag("seq"), "0/1"),
    (np.ones(SEQ, bool), "known seq length"),
  ],
)
def test_steering_mask_with_wrong_axes_or_values(model, mask, fragment):
  with pytest.raises(errors.SurgeryError) as info:
    gs.steer(model, "resid_post", 1, _vector(), mask=mask)
  assert fragment in str(info.value)


def test_steering_mask_of_another_length_than_the_vector(model):
  vector = _vector(seq=SEQ, embedding=D)
  with pytest.raises(errors.SurgeryError, match="seq=3.*seq=8"):
    gs.steer(model, "resid_post", 1, vector, mask=pz.nx.ones({"seq": 3}, bool))


def test_steering_mask_shorter_than_the_prompt_names_both_lengths(model, tokens):
  steered = gs.steer(model, "resid_post", 1, _vector(), mask=pz.nx.ones({"seq": 3}))
  for run in (steered, gs.jit_forward(steered)):
    with pytest.raises(errors.SurgeryError) as info:
      run(tokens)
    assert "seq=3" in str(info.value) and f"seq={SEQ}" in str(info.value)


def test_steering_mask_steers_exactly_the_masked_positions(model, tokens):
  chosen = np.zeros((2, SEQ), bool)
  chosen[0, [1, 5]] = True
  chosen[1, 7] = True
  vector = _vector()
  mask = pz.nx.wrap(jnp.asarray(chosen.astype(np.int32))).tag("batch", "seq")
  steered = gs.steer(model, "resid_post", 1, vector, 2.0, mask=mask)
  logits = steered(tokens)
  assert dict(logits.named_shape) == {"batch": 2, "seq": SEQ, "vocabulary": 512}
  delta = _resid(steered, tokens) - _resid(model, tokens)
  expected = 2.0 * np.asarray(vector.unwrap("embedding"))
  np.testing.assert_allclose(
    delta[chosen], np.broadcast_to(expected, (3, D)), atol=1e-5
  )
  assert np.abs(delta[~chosen]).max() == 0.0


# --- Item 7: layers at global sites ------------------------------------------------


GLOBAL_REWRITES = {
  "steer": lambda m, s, layer: gs.steer(m, s, layer, _vector(vocabulary=512)),
  "ablate": lambda m, s, layer: iv.ablate(m, s, layer),
  "patch": lambda m, s, layer: iv.patch(m, s, layer, _vector(seq=SEQ, vocabulary=512)),
  "capture_topk": lambda m, s, layer: iv.capture_topk(m, s, layer, 3),
}


@pytest.mark.parametrize("name", list(GLOBAL_REWRITES))
@pytest.mark.parametrize("layer", [1, [0, 1], -1])
def test_rewrites_at_a_global_site_refuse_layers(model, name, layer):
  with pytest.raises(errors.SiteError) as info:
    GLOBAL_REWRITES[name](model, "logits", layer)
  assert "global" in str(info.value) and "layers=None" in str(info.value)


@pytest.mark.parametrize("name", list(GLOBAL_REWRITES))
def test_rewrites_at_a_global_site_without_layers_apply_once(model, name):
  patched = GLOBAL_REWRITES[name](model, "logits", None)
  if isinstance(patched, tuple):
    patched = patched[0]
  assert (
    pz.select(patched).at_instances_of(gs.surgery.layers.base.SurgeryLayer).count() == 1
  )


def test_steer_at_final_norm_with_a_layer_is_refused(model):
  with pytest.raises(errors.SiteError, match="global"):
    gs.steer(model, "final_norm", 1, _vector())


def test_capture_ignores_layers_only_beside_per_layer_sites(model, tokens):
  patched, acts = gs.capture(model, ["resid_post", "logits"], 2)
  patched(tokens)
  assert list(acts) == [("resid_post", 2), ("logits", None)]
  with pytest.raises(errors.SiteError, match="global"):
    gs.capture(model, ["logits", "embed"], 2)
  with pytest.raises(errors.SiteError, match="global"):
    gs.capture(model, "final_norm", 0)
  with pytest.raises(errors.SiteError, match="twice"):
    gs.capture(model, ["logits", "logits"])
