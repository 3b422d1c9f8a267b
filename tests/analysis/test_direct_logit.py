"""Direct logit attribution vs a numpy reference of the frozen-norm equations.

The reference recomputes every term from captured activations and the raw
weights: the final residual's direction ``d = g ⊙ (u_c − u_w) / rms(x)``,
each component's ``out · d``, and each head's ``(g_post ⊙ z_h W_O^h /
rms_post) · d``. The negative control differentiates through the *live* final
norm: RMSNorm is scale invariant, so ``x · ∇LD`` is ~0, not ``LD``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz
from penzai.models.transformer import model_parts

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.analysis import direct_logit, patching
from gemma_surgery.generation import named_tokens
from gemma_surgery.tour.run import induction_patching_prompts


@functools.cache
def _case(where: str):
  if where == "tiny":
    lm = gs.load("tiny", progress=False)
    clean, _, correct, wrong = induction_patching_prompts(
      lm.config.vocab_size, bos_id=lm.config.bos_id, tokenizer=lm.tokenizer
    )
    return lm.model, lm.config, clean, patching.logit_difference(correct, wrong)
  lm = gs.load(HF_FIXTURES / where, dtype="float32", progress=False)
  rng = np.random.default_rng(3)
  ids = rng.integers(4, lm.config.vocab_size, (2, 9)).astype(np.int32)
  ids[:, 0] = 2
  return lm.model, lm.config, ids, patching.logit_difference(7, 11, -2)


def _np(x, *axes):
  return np.asarray(x.unwrap(*axes), np.float64)


def _reference(model, config, ids, metric):
  """``(total, embed, attn [L], heads [L, H])`` from numpy."""
  sites = ["embed", "attn.z", "attn.out", "mlp.out", "resid_post"]
  captured, acts = gs.capture(model, sites)
  captured(named_tokens(ids))
  body = [x for x in model.body.sublayers if not isinstance(x, pz.nn.TanhSoftCap)]
  table = _np(body[-1].table.embeddings.value, "vocabulary", "embedding")
  final_norm = body[-2]
  gain = _np(final_norm.sublayers[1].weights.value, "embedding")
  p = metric.position
  x = _np(acts["resid_post", -1], "batch", "seq", "embedding")[:, p]
  rms = np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_norm_eps)
  d = gain * (table[metric.correct] - table[metric.wrong]) / rms  # [batch, emb]
  total = ((x * d).sum(-1)).mean()

  def term(a):
    return (a[:, p] * d).sum(-1).mean()

  embed = term(_np(acts["embed"], "batch", "seq", "embedding"))
  attn, per_head = [], []
  blocks = pz.select(model).at_instances_of(model_parts.TransformerBlock)
  for layer, block in enumerate(blocks.get_sequence()):
    attn.append(term(_np(acts["attn.out", layer], "batch", "seq", "embedding")))
    z = _np(acts["attn.z", layer], "batch", "seq", "heads", "projection")[:, p]
    branch = block.sublayers[0].delta.sublayers
    att = next(s for s in branch if isinstance(s, pz.nn.Attention))
    w = _w_o(att.attn_value_to_output.sublayers[-1].weights.value)
    o = np.einsum("bhp,hpe->bhe", z, w)
    post = branch[-1] if isinstance(branch[-1], pz.nn.RMSLayerNorm) else None
    if post is not None:
      s = o.sum(1)
      r = np.sqrt((s * s).mean(-1, keepdims=True) + config.rms_norm_eps)
      o = o * _np(post.sublayers[1].weights.value, "embedding") / r[:, None]
    per_head.append(np.einsum("bhe,be->h", o, d) / len(d))
  return total, embed, np.array(attn), np.array(per_head)


def _w_o(w):
  """Output weights ``[heads, projection, embedding]``, flat head major."""
  names = [a for a in w.named_shape if a not in ("projection", "embedding")]
  arr = np.asarray(w.unwrap(*names, "projection", "embedding"), np.float64)
  return arr.reshape(-1, *arr.shape[-2:])


@pytest.mark.parametrize("where", ["tiny", "gemma1_mqa", "gemma2", "gemma3"])
def test_terms_match_numpy_and_sum_to_the_frozen_norm_logit_difference(where):
  model, config, ids, metric = _case(where)
  got = direct_logit.direct_logit_attribution(model, ids, metric)
  total, embed, attn, per_head = _reference(model, config, ids, metric)
  scale = max(1.0, abs(total))
  tol = dict(rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(got.total, total, **tol)
  np.testing.assert_allclose(got.embed, embed, **tol)
  np.testing.assert_allclose(got.attn, attn, **tol)
  np.testing.assert_allclose(got.heads, per_head, **tol)
  # The identities: components + remainder == total, remainder ~ round-off.
  parts = got.embed + got.attn.sum() + got.mlp.sum()
  np.testing.assert_allclose(parts + got.remainder, got.total, rtol=1e-6)
  assert abs(got.remainder) < 1e-4 * scale
  np.testing.assert_allclose(got.heads.sum(1), got.attn, **tol)
  np.testing.assert_allclose(got.neurons.sum(1), got.mlp, **tol)
  logits = np.asarray(model(named_tokens(ids)).unwrap("batch", "seq", "vocabulary"))
  actual = (
    logits[:, metric.position, metric.correct]
    - logits[:, metric.position, metric.wrong]
  )
  np.testing.assert_allclose(got.logit_difference, actual.mean(), **tol)
  if config.final_logit_softcap is None:
    np.testing.assert_allclose(got.total, got.logit_difference, **tol)
  else:  # Gemma 2: the terms are of the pre-cap difference, stated and checked
    assert abs(got.total - got.logit_difference) > 1e-3 * scale
  assert {k: tuple(v.named_shape) for k, v in got.named().items()}["heads"] == (
    "layer",
    "heads",
  )


def test_live_norm_gradient_does_not_close_the_identity():
  """Negative control: without freezing the final norm, x·∇LD ≈ 0 ≠ LD."""
  model, _, ids, metric = _case("tiny")
  got = direct_logit.direct_logit_attribution(model, ids, metric)
  captured, acts = gs.capture(model, "resid_post", -1)
  captured(named_tokens(ids))
  x = acts["resid_post", -1]
  tail = pz.freeze_params(pz.nn.Sequential(model.body.sublayers[-2:]))  # no cap
  live = jax.grad(lambda v: metric(tail(v)).mean())(x)
  euler = float((x * live).unwrap("batch", "seq", "embedding").sum()) / ids.shape[0]
  assert abs(got.total) > 1.0
  assert abs(euler) < 0.05 * abs(got.total)


def test_errors():
  model, _, ids, metric = _case("tiny")
  with pytest.raises(errors.InputError, match="logit_difference"):
    direct_logit.direct_logit_attribution(model, ids, gs.analysis.log_prob(3))
  with pytest.raises(errors.InputError, match="position"):
    direct_logit.direct_logit_attribution(
      model, ids, patching.logit_difference(1, 2, 400)
    )
