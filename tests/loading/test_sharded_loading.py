"""Loading onto a mesh reads per-device slices and equals the host path exactly.

One process with 8 fake CPU devices (tests/conftest.py); the multi-process
runs are in test_distributed.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import kaggle_writers as writers
from helpers.paths import HF_FIXTURES, HF_VARIANTS
from jax.sharding import NamedSharding, PartitionSpec
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.loading import hf, hf_config, kaggle_layout, params, placement
from gemma_surgery.loading.kaggle_sharded import leaf_spec
from gemma_surgery.model import parameters
from gemma_surgery.parallel import sharding

QUERY_HEAD_RULES = (
  ("batch", "data"),
  ("query_heads", "model"),
  ("neurons", "model"),
  ("vocabulary", "model"),
)


def _params(model) -> dict[str, pz.nx.NamedArray]:
  return {p.label: p.value for p in pz.unbind_params(model)[1]}


def _assert_same(got, want, mesh, rules):
  assert sorted(got) == sorted(want)
  for label, value in want.items():
    named = got[label]
    assert named.named_shape == value.named_shape, label
    data = named.data_array
    np.testing.assert_array_equal(np.asarray(data), np.asarray(value.data_array))
    spec = sharding.partition_spec(dict(named.named_shape), 0, mesh, rules)
    assert data.sharding.is_equivalent_to(NamedSharding(mesh, spec), data.ndim), label


@pytest.mark.parametrize("variant", HF_VARIANTS)
@pytest.mark.parametrize(
  "shape, rules",
  [({"data": 2, "model": 4}, None), ({"data": 4, "model": 2}, QUERY_HEAD_RULES)],
)
def test_hf_mesh_load_equals_host_load(variant, shape, rules):
  mesh = sharding.make_mesh(shape)
  host = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False)
  placed = gs.load(
    HF_FIXTURES / variant,
    dtype="float32",
    mesh=mesh,
    sharding_rules=rules,
    progress=False,
  )
  _assert_same(_params(placed.model), _params(host.model), mesh, rules)


def test_bfloat16_slices_are_cast_like_the_host_path():
  mesh = sharding.make_mesh({"data": 1, "model": 8})
  host = gs.load(HF_FIXTURES / "gemma3", dtype="bfloat16", progress=False)
  placed = gs.load(HF_FIXTURES / "gemma3", dtype="bfloat16", mesh=mesh, progress=False)
  _assert_same(_params(placed.model), _params(host.model), mesh, None)


def _counting(lazy: dict, reads: dict) -> dict:
  def wrap(name, array):
    def read(index):
      out = array.read(index)
      reads.setdefault(name, []).append(out.nbytes)
      return out

    return placement.LazyArray(array.shape, array.dtype, read)

  return {name: wrap(name, array) for name, array in lazy.items()}


@pytest.mark.parametrize("shape", [{"data": 2, "model": 4}, {"data": 1, "model": 8}])
def test_each_distinct_slice_is_read_once_and_only_it(shape):
  """Sharded tensors are read in 1/model pieces, each piece once (replicas
  along ``data`` share a read); replicated ones (norms, MQA-free kv heads
  that don't divide) are read whole, once."""
  mesh = sharding.make_mesh(shape)
  path = HF_FIXTURES / "gemma2"
  config = hf_config.config_from_hf(hf_config.read_config_json(path))
  reads: dict[str, list[int]] = {}
  with hf.open_hf_params(path, config) as lazy:
    sizes = {n: int(np.prod(a.shape)) * a.dtype.itemsize for n, a in lazy.items()}
    model = params.bind_parameters(config, _counting(lazy, reads), mesh=mesh)
  targets = parameters.penzai_targets(config)
  m = shape["model"]
  for label, value in _params(model).items():
    name = targets[label.removeprefix("transformer/")].canonical
    assert sum(reads[name]) == sizes[name], name
    split = "model" in tuple(value.data_array.sharding.spec)
    expected = sizes[name] // m if split else sizes[name]
    assert set(reads[name]) == {expected}, (name, reads[name])
  assert any(
    "model" in tuple(v.data_array.sharding.spec) for v in _params(model).values()
  )


KAGGLE_CASES = {
  "flat-gemma1-mha-qkv": ("gemma1_mha", writers.to_flat, {}),
  "flat-gemma1-mqa-squeezed": ("gemma1_mqa", writers.to_flat, {"squeeze_mqa": True}),
  "flat-gemma2-9b-transposed": (
    "gemma2_9b",
    writers.to_flat,
    {"transpose_gating": True},
  ),
  "nested-gemma2": ("gemma2", writers.to_nested, {}),
  "stacked-gemma3-p6": ("gemma3", writers.to_stacked, {"pattern_len": 6}),
}


@pytest.mark.parametrize("case", list(KAGGLE_CASES))
def test_kaggle_sharded_restore_equals_host_load(tmp_path, case):
  name, writer, kwargs = KAGGLE_CASES[case]
  cfg = writers.tiny_config(name)
  path = writers.save(writer(cfg, writers.random_params(cfg), **kwargs), tmp_path / "c")
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  with pytest.warns(UserWarning, match="shapes differ"):
    host = gs.load(path, dtype="float32", variant=writers.TINY[name][0], progress=False)
  with pytest.warns(UserWarning, match="shapes differ"):
    placed = gs.load(
      path,
      dtype="float32",
      variant=writers.TINY[name][0],
      mesh=mesh,
      progress=False,
    )
  _assert_same(_params(placed.model), _params(host.model), mesh, None)


M = "model"


def _target(kind="same", axes=("embedding", "neurons"), sizes=()):
  return parameters.Target("x", axes, kind, sizes)


@pytest.mark.parametrize(
  "part, ref_index, target, penzai, leaf, expected",
  [
    # gating_einsum [2, D, F]: gate = w[0]; neurons -> model lands on F.
    (
      kaggle_layout.Part(0),
      None,
      _target(),
      (None, "model"),
      (2, 8, 16),
      (None, None, "model"),
    ),
    # Transposed gating [2, F, D]: F is dim 1.
    (
      kaggle_layout.Part(0, transpose=True),
      None,
      _target(),
      (None, "model"),
      (2, 16, 8),
      (None, "model", None),
    ),
    # Stacked q_einsum [S, N, D, H] split into head_groups x query_heads.
    (
      kaggle_layout.Part(),
      3,
      _target(
        "heads", ("head_groups", "query_heads", "embedding", "projection"), (4, 2)
      ),
      ("model", None, None, None),
      (5, 8, 16, 4),
      (None, "model", None, None),
    ),
    # Squeezed MQA kv [2, D, H]: nothing to shard.
    (
      kaggle_layout.Part(1, add_axis=True),
      None,
      _target("drop", ("embedding", "projection")),
      (None, None),
      (2, 16, 4),
      (None, None, None),
    ),
    # A dim that doesn't divide its mesh axis stays replicated.
    (
      kaggle_layout.Part(0),
      None,
      _target(),
      (None, "model"),
      (2, 8, 6),
      (None, None, None),
    ),
  ],
)
def test_leaf_spec_inverts_the_canonical_mapping(
  part, ref_index, target, penzai, leaf, expected
):
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  ref = kaggle_layout.Ref(("w",), leaf, np.dtype(np.float32), ref_index)
  got = leaf_spec(target, part, ref, PartitionSpec(*penzai), leaf, mesh)
  assert got == PartitionSpec(*expected)


def test_strict_sharding_rejects_a_mesh_that_leaves_weights_replicated():
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  with pytest.raises(errors.ShardingError, match=r"head_groups=2.*\[1, 2\]"):
    gs.load(HF_FIXTURES / "gemma3", mesh=mesh, strict_sharding=True, progress=False)
  ok = sharding.make_mesh({"data": 4, "model": 2})
  lm = gs.load(HF_FIXTURES / "gemma3", mesh=ok, strict_sharding=True, progress=False)
  assert jax.tree_util.tree_leaves(lm.model)


def test_check_mesh_names_rules_without_a_mesh_axis():
  mesh = sharding.make_mesh({"data": 8})
  config = gs.preset("gemma2_2b")
  with pytest.raises(errors.ShardingError, match="no axis 'model'"):
    gs.distributed.check_mesh(config, mesh)
