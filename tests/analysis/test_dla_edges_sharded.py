"""Direct logit and edge attribution on a model sharded over 8 fake devices ==
the same on one device (float64: only summation order differs)."""

from __future__ import annotations

import jax
import numpy as np
from helpers.paths import HF_FIXTURES

import gemma_surgery as gs
from gemma_surgery.analysis import direct_logit, edges, patching
from gemma_surgery.parallel import sharding


def test_sharded_direct_logit_and_edges_equal_single_device():
  assert len(jax.devices()) == 8, "tests/conftest.py must force 8 CPU devices"
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  rng = np.random.default_rng(5)
  clean = rng.integers(4, 512, (2, 8)).astype(np.int32)
  clean[:, 0] = 2
  bad = clean.copy()
  bad[:, 3] = rng.integers(4, 512, 2)
  metric = patching.logit_difference(5, 9)
  got = {}
  with jax.enable_x64():
    for name, kwargs in (("single", {}), ("sharded", {"mesh": mesh})):
      model = gs.load(
        HF_FIXTURES / "gemma2", dtype="float64", progress=False, **kwargs
      ).model
      dla = direct_logit.direct_logit_attribution(model, clean, metric)
      edge = edges.edge_attribution(model, clean, bad, metric)
      got[name] = (dla, {(e.sender, e.receiver): e.score for e in edge})
  (d1, e1), (d2, e2) = got["single"], got["sharded"]
  for field in ("attn", "heads", "mlp", "neurons"):
    np.testing.assert_allclose(
      getattr(d2, field), getattr(d1, field), rtol=1e-9, atol=1e-12
    )
  np.testing.assert_allclose(
    [d2.embed, d2.total, d2.logit_difference],
    [d1.embed, d1.total, d1.logit_difference],
    rtol=1e-9,
  )
  assert e1.keys() == e2.keys() and len(e1) > 10
  keys = sorted(e1)
  np.testing.assert_allclose(
    [e2[k] for k in keys], [e1[k] for k in keys], rtol=1e-9, atol=1e-12
  )
  # The compared values are not all zero.
  assert np.abs(d1.heads).max() > 1e-3 and max(abs(v) for v in e1.values()) > 1e-3
