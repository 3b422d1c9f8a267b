"""`train_jumprelu_sae` recovers planted sparse features; a broken
straight-through estimator does not."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_surgery import errors
from gemma_surgery.sae.train import train_jumprelu_sae

D, K, N = 32, 48, 20_000


def _planted(seed=0):
  """48 unit directions in 32 dimensions (superposition), ~3 active per row."""
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(K, D))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  active = rng.random((N, K)) < 3 / K
  x = (rng.uniform(1, 3, (N, K)) * active) @ dirs + 0.01 * rng.normal(size=(N, D))
  return x.astype(np.float32), dirs


def _recovered(result, dirs):
  w = np.array(result.sae.w_dec.value.unwrap("latents", "embedding"))
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  return (np.abs(dirs @ w.T).max(axis=1) >= 0.9).mean()


@pytest.fixture(scope="module")
def planted():
  return _planted()


def test_recovers_planted_features(planted):
  x, dirs = planted
  result = train_jumprelu_sae(x, width=96, steps=1200, batch_size=1024, progress=False)
  assert _recovered(result, dirs) >= 0.9
  assert 2.0 <= result.history[-1]["l0"] <= 5.0  # ~3 features are active per row
  # The SAE reads raw (unscaled) inputs: its reconstruction explains the data.
  from penzai import pz

  recon = np.asarray(
    result.sae(pz.nx.wrap(x[:2000]).tag("batch", "embedding")).unwrap(
      "batch", "embedding"
    )
  )
  fvu = ((x[:2000] - recon) ** 2).sum() / ((x[:2000] - x[:2000].mean(0)) ** 2).sum()
  assert fvu < 0.15
  assert result.sae.info.width == 96 and result.sae.info.d_in == D


def test_broken_straight_through_estimator_stays_dense(planted):
  """Negative control: with a vanishing kernel bandwidth θ gets no gradient,
  the L0 penalty cannot act, and the features are not found."""
  x, dirs = planted
  result = train_jumprelu_sae(
    x, width=96, steps=1200, batch_size=1024, bandwidth=1e-9, progress=False
  )
  assert result.history[-1]["l0"] > 20
  assert _recovered(result, dirs) < 0.5


def test_bad_arguments():
  with pytest.raises(errors.SAEError, match="width"):
    train_jumprelu_sae(np.zeros((4, 3)), width=0, steps=1)
  with pytest.raises(errors.SAEError, match=r"\[n, d\]"):
    train_jumprelu_sae(np.zeros(3), width=4, steps=1)
