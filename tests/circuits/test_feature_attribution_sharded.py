"""Feature attribution on the embedded model sharded over 8 fake devices ==
the same on one device (float32: summation order differs, ~1e-6)."""

from __future__ import annotations

import jax
import numpy as np

import gemma_surgery as gs
from gemma_surgery.analysis import patching
from gemma_surgery.circuits import features as fa
from gemma_surgery.parallel import sharding


def test_sharded_feature_attribution_equals_single_device():
  assert len(jax.devices()) == 8, "tests/conftest.py must force 8 CPU devices"
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  ids = np.array([[2, 300, 301, 302, 303, 300, 301]] * 4, np.int32)
  ids[1:, 3] = [310, 320, 330]
  metric = patching.logit_difference(302, 303)
  sae = gs.sae.load_sae("tiny")
  got = {
    name: fa.feature_attribution(
      gs.load("tiny", progress=False, **kwargs).model, sae, ids, metric
    )
    for name, kwargs in (("single", {}), ("sharded", {"mesh": mesh}))
  }
  one, many = got["single"], got["sharded"]
  for field in ("features", "error", "bias"):
    np.testing.assert_allclose(
      getattr(many, field), getattr(one, field), rtol=1e-4, atol=2e-5
    )
  assert np.abs(one.features).max() > 0.1  # the compared values are not all zero
