"""Site gradients vs central finite differences of the exact forward (float64).

The gradient at a site comes from a zero-valued `GradientTap` inserted by a
pure rewrite; the finite differences steer the same site with `gs.steer` (a
different layer and code path) by ``±eps · v`` and rerun the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.analysis import gradients, patching
from gemma_surgery.generation import named_tokens
from gemma_surgery.surgery.layers.base import SurgeryLayer
from gemma_surgery.surgery.layers.tap import GradientTap

EPS = 1e-4


def _prompts(vocab: int, seed: int = 0, seq: int = 9):
  rng = np.random.default_rng(seed)
  clean = rng.integers(4, vocab, (1, seq)).astype(np.int32)
  clean[:, 0] = 2
  bad = clean.copy()
  bad[0, 3] = (clean[0, 3] + 17) % vocab
  return clean, bad


def squared_logits(logits):
  """A user metric: sum of squared logits at the last position, per row."""
  at = logits[{"seq": -1}].unwrap("batch", "vocabulary")
  return (at * at).sum(-1) / at.shape[-1]


def _metric_value(model, ids, metric, reference):
  logits = model(named_tokens(ids))
  if getattr(metric, "needs_reference", False):
    return float(metric(logits, reference=reference)[0])
  return float(np.asarray(metric(logits))[0])


CASES = [
  ("gemma2", "resid_pre", 1, "logit_difference"),
  ("gemma2", "attn.z", 2, "log_prob"),
  ("gemma2", "attn.pattern", 1, "kl_to_clean"),
  ("gemma2", "attn.k", 3, "user"),
  ("gemma2", "mlp.hidden", 0, "logit_difference"),
  ("gemma3", "resid_post", 2, "kl_to_clean"),
  ("gemma3", "attn.q", 4, "logit_difference"),
  ("gemma3", "mlp.out", 1, "log_prob"),
]


def _make_metric(name):
  return {
    "logit_difference": patching.logit_difference(5, 9),
    "log_prob": gradients.log_prob(11),
    "kl_to_clean": gradients.kl_to_clean(),
    "user": squared_logits,
  }[name]


@pytest.mark.parametrize(("variant", "site", "layer", "metric_name"), CASES)
def test_gradient_matches_finite_differences(variant, site, layer, metric_name):
  """<grad, v> == (M(a + eps v) − M(a − eps v)) / 2 eps on both runs (1e-6)."""
  with jax.enable_x64():
    model = gs.load(HF_FIXTURES / variant, dtype="float64", progress=False).model
    vocab = model.metadata.vocab_size
    clean, bad = _prompts(vocab)
    metric = _make_metric(metric_name)
    grads = gradients.site_gradients(model, clean, bad, metric, site, layer)
    logits = model(named_tokens(clean))
    reference = np.asarray(logits.unwrap("batch", "seq", "vocabulary"))
    assert pz.select(model).at_instances_of(SurgeryLayer).count() == 0
    for ids, acts, grad, value in (
      (bad, grads.corrupted, grads.grad_corrupted, grads.metric_corrupted[0]),
      (clean, grads.clean, grads.grad_clean, grads.metric_clean[0]),
    ):
      act, g = acts[site, layer], grad[site, layer]
      assert g.named_shape == act.named_shape
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(
        value, _metric_value(model, ids, metric, reference), rtol=1e-9, atol=1e-12
      )
      order = tuple(act.named_shape)
      rng = np.random.default_rng(1)
      v = rng.normal(size=act.unwrap(*order).shape)
      if site == "attn.pattern":
        v *= np.asarray(act.unwrap(*order)) > 0  # stay on the causal support
      direction = pz.nx.wrap(jnp.asarray(v)).tag(*order)
      plus, minus = (
        gs.steer(model, site, layer, direction, scale) for scale in (EPS, -EPS)
      )
      fd = (
        _metric_value(plus, ids, metric, reference)
        - _metric_value(minus, ids, metric, reference)
      ) / (2 * EPS)
      analytic = float((np.asarray(g.unwrap(*order)) * v).sum())
      if metric_name == "kl_to_clean" and ids is clean:
        assert abs(analytic) < 1e-8 and abs(fd) < 1e-5  # KL is minimal at clean
        continue
      assert abs(fd) > 1e-4, "a vanishing directional derivative proves nothing"
      np.testing.assert_allclose(analytic, fd, rtol=1e-6)
      # Negative control: another direction's derivative doesn't match.
      assert abs(float((np.asarray(g.unwrap(*order)) * v[::-1]).sum()) - fd) > 1e-3


def test_taps_leave_outputs_unchanged_and_model_untouched():
  model = gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model
  clean, bad = _prompts(512)
  before = model(named_tokens(bad)).unwrap("batch", "seq", "vocabulary")
  tapped = gradients.tap(model, [("resid_post", None), ("attn.z", [1, 3])])
  assert pz.select(tapped).at_instances_of(GradientTap).count() == 6
  assert pz.select(model).at_instances_of(SurgeryLayer).count() == 0
  after = tapped(named_tokens(bad)).unwrap("batch", "seq", "vocabulary")
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  assert gs.unpatch(tapped) is not None


def test_bad_inputs_raise_typed_errors():
  model = gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model
  clean, bad = _prompts(512)
  metric = patching.logit_difference(5, 9)
  with pytest.raises(errors.SiteError, match="Unknown site"):
    gradients.site_gradients(model, clean, bad, metric, "resid_middle")
  with pytest.raises(errors.SiteError, match="out of range"):
    gradients.site_gradients(model, clean, bad, metric, "resid_pre", 4)
  with pytest.raises(errors.InputError, match="same shape"):
    gradients.site_gradients(model, clean, bad[:, :5], metric)
  with pytest.raises(errors.InputError, match="outside the vocabulary"):
    gradients.site_gradients(model, clean, bad, gradients.log_prob(512))
  with pytest.raises(errors.InputError, match="negative token id"):
    gradients.log_prob(-1)
  with pytest.raises(errors.InputError, match="one value per batch row"):
    gradients.site_gradients(model, clean, bad, _mean_metric)


def _mean_metric(logits):
  return logits.unwrap("batch", "seq", "vocabulary").mean()
