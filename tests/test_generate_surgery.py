"""Generation of patched models: KV-cached == uncached, captures, positions, mesh.

One richly patched Gemma 2 fixture (window 8; prompts of 5 and 9 tokens plus
30 new tokens run far past it) is generated once and checked against an
uncached forward pass over the final sequences: the logits captured at every
step (the KV-cached step-by-step logits), and the attention pattern, keys, MLP
hidden units and residual stream captured during decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs

ROWS = [[2, 17, 4, 0, 250], [2, 311, 45, 7, 8, 9, 10, 400, 12]]
NEW = 30
TOL = 1e-5
SITES = ["resid_post", "attn.pattern", "attn.k", "mlp.hidden"]


@pytest.fixture(scope="module")
def base():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


def _patched(base, scale, positions="generated"):
  """Steering at resid_post[1], a one-head edit at attn.z[2], captures."""
  rng = np.random.default_rng(0)
  vector = pz.nx.wrap(jnp.asarray(rng.standard_normal(64), jnp.float32))
  head = np.zeros((4, 16), np.float32)
  head[1] = 3 * rng.standard_normal(16)  # only head 1 (kv group 0, query 1)
  model = gs.steer(
    base, "resid_post", 1, vector.tag("embedding"), scale, positions=positions
  )
  model = gs.steer(
    model, "attn.z", 2, pz.nx.wrap(jnp.asarray(head)).tag("heads", "projection")
  )
  return gs.capture(model, [*SITES, "logits"], [1, -1])


@pytest.fixture(scope="module")
def run(base):
  model, acts = _patched(base, 4.0)
  result = gs.generate(model, ROWS, max_new_tokens=NEW, captures=acts)
  return model, acts, result


@pytest.fixture(scope="module")
def exact():
  """Float64 generation and uncached pass: only summation order differs.

  Returns ``(result, cached, uncached, real)`` with numpy captures.
  """
  with jax.enable_x64():
    base = gs.load(HF_FIXTURES / "gemma2", dtype="float64", progress=False).model
    model, acts = _patched(base, 4.0)
    result = gs.generate(model, ROWS, max_new_tokens=NEW, captures=acts)
    cached = {key: _array(result.captures[key]) for key in acts.keys()}
    real = _uncached(model, result)
    uncached = {key: _array(acts[key]) for key in acts.keys()}
  return result, cached, uncached, real


def _uncached(model, result) -> np.ndarray:
  """Runs ``model`` uncached on the final sequences (updating its captures).

  Returns the ``[batch, seq]`` mask of real (non-pad) positions.
  """
  tokens = np.concatenate([result.prompt, result.tokens], axis=1)
  width = result.prompt.shape[1]
  real = np.arange(tokens.shape[1])[None] >= (width - result.prompt_lengths)[:, None]
  positions = np.where(real, np.cumsum(real, axis=1) - 1, -1)
  gs.jit_forward(model)(
    pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq"),
    token_positions=pz.nx.wrap(jnp.asarray(positions, jnp.int32)).tag("batch", "seq"),
    generation_prompt_end=pz.nx.wrap(jnp.asarray(result.prompt_lengths)).tag("batch"),
  )
  return real


def _array(value: pz.nx.NamedArray) -> np.ndarray:
  """``[batch, seq, ...]`` with the other axes in sorted order."""
  rest = sorted(set(value.named_shape) - {"batch", "seq"})
  return np.asarray(value.unwrap("batch", "seq", *rest))


def test_captured_logits_and_activations_match_uncached_forward(exact):
  """KV-cached step-by-step values == one uncached pass (<= 1e-5, float64)."""
  result, cached, uncached, real = exact
  width = result.prompt.shape[1]
  assert width + NEW > 4 * 8  # far beyond the sliding window of 8
  assert set(cached) == {(s, i) for s in SITES for i in (1, 3)} | {("logits", None)}
  for key in cached:
    assert cached[key].shape == uncached[key].shape, key
    diff = np.abs(cached[key] - uncached[key])[real].max()
    assert diff <= TOL, f"{key}: max |cached - uncached| = {diff}"
  # Every generated token is the argmax of the uncached logits before it.
  predicted = uncached["logits", None][:, width - 1 : width + NEW - 1].argmax(-1)
  np.testing.assert_array_equal(predicted, result.tokens)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma1_mqa"])
def test_float32_captures_match_uncached_to_rounding(variant, run):
  """In float32 the difference is rounding: <= 1e-5 relative to the scale.

  Gemma 3: QK-norm, 5 local : 1 global; Gemma 1 MQA: one shared kv head.
  """
  if variant == "gemma2":
    model, acts, result = run
  else:
    base = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False).model
    model, acts = _patched(base, 4.0)
    result = gs.generate(model, ROWS, max_new_tokens=NEW)
  snapshot = result.captures
  assert set(snapshot.keys()) == set(acts.keys())
  # The model's capture layers hold the same whole-run values as the result.
  np.testing.assert_array_equal(
    _array(acts["resid_post", 1]), _array(snapshot["resid_post", 1])
  )
  cached = {key: _array(snapshot[key]) for key in acts.keys()}
  real = _uncached(model, result)
  for key, value in cached.items():
    expected = _array(acts[key])
    scale = max(1.0, float(np.abs(expected[real]).max()))
    diff = np.abs(value - expected)[real].max()
    assert diff <= TOL * scale, f"{key}: {diff} (scale {scale})"


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
  pattern = _array(caps["attn.pattern", 1])
  real = result.prompt != 0
  np.testing.assert_allclose(pattern.sum(-1)[:, -NEW:], 1.0, atol=1e-5)
  assert real.all(axis=1).any()


def test_generated_only_steering_leaves_the_prompt_alone(base, run):
  """positions="generated": prompt logits unchanged, continuation changed."""
  _, _, steered = run
  model, acts = _patched(base, 0.0)  # same structure: no recompilation
  plain = gs.generate(model, ROWS, max_new_tokens=NEW, captures=acts)
  width = steered.prompt.shape[1]
  before = _array(plain.captures["logits"])[:, :width]
  after = _array(steered.captures["logits"])[:, :width]
  np.testing.assert_array_equal(before, after)
  assert (plain.tokens != steered.tokens).any()
  # The first new token comes from prompt logits, so it cannot change.
  np.testing.assert_array_equal(plain.tokens[:, 0], steered.tokens[:, 0])
