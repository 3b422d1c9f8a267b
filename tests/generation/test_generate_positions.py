"""Position-aware steering during generation, and sharded generation.

Steering the logits site with a large one-hot vector makes the effect exact:
with ``positions="generated"`` every new token becomes the target while the
prompt logits stay bit-identical; with ``positions="prompt"`` only the prompt
logits move (by exactly the vector) and the continuation is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding

ROWS = [[2, 17, 4, 0, 250], [2, 311, 45, 7, 8, 9, 10, 400, 12]]
NEW = 12
TARGET = 77
WIDTH = max(len(r) for r in ROWS)


@pytest.fixture(scope="module")
def base():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


def _logit_steered(base, positions: str, scale: float):
  onehot = np.zeros(512, np.float32)
  onehot[TARGET] = 1.0
  vector = pz.nx.wrap(jnp.asarray(onehot)).tag("vocabulary")
  model = gs.steer(base, "logits", None, vector, scale, positions=positions)
  model, _ = gs.capture(model, ["resid_post", "attn.pattern"], [1])
  return gs.capture(model, "logits")[0]


def _logits(result) -> np.ndarray:
  return np.asarray(result.captures["logits"].unwrap("batch", "seq", "vocabulary"))


@pytest.fixture(scope="module")
def unsteered(base):
  """positions="generated" with scale 0: the plain model's behaviour."""
  return gs.generate(_logit_steered(base, "generated", 0.0), ROWS, max_new_tokens=NEW)


def test_generated_positions_steer_only_new_tokens(base, unsteered):
  steered = gs.generate(
    _logit_steered(base, "generated", 100.0), ROWS, max_new_tokens=NEW
  )
  # The first new token is read from the last prompt position's logits.
  np.testing.assert_array_equal(steered.tokens[:, 0], unsteered.tokens[:, 0])
  assert (steered.tokens[:, 1:] == TARGET).all()
  assert (unsteered.tokens != TARGET).all()
  np.testing.assert_array_equal(
    _logits(steered)[:, :WIDTH], _logits(unsteered)[:, :WIDTH]
  )


def test_prompt_positions_steer_only_the_prompt(base):
  """Prompt logits move by exactly the vector; generated ones not at all."""
  steered = gs.generate(_logit_steered(base, "prompt", 100.0), ROWS, max_new_tokens=NEW)
  # The first new token is read from the (steered) last prompt position.
  assert (steered.tokens[:, 0] == TARGET).all()
  tokens = np.concatenate([steered.prompt, steered.tokens], axis=1)
  real = np.arange(tokens.shape[1])[None] >= (WIDTH - steered.prompt_lengths)[:, None]
  positions = np.where(real, np.cumsum(real, axis=1) - 1, -1)
  plain = gs.jit_forward(base)(
    pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"),
    token_positions=pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq"),
  )
  delta = _logits(steered) - np.asarray(plain.unwrap("batch", "seq", "vocabulary"))
  is_prompt = np.broadcast_to(np.arange(tokens.shape[1]) < WIDTH, real.shape)[real]
  expected = np.zeros((real.sum(), 512))
  expected[is_prompt, TARGET] = 100.0
  np.testing.assert_allclose(delta[real], expected, atol=1e-4)


def test_sharded_generation_equals_single_device(base, unsteered):
  """Mesh {data: 2, model: 4}: same tokens, same captures, sharded state."""
  mesh = gs.make_mesh({"data": 2, "model": 4})
  model = _logit_steered(base, "generated", 0.0)
  sharded = gs.generate(model, ROWS, max_new_tokens=NEW, mesh=mesh)
  np.testing.assert_array_equal(sharded.tokens, unsteered.tokens)
  for key in unsteered.captures.keys():
    got, want = sharded.captures[key], unsteered.captures[key]
    names = tuple(want.named_shape)
    np.testing.assert_allclose(
      np.asarray(got.unwrap(*names)), np.asarray(want.unwrap(*names)), atol=1e-4
    )
  pattern = _mesh_axes(sharded.captures["attn.pattern", 1])
  assert pattern["batch"] == "data" and pattern["heads"] == "model", pattern
  assert _mesh_axes(sharded.captures["resid_post", 1])["batch"] == "data"
  # Parameters and KV caches were placed on the mesh by axis name.
  prepared, leaves = decoding.prepare(model, 2, WIDTH + NEW, mesh, None)
  _, values = jax.tree_util.tree_unflatten(prepared.structure.treedef, leaves)
  by_label = {v.label: v.value for v in values}
  gate = by_label["transformer/block_0/mlp/gating_linear.weights"]
  assert _mesh_axes(gate)["neurons"] == "model"
  key_cache, _ = by_label["gemma_surgery.generate/cache_0"]
  assert _mesh_axes(key_cache)["batch"] == "data"


def _mesh_axes(array: pz.nx.NamedArray) -> dict[str, str | None]:
  """Mesh axis of each named axis of ``array``'s data."""
  view = array.as_namedarrayview()
  spec = tuple(view.data_array.sharding.spec)
  spec += (None,) * (view.data_array.ndim - len(spec))
  return {name: spec[dim] for name, dim in view.data_axis_for_name.items()}
