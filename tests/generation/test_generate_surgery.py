"""Generation of patched models: KV-cached == uncached, captures, positions.

One richly patched Gemma 2 fixture (window 8; prompts of 5 and 9 tokens plus
30 new tokens run far past it) is generated once and checked against an
uncached forward pass over the final sequences: the logits captured at every
step (the KV-cached step-by-step logits), and the attention pattern, keys, MLP
hidden units and residual stream captured during decoding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers.generation import (
  CAPTURED_SITES,
  PADDED_ROWS,
  as_array,
  check_against_uncached,
  richly_patched,
  uncached_pass,
)
from helpers.paths import HF_FIXTURES

import gemma_surgery as gs

NEW = 30
TOL = 1e-5


@pytest.fixture(scope="module")
def base():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


@pytest.fixture(scope="module")
def run(base):
  model, acts = richly_patched(base, 4.0)
  result = gs.generate(model, PADDED_ROWS, max_new_tokens=NEW, captures=acts)
  return model, acts, result


@pytest.fixture(scope="module")
def exact():
  """Float64 generation and uncached pass: only summation order differs.

  Returns ``(result, cached, uncached, real)`` with numpy captures.
  """
  with jax.enable_x64():
    base = gs.load(HF_FIXTURES / "gemma2", dtype="float64", progress=False).model
    model, acts = richly_patched(base, 4.0)
    result = gs.generate(model, PADDED_ROWS, max_new_tokens=NEW, captures=acts)
    cached = {key: as_array(result.captures[key]) for key in acts.keys()}
    real = uncached_pass(model, result)
    uncached = {key: as_array(acts[key]) for key in acts.keys()}
  return result, cached, uncached, real


def test_captured_logits_and_activations_match_uncached_forward(exact):
  """KV-cached step-by-step values == one uncached pass (<= 1e-5, float64)."""
  result, cached, uncached, real = exact
  width = result.prompt.shape[1]
  assert width + NEW > 4 * 8  # far beyond the sliding window of 8
  assert set(cached) == {(s, i) for s in CAPTURED_SITES for i in (1, 3)} | {
    ("logits", None)
  }
  for key in cached:
    assert cached[key].shape == uncached[key].shape, key
    diff = np.abs(cached[key] - uncached[key])[real].max()
    assert diff <= TOL, f"{key}: max |cached - uncached| = {diff}"
  # Every generated token is the argmax of the uncached logits before it.
  predicted = uncached["logits", None][:, width - 1 : width + NEW - 1].argmax(-1)
  np.testing.assert_array_equal(predicted, result.tokens)


def test_float32_captures_match_uncached_to_rounding(run):
  """In float32 the difference is rounding: <= 1e-5 relative to the scale."""
  model, acts, result = run
  snapshot = result.captures
  assert set(snapshot.keys()) == set(acts.keys())
  # The model's capture layers hold the same whole-run values as the result.
  np.testing.assert_array_equal(
    as_array(acts["resid_post", 1]), as_array(snapshot["resid_post", 1])
  )
  check_against_uncached(model, acts, result)


def test_capture_shapes_and_user_heads(run):
  _, _, result = run
  seq = result.prompt.shape[1] + NEW
  caps = result.captures
  assert caps["resid_post", 3].named_shape == {"batch": 2, "seq": seq, "embedding": 64}
  assert caps["attn.pattern", 1].named_shape == {
    "batch": 2,
    "seq": seq,
    "heads": 4,
    "kv_seq": seq,
  }
  assert caps["attn.k", 3].named_shape == {
    "batch": 2,
    "seq": seq,
    "heads": 2,
    "projection": 16,
  }
  assert caps.stacked("mlp.hidden").named_shape["layer"] == 2
  pattern = as_array(caps["attn.pattern", 1])
  real = result.prompt != 0
  np.testing.assert_allclose(pattern.sum(-1)[:, -NEW:], 1.0, atol=1e-5)
  assert real.all(axis=1).any()


def test_generated_only_steering_leaves_the_prompt_alone(base, run):
  """positions="generated": prompt logits unchanged, continuation changed."""
  _, _, steered = run
  model, acts = richly_patched(base, 0.0)  # same structure: no recompilation
  plain = gs.generate(model, PADDED_ROWS, max_new_tokens=NEW, captures=acts)
  width = steered.prompt.shape[1]
  before = as_array(plain.captures["logits"])[:, :width]
  after = as_array(steered.captures["logits"])[:, :width]
  np.testing.assert_array_equal(before, after)
  assert (plain.tokens != steered.tokens).any()
  # The first new token comes from prompt logits, so it cannot change.
  np.testing.assert_array_equal(plain.tokens[:, 0], steered.tokens[:, 0])
