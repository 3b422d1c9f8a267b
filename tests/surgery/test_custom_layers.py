"""Hand-written Penzai layers next to ours: `unpatch`, `SaveIntermediate`, masks.

* `gs.unpatch` removes every `SurgeryLayer` and, with ``also=``, the user's
  own layer classes.
* `gs.SaveIntermediate` built like the Penzai tutorials' layer of that name
  (``SaveIntermediate(pz.StateVariable(None))``) works eagerly and through
  `gs.jit_forward`.
* `Captures.masked` zeroes positions that are not real tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import load, random_tokens
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.surgery.layers.base import SurgeryLayer

SEQ = 8


@pytest.fixture(scope="module")
def model():
  return load("gemma2")


@pytest.fixture(scope="module")
def tokens():
  return gs.named_tokens(random_tokens(2, SEQ))


@pz.pytree_dataclass
class AddOne(pz.nn.Layer):
  """A user's own layer (not a gemma_surgery layer)."""

  def __call__(self, x, **unused_side_inputs):
    return x + 1.0


def _after_block(model, layer, block: int = 1):
  blocks = pz.select(model).at_instances_of(pz.nn.Residual)
  return blocks.pick_nth_selected(2 * block + 1).insert_after(layer)


def _count(model, cls) -> int:
  return pz.select(model).at_instances_of(cls).count()


# --- unpatch ----------------------------------------------------------------------


def test_unpatch_removes_every_surgery_layer_and_keeps_user_layers(model, tokens):
  vector = pz.nx.ones({"embedding": 64})
  patched = gs.steer(_after_block(model, AddOne()), "resid_post", 0, vector)
  patched, _ = gs.capture(patched, "attn.pattern", 1)
  assert _count(patched, SurgeryLayer) == 2
  kept = gs.unpatch(patched)
  assert _count(kept, SurgeryLayer) == 0 and _count(kept, AddOne) == 1
  both = gs.unpatch(patched, also=(AddOne,))
  assert _count(both, SurgeryLayer) == 0 and _count(both, AddOne) == 0
  np.testing.assert_array_equal(
    np.asarray(both(tokens).unwrap("batch", "seq", "vocabulary")),
    np.asarray(model(tokens).unwrap("batch", "seq", "vocabulary")),
  )


@pytest.mark.parametrize("also", [(AddOne(),), ("AddOne",), (int,)])
def test_unpatch_also_takes_layer_classes_only(model, also):
  with pytest.raises(errors.SurgeryError, match="layer classes"):
    gs.unpatch(model, also=also)


# --- SaveIntermediate built the tutorials' way ------------------------------------


@pytest.mark.parametrize("keyword", [True, False])
def test_tutorial_style_save_intermediate(model, tokens, keyword):
  variable = pz.StateVariable(None)
  saver = (
    gs.SaveIntermediate(saved=variable) if keyword else gs.SaveIntermediate(variable)
  )
  assert saver.site == "custom" and saver.layer is None
  patched = _after_block(model, saver)
  expected = _resid_post_1(model, tokens)
  patched(tokens)
  np.testing.assert_allclose(
    np.asarray(variable.value.unwrap("batch", "seq", "embedding")), expected
  )
  variable.value = None
  gs.jit_forward(patched)(tokens)
  np.testing.assert_allclose(
    np.asarray(variable.value.unwrap("batch", "seq", "embedding")), expected, atol=1e-5
  )
  assert _count(gs.unpatch(patched), gs.SaveIntermediate) == 0


def _resid_post_1(model, tokens) -> np.ndarray:
  patched, acts = gs.capture(model, "resid_post", 1)
  patched(tokens)
  return np.asarray(acts["resid_post", 1].unwrap("batch", "seq", "embedding"))


# --- Captures.masked ----------------------------------------------------------------


def test_masked_capture_zeroes_padding(model, tokens):
  patched, acts = gs.capture(model, ["resid_post", "logits"], 1)
  patched(tokens)
  real = np.ones((2, SEQ), bool)
  real[1, :3] = False
  mask = pz.nx.wrap(jnp.asarray(real)).tag("batch", "seq")
  raw = np.asarray(acts["resid_post", 1].unwrap("batch", "seq", "embedding"))
  masked = acts.masked("resid_post", 1, mask=mask).unwrap("batch", "seq", "embedding")
  np.testing.assert_array_equal(np.asarray(masked)[real], raw[real])
  assert np.abs(raw[~real]).min() > 0 and not np.asarray(masked)[~real].any()
  logits = acts.masked("logits", mask=mask).unwrap("batch", "seq", "vocabulary")
  assert not np.asarray(logits)[~real].any()


def test_masked_capture_needs_a_fitting_mask(model, tokens):
  patched, acts = gs.capture(model, "resid_post", 1)
  patched(tokens)
  with pytest.raises(errors.SurgeryError, match="mask="):
    acts.masked("resid_post", 1)
  with pytest.raises(errors.SurgeryError, match="seq=3"):
    acts.masked("resid_post", 1, mask=pz.nx.ones({"seq": 3}, bool))
  with pytest.raises(errors.SurgeryError, match="'pos'"):
    acts.masked("resid_post", 1, mask=pz.nx.ones({"pos": SEQ}, bool))
