"""Placing parameters on a mesh, each process reading only its own slices.

On a mesh, `params.bind_parameters` builds every parameter with
``jax.make_array_from_callback``: JAX asks each process only for the slices
its own (addressable) devices hold, and the callback reads exactly those
from the checkpoint. A parameter source is either an in-memory numpy array or
a `LazyArray` (e.g. a tensor of a safetensors file, `loading.hf`), read slice
by slice, so a process never holds more of the model than its devices do
(plus one slice in flight).

Indices are in the Penzai layout of the parameter
(`gemma_surgery.model.parameters.Target`); they are mapped back to the
canonical layout here: a slice of Penzai's head axes (``head_groups ×
query_heads``) becomes the runs of consecutive flat heads it covers, the
dropped multi-query kv axis becomes ``0:1``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from penzai import pz

from gemma_surgery.model.parameters import Target
from gemma_surgery.parallel import sharding

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """A canonical parameter that has not been read: shape, dtype and a reader.

  Attributes:
    shape: Canonical shape (`gemma_surgery.loading.params`).
    dtype: Stored dtype (what ``read`` returns).
    read: Returns the canonical array's ``[index]`` (one ``slice`` with step
      1 per axis) as a numpy array, reading nothing else.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[Index], np.ndarray]

  @property
  def ndim(self) -> int:
    return len(self.shape)


Source = np.ndarray | LazyArray


def _read(source: Source, index: Index) -> np.ndarray:
  if isinstance(source, LazyArray):
    return source.read(index)
  return np.asarray(source[index])


def normalize(index: tuple, shape: tuple[int, ...]) -> Index:
  """``slice(None)`` and friends as explicit ``slice(start, stop)``."""
  out = []
  for s, size in zip(index, shape, strict=True):
    start, stop, step = s.indices(size)
    if step != 1:
      raise ValueError(f"Strided index {s} is not supported.")
    out.append(slice(start, stop))
  return tuple(out)


def read_target(target: Target, source: Source, index: Index) -> np.ndarray:
  """``target.apply(canonical)[index]``, reading only what it covers.

  Args:
    target: How the Penzai parameter is made from the canonical array.
    source: The canonical array (numpy or `LazyArray`).
    index: Normalized slices over the Penzai dims (`normalize`).

  Returns:
    The slice, in the stored dtype (``float32`` for norms: ``1 + w``).
  """
  if target.kind == "drop":
    return _read(source, (slice(0, 1), *index))[0]
  if target.kind != "heads":
    return target.apply(_read(source, index))
  k = len(target.head_sizes)
  heads, rest = index[:k], index[k:]
  grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in heads], indexing="ij")
  flat = np.ravel_multi_index(tuple(grids), target.head_sizes).ravel()
  runs = np.split(flat, np.flatnonzero(np.diff(flat) != 1) + 1)
  parts = [_read(source, (slice(r[0], r[-1] + 1), *rest)) for r in runs]
  data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
  return data.reshape(tuple(s.stop - s.start for s in heads) + data.shape[1:])


def target_sharding(
  target: Target,
  shape: tuple[int, ...],
  mesh: Mesh,
  rules: sharding.Rules | None,
  strict: bool = False,
) -> NamedSharding:
  """The `NamedSharding` of a Penzai parameter of ``shape``, by axis name."""
  named = dict(zip(target.axes, shape, strict=True))
  return NamedSharding(
    mesh, sharding.partition_spec(named, 0, mesh, rules, strict=strict)
  )


def place(
  target: Target,
  source: Source,
  mesh: Mesh,
  dtype: Any,
  rules: sharding.Rules | None = None,
  *,
  strict: bool = False,
) -> pz.nx.NamedArray:
  """One Penzai parameter on ``mesh``, read slice by slice from ``source``.

  Each process reads only the slices of its addressable devices, once per
  distinct slice (devices holding replicas share one read).

  Args:
    target: How the parameter is made from its canonical array.
    source: The canonical array (numpy or `LazyArray`).
    mesh: The device mesh (may span several processes).
    dtype: The parameter dtype (cast on the host, per slice).
    rules: Axis-name sharding rules (default `sharding.DEFAULT_RULES`).
    strict: Raise `ShardingError` when a rule's axis doesn't divide.

  Returns:
    A NamedArray with the target's axes whose data is a global ``jax.Array``.
  """
  shape = target.shape(tuple(source.shape))
  placement = target_sharding(target, shape, mesh, rules, strict)
  done: dict[tuple, np.ndarray] = {}

  def callback(index: tuple) -> np.ndarray:
    bounds = normalize(index, shape)
    key = tuple((s.start, s.stop) for s in bounds)
    if key not in done:
      data = read_target(target, source, bounds)
      # (np.ascontiguousarray would turn a 0-d slice, e.g. a Gemma 4 layer
      # scalar, into shape (1,).)
      done[key] = np.require(data.astype(dtype, copy=False), requirements="C")
    return done[key]

  data = jax.make_array_from_callback(shape, placement, callback)
  axes = collections.OrderedDict(zip(target.axes, shape, strict=True))
  return pz.nx.NamedArray(named_axes=axes, data_array=data)


def place_all(
  targets: Mapping[str, Target],
  sources: Mapping[str, Source],
  mesh: Mesh,
  dtype: Any,
  rules: sharding.Rules | None = None,
  *,
  strict: bool = False,
  progress: Callable[[], None] | None = None,
) -> dict[str, pz.nx.NamedArray]:
  """`place` for every target (label -> NamedArray)."""
  out = {}
  for label, target in targets.items():
    out[label] = place(
      target, sources[target.canonical], mesh, dtype, rules, strict=strict
    )
    if progress is not None:
      progress()
  return out
