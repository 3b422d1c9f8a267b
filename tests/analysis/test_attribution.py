"""Attribution patching (AtP, AtP*, IG) vs the exact batched patching sweep.

The exact reference is `patching_sweep` (one patched forward per piece), and
for integrated gradients the exact effect of patching a whole layer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.analysis import attribution, patching
from gemma_surgery.generation import named_tokens
from gemma_surgery.surgery import interventions
from gemma_surgery.tour.run import induction_patching_prompts


@functools.cache
def _tiny():
  lm = gs.load("tiny", progress=False)
  clean, bad, correct, wrong = induction_patching_prompts(
    lm.config.vocab_size, bos_id=lm.config.bos_id, tokenizer=lm.tokenizer
  )
  return lm.model, clean, bad, patching.logit_difference(correct, wrong)


@functools.cache
def _fixture(variant: str, seed: int):
  """A fixture model and a minimal pair: one token swapped for its nearest
  neighbour in embedding space (cosine), as in name-swap corruptions."""
  model = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False).model
  emb = load_file(HF_FIXTURES / variant / "model.safetensors")[
    "model.embed_tokens.weight"
  ]
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  vocab = emb.shape[0]
  rng = np.random.default_rng(seed)
  clean = rng.integers(4, vocab, (1, 10)).astype(np.int32)
  clean[:, 0] = 2
  sims = emb @ emb[clean[0, 4]]
  sims[clean[0, 4]] = sims[:4] = -np.inf
  bad = clean.copy()
  bad[0, 4] = int(sims.argmax())
  metric = patching.logit_difference(int(clean[0, 5]), int(clean[0, 7]))
  return model, clean, bad, metric


def _compare(model, clean, bad, metric, site, by, method="atp"):
  exact = patching.patching_sweep(
    model, clean, bad, metric, site=site, by=by, progress=False
  )
  est = attribution.attribution_patching(
    model, clean, bad, metric, site=site, by=by, method=method
  )
  np.testing.assert_allclose(est.clean, exact.clean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(est.corrupted, exact.corrupted, rtol=1e-4, atol=1e-4)
  return est, exact, est.agreement(exact)


@pytest.mark.parametrize(
  ("site", "by"), [("resid_pre", "position"), ("attn.z", "head")]
)
def test_atp_ranks_like_the_exact_sweep_on_tiny_induction(site, by):
  """Spearman >= 0.8 and the exact top 5 inside AtP's top 10."""
  model, clean, bad, metric = _tiny()
  est, exact, agree = _compare(model, clean, bad, metric, site, by)
  print(site, by, agree)
  assert agree["spearman"] >= 0.8
  assert agree["top_k_recall"] == 1.0
  # Negative control: the same estimates with positions shuffled rank badly.
  shuffled = np.random.default_rng(0).permutation(est.effects.reshape(-1))
  true = (exact.scores - exact.corrupted).reshape(-1)
  assert attribution.spearman(true, shuffled) < 0.5


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_atp_on_fixtures_finds_the_top_components(variant):
  """Random-weight fixtures (gemma2: soft caps, sliding window; gemma3:
  QK-norm, local/global): AtP's ranking is positively and clearly correlated
  and finds most of the exact top 5 in its top 10 (see the report: a random
  residual stream is far from linear, so the 0.8 bar is measured on tiny)."""
  model, clean, bad, metric = _fixture(variant, 1)
  _, _, agree = _compare(model, clean, bad, metric, "resid_pre", "position")
  print(variant, agree)
  assert agree["spearman"] >= 0.5
  assert agree["top_k_recall"] >= 0.8


@pytest.mark.parametrize(
  ("where", "site"),
  [("tiny", "attn.k"), ("gemma2", "attn.q"), ("gemma3", "attn.k")],
)
def test_atp_star_is_closer_to_exact_on_heads(where, site):
  """The QK fix lowers the error of query/key patches by head."""
  args = _tiny() if where == "tiny" else _fixture(where, 1)
  _, _, plain = _compare(*args, site, "head", "atp")
  _, _, star = _compare(*args, site, "head", "atp*")
  print(where, site, "atp", plain, "atp*", star)
  assert star["mean_abs_error"] < 0.8 * plain["mean_abs_error"]
  assert star["top_k_recall"] >= plain["top_k_recall"]


def _whole_layer_effect(model, clean, bad, metric, site, layer):
  patched, acts = gs.capture(model, site, layer)
  patched(named_tokens(clean))
  swapped = interventions.patch(model, site, layer, acts[site, layer])
  out = np.asarray(metric(swapped(named_tokens(bad))))[0]
  base = np.asarray(metric(model(named_tokens(bad))))[0]
  return float(out - base)


@pytest.mark.parametrize(("site", "layer"), [("mlp.out", 5), ("resid_pre", 3)])
def test_integrated_gradients_converge_to_the_exact_effect(site, layer):
  """IG attributions of a layer sum to the exact effect of patching it whole.

  Controls: the wrong sign fails, and the stale gradient (AtP's, taken at
  the corrupted end only) is further off than IG with many steps.
  """
  model, clean, bad, metric = _tiny()
  exact = _whole_layer_effect(model, clean, bad, metric, site, layer)
  totals = {}
  for method, steps in (("atp", 1), ("ig", 2), ("ig", 64)):
    est = attribution.attribution_patching(
      model, clean, bad, metric, site=site, layers=[layer], method=method, steps=steps
    )
    totals[method, steps] = float(est.effects.sum())
  print(site, layer, exact, totals)
  assert abs(exact) > 0.5
  err = {k: abs(v - exact) for k, v in totals.items()}
  assert err["ig", 64] <= 0.02 * abs(exact)
  assert err["ig", 64] < err["ig", 2] or err["ig", 2] <= 0.02 * abs(exact)
  assert err["ig", 64] < err["atp", 1]
  assert abs(-totals["ig", 64] - exact) > 0.5 * abs(exact)  # wrong sign fails


def test_result_views_and_errors():
  model, clean, bad, metric = _tiny()
  est = attribution.attribution_patching(
    model, clean, bad, metric, site="attn.z", by="head_position", layers=[4, 5]
  )
  assert est.effects.shape == (2, clean.shape[1], 4)
  named = est.named()["effects"]
  assert dict(named.named_shape) == {"layer": 2, "seq": clean.shape[1], "heads": 4}
  np.testing.assert_allclose(est.scores, est.corrupted + est.effects)
  by_head = attribution.attribution_patching(
    model, clean, bad, metric, site="attn.z", by="head", layers=[4, 5]
  )
  np.testing.assert_allclose(by_head.effects, est.effects.sum(1), rtol=1e-5, atol=1e-6)
  with pytest.raises(errors.SiteError, match="head site"):
    attribution.attribution_patching(model, clean, bad, metric, by="head")
  with pytest.raises(errors.InputError, match="method"):
    attribution.attribution_patching(model, clean, bad, metric, method="atp2")
  with pytest.raises(errors.InputError, match="steps"):
    attribution.attribution_patching(model, clean, bad, metric, method="ig", steps=0)
  with pytest.raises(errors.InputError, match="corrupted"):
    attribution.attribution_patching(model, clean, None, metric)
  with pytest.raises(errors.InputError, match="head_position"):
    attribution.attribution_patching(
      model, clean, bad, metric, site="attn.k", by="head_position", method="atp*"
    )
  exact = patching.patching_sweep(
    model, clean, bad, metric, site="attn.z", by="head", layers=[4, 5], progress=False
  )
  with pytest.raises(errors.InputError, match="like with like"):
    est.agreement(exact)
