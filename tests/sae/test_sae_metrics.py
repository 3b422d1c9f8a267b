"""SAE metrics equal independent numpy implementations of the formulas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.sae import metrics

B, S, D, F, V = 3, 7, 16, 24, 11


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, S, D)) + rng.standard_normal(D)  # non-zero mean
  x_hat = x + 0.3 * rng.standard_normal((B, S, D))
  feats = np.maximum(rng.standard_normal((B, S, F)) - 0.8, 0)
  tokens = rng.integers(3, V, (B, S))
  tokens[:, 0] = 2
  tokens[1, 3] = 0
  logits = rng.standard_normal((B, S, V)) * 2
  other = logits + rng.standard_normal((B, S, V))
  return x, x_hat, feats, tokens, logits, other


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(logits, tokens, mask):
  logp = _np_log_softmax(logits[:, :-1])
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  m = mask[:, 1:]
  return (nll * m).sum() / m.sum()


def test_reconstruction_metrics_match_numpy():
  x, x_hat, feats, tokens, *_ = _data()
  mask = metrics.token_mask(tokens)
  xs, xh, fs = x[mask], x_hat[mask], feats[mask]  # [n, d]
  assert metrics.l0(feats, mask) == pytest.approx((fs > 0).sum(-1).mean(), rel=1e-6)
  assert metrics.mse(x, x_hat, mask) == pytest.approx(
    ((xs - xh) ** 2).sum(-1).mean(), rel=1e-6
  )
  total = (xs**2).sum(-1).mean() - (xs.mean(0) ** 2).sum()
  ev = 1 - ((xs - xh) ** 2).sum(-1).mean() / total
  assert metrics.explained_variance(x, x_hat, mask) == pytest.approx(ev, rel=1e-5)
  assert metrics.fvu(x, x_hat, mask) == pytest.approx(1 - ev, rel=1e-5)
  cos = (xs * xh).sum(-1) / np.linalg.norm(xs, axis=-1) / np.linalg.norm(xh, axis=-1)
  assert metrics.cosine_similarity(x, x_hat, mask) == pytest.approx(
    cos.mean(), rel=1e-5
  )
  np.testing.assert_allclose(
    metrics.feature_density(feats, mask), (fs > 0).mean(0), rtol=1e-6
  )


def test_mask_excludes_bos_specials_and_first_position():
  tokens = np.array([[2, 5, 0, 7], [9, 1, 6, 2]])
  np.testing.assert_array_equal(
    metrics.token_mask(tokens),
    [[False, True, False, True], [False, False, True, False]],
  )


def test_loss_metrics_match_numpy():
  *_, tokens, logits, other = _data(1)
  mask = metrics.token_mask(tokens)
  clean, spliced = _np_ce(logits, tokens, mask), _np_ce(other, tokens, mask)
  assert metrics.cross_entropy(logits, tokens, mask) == pytest.approx(clean, rel=1e-5)
  assert metrics.delta_lm_loss(logits, other, tokens, mask) == pytest.approx(
    spliced - clean, rel=1e-4
  )
  p = np.exp(_np_log_softmax(logits[:, :-1]))
  kl = (p * (_np_log_softmax(logits[:, :-1]) - _np_log_softmax(other[:, :-1]))).sum(-1)
  expected_kl = (kl * mask[:, 1:]).sum() / mask[:, 1:].sum()
  assert metrics.kl_divergence(logits, other, mask) == pytest.approx(
    expected_kl, rel=1e-5
  )
  assert metrics.ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
  assert metrics.kl_score(0.2, 0.8) == pytest.approx(0.75)


def test_named_arrays_give_the_same_numbers():
  x, x_hat, feats, tokens, logits, other = _data(2)
  mask = metrics.token_mask(tokens)
  nx = lambda a, last: pz.nx.wrap(jnp.asarray(a)).tag("batch", "seq", last)  # noqa: E731
  named_mask = pz.nx.wrap(jnp.asarray(mask)).tag("batch", "seq")
  named_tokens = pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")
  assert metrics.explained_variance(
    nx(x, "embedding"), nx(x_hat, "embedding"), named_mask
  ) == pytest.approx(metrics.explained_variance(x, x_hat, mask), rel=1e-6)
  assert metrics.l0(nx(feats, "latents"), named_mask) == pytest.approx(
    metrics.l0(feats, mask)
  )
  assert metrics.cross_entropy(
    nx(logits, "vocabulary"), named_tokens, named_mask
  ) == pytest.approx(metrics.cross_entropy(logits, tokens, mask), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_perfect_reconstruction_properties(seed):
  x, _, feats, tokens, logits, other = _data(seed)
  mask = metrics.token_mask(tokens)
  assert metrics.explained_variance(x, x, mask) == pytest.approx(1.0, abs=1e-6)
  assert metrics.fvu(x, x, mask) == pytest.approx(0.0, abs=1e-6)
  assert metrics.mse(x, x, mask) == 0.0
  assert metrics.cosine_similarity(x, x, mask) == pytest.approx(1.0, abs=1e-5)
  assert metrics.delta_lm_loss(logits, logits, tokens, mask) == pytest.approx(
    0, abs=1e-6
  )
  assert metrics.kl_divergence(logits, logits, mask) == pytest.approx(0, abs=1e-6)
  clean = metrics.cross_entropy(logits, tokens, mask)
  ablated = metrics.cross_entropy(other, tokens, mask)
  assert metrics.ce_loss_recovered(clean, clean, ablated) == pytest.approx(1.0)
  assert metrics.ce_loss_recovered(clean, ablated, ablated) == pytest.approx(0.0)


def test_summary_renders_html():
  x, x_hat, feats, tokens, logits, other = _data(3)
  mask = metrics.token_mask(tokens)
  summary = metrics.summarize(
    x,
    x_hat,
    feats,
    mask,
    clean_logits=logits,
    spliced_logits=other,
    ablated_logits=other * 3,
    tokens=tokens,
  )
  assert summary.l0 == pytest.approx(metrics.l0(feats, mask))
  html = summary._repr_html_()
  assert "<table" in html and "explained_variance" in html and "http" not in html


def test_bad_inputs():
  x, x_hat, feats, tokens, logits, _ = _data(4)
  with pytest.raises(errors.InputError, match="Shapes differ"):
    metrics.mse(x, x_hat[:, :-1])
  with pytest.raises(errors.InputError, match="selects no tokens"):
    metrics.l0(feats, np.zeros((B, S), bool))
  with pytest.raises(errors.InputError, match="mask has shape"):
    metrics.l0(feats, np.ones((B, S + 1), bool))
  with pytest.raises(errors.InputError, match="'latents' axis"):
    metrics.l0(pz.nx.wrap(jnp.asarray(feats)).tag("batch", "seq", "embedding"))
  with pytest.raises(errors.InputError, match="logits cover tokens"):
    metrics.cross_entropy(logits, tokens[:, :-1])
  with pytest.raises(errors.InputError, match="undefined"):
    metrics.ce_loss_recovered(1.0, 1.0, 1.0)
