"""Gradients and attribution on a model sharded over 8 fake devices ==
the same on one device (float64: only summation order differs)."""

from __future__ import annotations

import jax
import numpy as np
from helpers.paths import HF_FIXTURES

import gemma_surgery as gs
from gemma_surgery.analysis import attribution, gradients, patching
from gemma_surgery.parallel import sharding


def test_sharded_gradients_and_atp_equal_single_device():
  assert len(jax.devices()) == 8, "tests/conftest.py must force 8 CPU devices"
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  rng = np.random.default_rng(3)
  clean = rng.integers(4, 512, (2, 10)).astype(np.int32)
  clean[:, 0] = 2
  bad = clean.copy()
  bad[:, 4] = rng.integers(4, 512, 2)
  metric = patching.logit_difference(5, 9)
  with jax.enable_x64():
    single = gs.load(HF_FIXTURES / "gemma2", dtype="float64", progress=False).model
    sharded = gs.load(
      HF_FIXTURES / "gemma2", dtype="float64", mesh=mesh, progress=False
    ).model
    got = {}
    for name, model in (("single", single), ("sharded", sharded)):
      grads = gradients.site_gradients(
        model, clean, bad, metric, ["resid_pre", "attn.z"], [1, 3]
      )
      star = attribution.attribution_patching(
        model, clean, bad, metric, site="attn.k", by="head", method="atp*"
      )
      atp = attribution.attribution_patching(
        model, clean, bad, metric, site="attn.z", by="head_position"
      )
      got[name] = (grads, star, atp)
  (g1, s1, a1), (g2, s2, a2) = got["single"], got["sharded"]
  for key in g1.grad_corrupted:
    order = tuple(g1.grad_corrupted[key].named_shape)
    np.testing.assert_allclose(
      np.asarray(g2.grad_corrupted[key].unwrap(*order)),
      np.asarray(g1.grad_corrupted[key].unwrap(*order)),
      rtol=1e-9,
      atol=1e-12,
    )
  np.testing.assert_allclose(s2.effects, s1.effects, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(a2.effects, a1.effects, rtol=1e-9, atol=1e-12)
  assert np.abs(a1.effects).max() > 1e-3  # the compared values are not all zero
