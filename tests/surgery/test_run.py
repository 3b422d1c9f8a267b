"""`jit_forward`: same logits as the eager model, captures updated, one compile."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.surgery import run


def test_jit_forward_matches_eager_and_fills_captures():
  lm = gs.load(HF_FIXTURES / "gemma3", dtype="float32", progress=False)
  patched, acts = gs.capture(lm.model, ["resid_post", "logits"])
  tokens = pz.nx.wrap(jnp.asarray(np.arange(2, 22)[None], jnp.int32)).tag(
    "batch", "seq"
  )
  eager = np.asarray(lm.model(tokens).unwrap("batch", "seq", "vocabulary"))
  forward = gs.jit_forward(patched)
  before = run._call._cache_size()
  forward(tokens)  # compiles, or reuses a compile of the same structure
  first = run._call._cache_size()
  for _ in range(2):
    out = np.asarray(forward(tokens).unwrap("batch", "seq", "vocabulary"))
  assert first - before <= 1 and run._call._cache_size() == first, (
    "captures must not recompile"
  )
  assert np.abs(out - eager).max() <= 1e-4
  np.testing.assert_allclose(
    np.asarray(acts["logits"].unwrap("batch", "seq", "vocabulary")), out
  )
  assert acts.stacked("resid_post").named_shape["layer"] == 6


def test_jit_forward_with_topk_captures_compiles_once():
  lm = gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False)
  patched, top = gs.interventions.capture_topk(lm.model, "mlp.hidden", 0, k=3)
  tokens = pz.nx.wrap(jnp.asarray(np.arange(2, 12)[None], jnp.int32)).tag(
    "batch", "seq"
  )
  forward = gs.jit_forward(patched)
  before = run._call._cache_size()
  forward(tokens)  # compiles, or reuses a compile of the same structure
  first = run._call._cache_size()
  for _ in range(2):
    forward(tokens)
  assert first - before <= 1 and run._call._cache_size() == first, (
    "top-k captures must not recompile"
  )
  assert top["mlp.hidden", 0][0].named_shape == {"batch": 1, "seq": 10, "top_k": 3}


def test_jit_forward_rejects_out_of_vocabulary_ids():
  lm = gs.load(HF_FIXTURES / "gemma3", dtype="float32", progress=False)
  forward = gs.jit_forward(lm.model)
  bad = pz.nx.wrap(jnp.array([[2, 512]], jnp.int32)).tag("batch", "seq")
  with pytest.raises(gs.InputError, match="id 512"):
    forward(bad)
