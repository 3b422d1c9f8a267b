"""Sharded restore and forward on a mesh of 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery
from gemma_surgery.generation.api import greedy_generate
from gemma_surgery.parallel import sharding


def _logits(model, tokens):
  named = pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq")
  return np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))


def _param(model, label_suffix):
  for p in pz.unbind_params(model)[1]:
    if p.label.endswith(label_suffix):
      return p.value
  raise KeyError(label_suffix)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py must force 8 CPU devices"
  return sharding.make_mesh({"data": 2, "model": 4})


def _check_sharded_matches(variant, mesh, dtype, tolerance):
  source = HF_FIXTURES / variant
  single = gemma_surgery.load(source, dtype=dtype, progress=False)
  sharded = gemma_surgery.load(source, dtype=dtype, mesh=mesh, progress=False)
  gate = _param(sharded.model, "block_0/mlp/gating_linear.weights")
  spec = gate.data_array.sharding.spec
  assert "model" in tuple(spec), f"MLP weights not sharded: {spec}"
  assert len(gate.data_array.sharding.device_set) == 8
  shard_shape = gate.data_array.addressable_shards[0].data.shape
  assert np.prod(shard_shape) * 4 == np.prod(gate.data_array.shape)

  tokens = np.random.default_rng(0).integers(4, 512, size=(2, 20))
  batch_sharded = jax.device_put(
    jnp.asarray(tokens, jnp.int32),
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
  )
  expected = _logits(single.model, tokens)
  got = _logits(sharded.model, batch_sharded)
  assert np.abs(got - expected).max() <= tolerance

  prompt = tokens[:, :6]
  new_single = greedy_generate(single.model, prompt, max_new_tokens=12)
  new_sharded = greedy_generate(sharded.model, prompt, max_new_tokens=12)
  np.testing.assert_array_equal(new_single, new_sharded)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma1_mqa"])
def test_sharded_equals_single_device_exactly_in_float64(variant, mesh):
  """In float64 the only difference is summation order: far below 1e-5."""
  with jax.enable_x64():
    _check_sharded_matches(variant, mesh, "float64", 1e-5)


def test_sharded_equals_single_device_in_float32(mesh):
  """In float32, contractions split over 4 devices sum in another order.

  With logits up to ~25 that moves them by a few 1e-5 (relative ~2e-6), so
  the float32 bound is 1e-4; the float64 test above is the exactness check.
  """
  _check_sharded_matches("gemma2", mesh, "float32", 1e-4)


def test_shard_model_does_not_mutate_input(mesh):
  lm = gemma_surgery.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False)
  moved = sharding.shard_model(lm.model, mesh)
  before = _param(lm.model, "block_0/mlp/out_linear.weights")
  after = _param(moved, "block_0/mlp/out_linear.weights")
  assert len(before.data_array.sharding.device_set) == 1
  assert len(after.data_array.sharding.device_set) == 8


def test_strict_rules_reject_indivisible_axes(mesh):
  lm = gemma_surgery.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False)
  with pytest.raises(gemma_surgery.ShardingError, match="head_groups.*size 2.*size 4"):
    sharding.shard_model(lm.model, mesh, [("head_groups", "model")], strict=True)


def test_rules_must_name_mesh_axes(mesh):
  with pytest.raises(gemma_surgery.ShardingError, match="no axis 'tensor'"):
    sharding.partition_spec({"neurons": 8}, 0, mesh, [("neurons", "tensor")])


def test_mesh_shape_must_match_devices():
  with pytest.raises(gemma_surgery.ShardingError, match="3 slots but there are 8"):
    sharding.make_mesh({"data": 3})
