"""`train_jumprelu_sae`: pseudo-derivatives, planted-feature recovery, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.sae import train

D_MODEL, PLANTED, WIDTH = 32, 48, 96


@pytest.fixture(scope="module")
def planted():
  """Sparse data: 48 random unit directions in 32 dims (overcomplete), each
  active with probability 6% (≈2.9 per row) at magnitude U(1, 3)."""
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(PLANTED, D_MODEL))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  coeffs = (rng.random((16384, PLANTED)) < 0.06) * rng.uniform(1, 3, (16384, PLANTED))
  return (coeffs @ directions).astype(np.float32), directions


def _fit(x, **kwargs):
  return gs.sae.train_jumprelu_sae(
    x,
    width=WIDTH,
    steps=2000,
    batch_size=512,
    learning_rate=3e-3,
    lr_warmup_steps=50,
    sparsity_coefficient=0.03,
    bandwidth=0.05,
    initial_threshold=0.05,
    progress=False,
    **kwargs,
  )


def _recovery(sae, directions) -> np.ndarray:
  """Per planted direction: max cosine with any decoder row."""
  rows = np.array(sae.w_dec.value.unwrap("latents", "embedding"))
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  return np.max(directions @ rows.T, axis=1)


def _l0(sae, x) -> float:
  f = sae.encode(pz.nx.wrap(x).tag("batch", "embedding"))
  return gs.sae.metrics.l0(f)


def test_pseudo_derivatives_match_the_rectangle_kernel():
  z = jnp.array([[0.10, 0.52, 0.49, 0.80]])
  theta = jnp.full((4,), 0.5)
  eps = 0.1  # Window: |z − θ| < 0.05, so latents 1 and 2 only.
  g_step = jax.grad(lambda t: jnp.sum(train.step(z, t, eps)))(theta)
  np.testing.assert_allclose(g_step, [0, -10, -10, 0])
  g_jump = jax.grad(lambda t: jnp.sum(train.jumprelu(z, t, eps)))(theta)
  np.testing.assert_allclose(g_jump, [0, -5, -5, 0], rtol=1e-6)
  g_z = jax.grad(lambda v: jnp.sum(train.jumprelu(v, theta, eps)))(z)
  np.testing.assert_allclose(g_z, [[0, 1, 0, 1]])
  assert not np.any(jax.grad(lambda v: jnp.sum(train.step(v, theta, eps)))(z))


def test_recovers_planted_features_and_a_frozen_threshold_does_not(planted):
  """With the threshold pseudo-derivative, almost every planted direction is
  found (cos ≥ 0.9) at about the planted L0 (≈2.9). Freezing θ (what a broken
  straight-through estimator amounts to: the L0 term then has no gradient)
  leaves a dense SAE that recovers far fewer directions."""
  x, directions = planted
  sae = _fit(x)
  cos = _recovery(sae, directions)
  assert np.mean(cos >= 0.9) >= 0.9, np.sort(cos)[:8]
  assert 1.5 <= _l0(sae, x[:2000]) <= 6.0
  assert isinstance(sae, gs.sae.AutoEncoder)
  assert sae.info.site == "resid_post" and sae.info.family == "res"

  broken = _fit(x, learn_threshold=False)
  assert np.mean(_recovery(broken, directions) >= 0.9) <= 0.5
  assert _l0(broken, x[:2000]) > 2 * _l0(sae, x[:2000])


def test_reads_raw_activations_after_folding_the_normalization(planted):
  """The scalar normalization is folded into the weights: the SAE's
  reconstruction of raw (unnormalized) data explains most of its variance."""
  x, _ = planted
  sae = _fit(x * 7.0)
  xs = pz.nx.wrap(x[:2000] * 7.0).tag("batch", "embedding")
  assert gs.sae.metrics.explained_variance(xs, sae(xs)) > 0.9


def test_iterator_of_named_batches_and_mesh_match_the_array_path(planted):
  x, _ = planted
  kwargs = dict(width=WIDTH, steps=20, learning_rate=1e-3, progress=False)
  batches = [x[i * 512 : (i + 1) * 512] for i in range(20)]
  named = (
    pz.nx.wrap(b.reshape(2, 256, D_MODEL)).tag("batch", "seq", "embedding")
    for b in batches
  )
  a = gs.sae.train_jumprelu_sae(iter(batches), **kwargs)
  b = gs.sae.train_jumprelu_sae(named, **kwargs)
  mesh = gs.make_mesh({"data": 1, "model": len(jax.devices())})
  c = gs.sae.train_jumprelu_sae(iter(batches), mesh=mesh, **kwargs)
  for other in (b, c):
    np.testing.assert_allclose(
      other.w_enc.value.unwrap("embedding", "latents"),
      a.w_enc.value.unwrap("embedding", "latents"),
      atol=1e-5,
    )


def test_bad_inputs_raise_library_errors():
  with pytest.raises(gs.SAEError):
    gs.sae.train_jumprelu_sae(np.zeros((8, 4)), width=4, steps=1, site="logits")
  with pytest.raises(gs.InputError):
    gs.sae.train_jumprelu_sae(np.zeros((8, 4)), width=4, steps=1, batch_size=16)
  with pytest.raises(gs.InputError):
    gs.sae.train_jumprelu_sae(iter([]), width=4, steps=1)


def test_nan_activations_are_refused_naming_the_first_row():
  x = np.ones((3, 5, 4), np.float32)
  x[1, 3, 2] = np.nan
  x[2, 0, 0] = np.inf
  with pytest.raises(
    gs.InputError,
    match=r"NaN or infinite.* 2 of 15 rows; the first in row \(1, 3\) \(embedding 2",
  ):
    gs.sae.train_jumprelu_sae(x, width=4, steps=1, batch_size=4, progress=False)
  named = pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq", "embedding")
  with pytest.raises(
    gs.InputError, match=r"row \{'batch': 1, 'seq': 3\} \(embedding 2"
  ):
    gs.sae.train_jumprelu_sae(named, width=4, steps=1, batch_size=4, progress=False)


def test_a_nan_batch_of_an_iterator_is_named():
  batches = [np.ones((8, 4), np.float32) for _ in range(4)]
  batches[2][5, 1] = np.nan
  with pytest.raises(gs.InputError, match=r"batch 2 .*row \(5,\) \(embedding 1"):
    gs.sae.train_jumprelu_sae(iter(batches), width=4, steps=4, progress=False)


def _batches_overflowing_at(step: int, served: list[int]):
  """Finite float32 batches; the one of ``step`` (1-based) is so large that
  its squared error overflows float32 (the loss becomes infinite)."""
  rng = np.random.default_rng(0)
  for i in range(1000):
    served.append(i)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    yield x * np.float32(1e30) if i + 1 == step else x


def test_a_diverging_run_stops_with_the_step_that_went_non_finite():
  served: list[int] = []
  with pytest.raises(
    gs.SAEError, match=r"diverged.* at step 5 \(stopped after step 10"
  ):
    gs.sae.train_jumprelu_sae(
      _batches_overflowing_at(5, served),
      width=4,
      steps=1000,
      log_every=10,
      progress=False,
    )
  assert len(served) == 10  # it stopped instead of training on
  # Control: the same stream without the overflowing batch trains to the end.
  sae = gs.sae.train_jumprelu_sae(
    _batches_overflowing_at(0, []), width=4, steps=20, log_every=10, progress=False
  )
  assert np.isfinite(np.asarray(sae.w_enc.value.unwrap("embedding", "latents"))).all()


def test_divergence_after_the_last_log_point_is_caught_at_the_end():
  with pytest.raises(gs.SAEError, match=r"at step 7 \(stopped after step 8 of 8\)"):
    gs.sae.train_jumprelu_sae(
      _batches_overflowing_at(7, []), width=4, steps=8, log_every=5, progress=False
    )
