"""Gemma 4 on 8 fake devices: experts split over the ``model`` mesh axis.

Sharded logits and fused generation equal the unsharded ones (<= 1e-5), the
expert weights really are split along ``experts``, and `memory.plan` counts
no cache for KV-shared layers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from penzai import pz

pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery.parallel import memory, sharding  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_shard")
  g4.write_checkpoint(directory, **g4.ALL_FEATURES)
  return gs.load(directory, dtype="float32", progress=False).model


def test_experts_split_and_sharded_equals_unsharded(model):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  with pytest.warns(gs.ReplicationWarning):  # 1 global kv head, etc.
    sharded = sharding.shard_model(model, mesh)
  params = {p.label: p.value for p in pz.unbind_params(sharded)[1]}
  experts = params["transformer/block_0/moe/gating.weights"]
  axis = list(experts.named_shape).index("experts")
  assert experts.data_array.sharding.spec[axis] == "model"
  assert len(experts.data_array.sharding.device_set) == 8
  tokens = g4.tokens(2, 12, seed=2)
  diff = np.abs(g4.logits(sharded, tokens) - g4.logits(model, tokens)).max()
  assert diff <= 1e-5, diff
  prompt = g4.tokens(2, 5, seed=6)
  plain = gs.generate(model, prompt, max_new_tokens=12, temperature=0.0).tokens
  split = gs.generate(
    model, prompt, max_new_tokens=12, temperature=0.0, mesh=mesh
  ).tokens
  np.testing.assert_array_equal(np.asarray(split), np.asarray(plain))


def test_memory_plan_skips_kv_shared_layers():
  cfg = gs.preset("gemma4_e2b")
  shapes = memory.kv_cache_shapes(cfg, batch=1, cache_len=8)
  assert len(shapes) == 2 * 15  # 15 of 35 layers own a cache
  assert shapes["layer_14/key"]["projection"] == 512
  assert shapes["layer_13/key"]["projection"] == 256
