"""Sharded restore and forward on a mesh of 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HF_FIXTURES
from penzai import pz

import gemma_surgery
from gemma_surgery import generate, sharding


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


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma1_mqa"])
def test_sharded_load_matches_single_device(variant, mesh):
  source = HF_FIXTURES / variant
  single = gemma_surgery.load(source, dtype="float32", progress=False)
  sharded = gemma_surgery.load(source, dtype="float32", mesh=mesh, progress=False)
  gate = _param(sharded.model, "block_0/mlp/gating_linear.weights")
  spec = gate.data_array.sharding.spec
  assert "model" in tuple(spec), f"MLP weights not sharded: {spec}"
  assert len(gate.data_array.sharding.device_set) == 8
  shard_shape = gate.data_array.addressable_shards[0].data.shape
  assert np.prod(shard_shape) * 4 == np.prod(gate.data_array.shape)

  tokens = np.random.default_rng(0).integers(4, 256, size=(2, 20))
  batch_sharded = jax.device_put(
      jnp.asarray(tokens, jnp.int32),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
  )
  expected = _logits(single.model, tokens)
  got = _logits(sharded.model, batch_sharded)
  assert np.abs(got - expected).max() <= 1e-5

  new_single = generate.greedy_generate(single.model, tokens[:, :6], max_new_tokens=12)
  new_sharded = generate.greedy_generate(sharded.model, tokens[:, :6], max_new_tokens=12)
  np.testing.assert_array_equal(new_single, new_sharded)


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
