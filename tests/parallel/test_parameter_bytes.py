"""Measuring a sharded model's parameters, and warning about replicated ones.

Loaded on 8 fake CPU devices (tests/conftest.py). The gemma2 fixture has 4
query heads in 2 kv groups: on ``model=4`` its attention weights can't be
split and stay replicated; on ``model=2`` everything splits.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.parallel import distributed, memory, sharding

FIXTURE = HF_FIXTURES / "gemma2"
HEAD_AXES = {"heads", "head_groups", "query_heads"}


def _load(shape, **kwargs):
  mesh = sharding.make_mesh(shape)
  return gs.load(FIXTURE, dtype="float32", mesh=mesh, progress=False, **kwargs)


def test_model_bytes_count_parameters_once_each():
  shape = {"data": 2, "model": 4}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", errors.ReplicationWarning)
    lm = _load(shape)
  values = [p.value.data_array for p in pz.unbind_params(lm.model)[1]]
  plan = memory.plan(lm.config, shape, batch=1, cache_len=1)

  total, per_device = sharding.parameter_bytes(lm.model)
  assert total == sum(v.nbytes for v in values) == plan.total_parameters
  assert len(per_device) == 8 and set(per_device.values()) == {plan.parameters}

  # The whole model: its parameters (the tied embedding once), plus the
  # non-parameter constants that stay in the unbound tree (softcaps...).
  # Before, parameters were skipped and only those constants (~100 B) counted.
  rest = sharding.bytes_per_device(pz.unbind_params(lm.model)[0])
  measured = sharding.bytes_per_device(lm.model)
  assert set(measured) == set(per_device)
  for device, n in measured.items():
    assert n == plan.parameters + rest.get(device, 0)
  assert min(measured.values()) > total // 8


def test_replicated_parameters_warn_once_with_their_share():
  with pytest.warns(errors.ReplicationWarning) as caught:
    lm = _load({"data": 2, "model": 4})
  assert len(caught) == 1
  text = str(caught[0].message)
  assert "'model' of size 4" in text and "head_groups=2" in text
  assert "key.weights" in text and "strict_sharding=True" in text
  # The share named is the share of the loaded bytes really left unsplit.
  params = [p.value for p in pz.unbind_params(lm.model)[1]]
  unsplit = sum(
    v.data_array.nbytes
    for v in params
    if HEAD_AXES & set(v.named_shape)
    and "model" not in tuple(v.data_array.sharding.spec)
  )
  share = unsplit / sum(v.data_array.nbytes for v in params)
  assert 0 < share < 1
  assert f"about {share:.1%} of the parameters" in text
  found = distributed.replicated_parameters(
    lm.config, sharding.make_mesh({"data": 1, "model": 8})
  )
  assert found and all(r.mesh_axis == "model" for r in found)


def test_meshes_that_split_everything_dont_warn_and_strict_raises():
  with warnings.catch_warnings():
    warnings.simplefilter("error", errors.ReplicationWarning)
    _load({"data": 4, "model": 2})
  with pytest.raises(errors.ShardingError, match=r"head_groups=2.*'model' of size 4"):
    _load({"data": 2, "model": 4}, strict_sharding=True)


def test_shard_model_warns_about_what_stays_replicated():
  model = gs.load(FIXTURE, dtype="float32", progress=False).model
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  with pytest.warns(errors.ReplicationWarning, match=r"head_groups=2.*strict=True"):
    placed = gs.shard_model(model, mesh)
  key = next(
    p.value for p in pz.unbind_params(placed)[1] if p.label.endswith("key.weights")
  )
  assert "model" not in tuple(key.data_array.sharding.spec)
  with warnings.catch_warnings():
    warnings.simplefilter("error", errors.ReplicationWarning)
    gs.shard_model(model, sharding.make_mesh({"data": 4, "model": 2}))
  np.testing.assert_array_equal(
    np.asarray(key.data_array),
    next(
      np.asarray(p.value.data_array)
      for p in pz.unbind_params(model)[1]
      if p.label.endswith("key.weights")
    ),
  )
