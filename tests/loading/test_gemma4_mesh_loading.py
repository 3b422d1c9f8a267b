"""Gemma 4 onto a mesh: each device's slice is read alone and equals the host load.

As for Gemma 1-3 (`test_sharded_loading`): on 8 fake CPU devices, a Hugging
Face Gemma 4 checkpoint loaded with a mesh holds exactly the host load's
parameters, sharded by the rules, and every tensor is read once per distinct
slice, in 1/model pieces when it is split: the per-layer embedding table
(rows by vocabulary), the expert weights (by expert, ``moe/gate`` and
``moe/up`` from halves of one stored ``gate_up``) and the key = value
weights of global layers (by kv head).
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
from jax.sharding import NamedSharding
from penzai import pz
from safetensors.numpy import load_file

pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery.loading import hf, hf_config, params, placement  # noqa: E402
from gemma_surgery.parallel import sharding  # noqa: E402

# ALL_FEATURES with 2 kv heads on every layer, so that the k = v global
# layers split over a model axis of 2.
CONFIG = {**g4.ALL_FEATURES, "num_global_key_value_heads": 2}
MESHES = [{"data": 2, "model": 4}, {"data": 4, "model": 2}]
# On model=4 some small weights (e.g. 1 global head of 2) stay replicated.
pytestmark = pytest.mark.filterwarnings(
  "ignore::gemma_surgery.errors.ReplicationWarning"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_mesh")
  g4.write_checkpoint(directory, seed=3, **CONFIG)
  return directory


def _params(model) -> dict[str, pz.nx.NamedArray]:
  return {p.label: p.value for p in pz.unbind_params(model)[1]}


def _spec_of(label: str, model) -> tuple:
  return tuple(_params(model)[label].data_array.sharding.spec)


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_load_equals_host_load(checkpoint, shape):
  mesh = sharding.make_mesh(shape)
  host = gs.load(checkpoint, dtype="float32", progress=False)
  placed = gs.load(checkpoint, dtype="float32", mesh=mesh, progress=False)
  got, want = _params(placed.model), _params(host.model)
  assert sorted(got) == sorted(want)
  for label, value in want.items():
    data = got[label].data_array
    assert got[label].named_shape == value.named_shape, label
    np.testing.assert_array_equal(np.asarray(data), np.asarray(value.data_array))
    spec = sharding.partition_spec(dict(value.named_shape), 0, mesh)
    assert data.sharding.is_equivalent_to(NamedSharding(mesh, spec), data.ndim), label
  # What the Gemma 4-only tensors split along.
  m = placed.model
  table = _spec_of("transformer/per_layer_embedder.embeddings", m)
  assert "model" in table  # vocabulary rows
  assert "model" in _spec_of("transformer/block_0/moe/gating.weights", m)
  assert "model" in _spec_of("transformer/block_0/moe/out.weights", m)
  if shape["model"] == 2:  # 2 kv heads of the k = v global layer 2
    assert "model" in _spec_of("transformer/block_2/attention/key.weights", m)


class _Slice:
  """A safetensors slice handle that records the bytes each read returns."""

  def __init__(self, inner, record):
    self._inner, self._record = inner, record

  def get_shape(self):
    return self._inner.get_shape()

  def get_dtype(self):
    return self._inner.get_dtype()

  def __getitem__(self, index):
    out = self._inner[index]
    self._record(out.nbytes)
    return out


class _File:
  """``safetensors.safe_open`` whose reads are recorded per tensor name."""

  def __init__(self, inner, reads):
    self._inner, self._reads = inner, reads

  def __enter__(self):
    self._inner.__enter__()
    return self

  def __exit__(self, *exc):
    return self._inner.__exit__(*exc)

  def keys(self):
    return self._inner.keys()

  def _recorder(self, name):
    return self._reads.setdefault(name, []).append

  def get_tensor(self, name):
    out = self._inner.get_tensor(name)
    self._recorder(name)(out.nbytes)
    return out

  def get_slice(self, name):
    return _Slice(self._inner.get_slice(name), self._recorder(name))


@pytest.mark.parametrize("shape", MESHES)
def test_each_device_reads_only_its_slice(checkpoint, shape, monkeypatch):
  """Counted at the file: every tensor is read once in all (each distinct
  slice once, never whole first), the split ones in 1/model pieces."""
  mesh = sharding.make_mesh(shape)
  config = hf_config.config_from_hf(hf_config.read_config_json(checkpoint))
  sizes = {n: a.nbytes for n, a in load_file(checkpoint / "model.safetensors").items()}
  reads: dict[str, list[int]] = {}
  real_open = safetensors.safe_open
  monkeypatch.setattr(
    safetensors, "safe_open", lambda *a, **k: _File(real_open(*a, **k), reads)
  )
  with hf.open_hf_params(checkpoint, config) as lazy:
    params.bind_parameters(config, lazy, mesh=mesh)
  monkeypatch.undo()
  unused = {n for n in sizes if n not in reads}
  assert all("k_proj" in n or "k_norm" in n for n in unused), unused  # shared
  for name, got in reads.items():
    assert sum(got) == sizes[name], (name, got)
  m = shape["model"]
  split = {
    "model.embed_tokens_per_layer.weight": m,  # vocabulary rows
    "model.layers.0.experts.gate_up_proj": 2 * m,  # gate, up: experts each
    "model.layers.0.experts.down_proj": m,
    "model.layers.2.self_attn.k_proj.weight": 2 if m == 2 else 1,  # k = v heads
  }
  for name, pieces in split.items():
    assert set(reads[name]) == {sizes[name] // pieces}, (name, reads[name])
  # Negative control: with no mesh the same tensors are read whole.
  reads.clear()
  monkeypatch.setattr(
    safetensors, "safe_open", lambda *a, **k: _File(real_open(*a, **k), reads)
  )
  hf.read_hf_params(checkpoint, config, progress=False)
  assert reads["model.layers.0.experts.down_proj"] == [
    sizes["model.layers.0.experts.down_proj"]
  ]


def _slices(shape, rng) -> tuple[slice, ...]:
  out = []
  for n in shape:
    start = int(rng.integers(0, n))
    out.append(slice(start, int(rng.integers(start + 1, n + 1))))
  return tuple(out)


def _mismatches(lazy: dict, eager: dict, rng, tries: int = 4) -> list[str]:
  """Names whose random sub-slices differ from the eager array's."""
  bad = []
  for name in lazy:
    value = eager[name]
    for _ in range(tries):
      index = _slices(value.shape, rng)
      got = lazy[name].read(index)
      if got.shape != value[index].shape or not np.array_equal(got, value[index]):
        bad.append(name)
        break
  return bad


def test_lazy_sub_slices_equal_the_eager_arrays(checkpoint):
  config = hf_config.config_from_hf(hf_config.read_config_json(checkpoint))
  eager = hf.read_hf_params(checkpoint, config, progress=False)
  rng = np.random.default_rng(0)
  with hf.open_hf_params(checkpoint, config) as lazy:
    assert sorted(lazy) == sorted(eager)
    assert _mismatches(lazy, eager, rng) == []
    # Negative control: a reader off by one row is caught.
    table = lazy["per_layer_embedder"]
    shifted = placement.LazyArray(
      table.shape,
      table.dtype,
      lambda index: (
        table.read((slice(index[0].start + 1, index[0].stop + 1), *index[1:]))
        if index[0].stop < table.shape[0]
        else table.read(index) + 1
      ),
    )
    assert _mismatches({"per_layer_embedder": shifted}, eager, rng, tries=8) == [
      "per_layer_embedder"
    ]
