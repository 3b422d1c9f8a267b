"""Sharding by axis name over a ``jax.sharding.Mesh``.

Parameters, KV caches and activations are Penzai NamedArrays, so a sharding is
chosen from their *axis names*, never from positions: a rule list maps model
axis names (``neurons``, ``heads``, ``vocabulary``, ``batch``…) to mesh axis
names (``model``, ``data``…). For each array the rules are tried in order; an
axis takes a mesh axis when that mesh axis is not yet used by the array and
the axis size divides evenly. Anything else stays replicated.

Only ``jax.sharding.NamedSharding`` is used (``PositionalSharding`` no longer
exists in recent JAX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from gemma_surgery import errors

Rules = Sequence[tuple[str, str]]

# Megatron-style: MLP neurons, attention heads, the vocabulary and SAE latents
# split over ``model``; batches over ``data``. MQA models have no kv head axis, so their
# key/value projections stay replicated. What this means for each kind of array:
#
#   parameters        q/o: heads (or head_groups, else query_heads) -> model;
#                     k/v: heads/head_groups -> model (MQA: replicated);
#                     MLP: neurons -> model; embedder: vocabulary -> model;
#                     norms: replicated.
#   KV caches         {batch, seq, heads|head_groups, projection}:
#                     batch -> data, kv heads -> model (MQA: batch only).
#   capture buffers   batch -> data, plus the site's heads/neurons -> model.
#   SAEs              latents -> model (`SAE_RULES`); W_enc, W_dec, b_enc, θ.
#   prompts, tokens   batch -> data.
DEFAULT_RULES: Rules = (
  ("batch", "data"),
  ("neurons", "model"),
  ("heads", "model"),
  ("head_groups", "model"),
  ("query_heads", "model"),
  ("vocabulary", "model"),
  ("latents", "model"),
)
SAE_RULES: Rules = (("latents", "model"),)


def make_mesh(
  shape: dict[str, int] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a named mesh, e.g. ``make_mesh({"data": 2, "model": 4})``.

  Args:
    shape: Mesh axis names and sizes; default ``{"data": 1, "model": n}`` over
      all ``n`` devices.
    devices: Devices to use (default: ``jax.devices()``).

  Raises:
    ShardingError: If the mesh size doesn't equal the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": 1, "model": len(devices)})
  size = int(np.prod(list(shape.values())))
  if size != len(devices) or any(v <= 0 for v in shape.values()):
    raise errors.ShardingError(
      f"Mesh shape {shape} has {size} slots but there are {len(devices)}"
      f" devices; choose axis sizes whose product is {len(devices)}."
    )
  grid = np.array(devices, dtype=object).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape))


def partition_spec(
  named_shape: dict[str, int],
  positional_ndim: int,
  mesh: Mesh,
  rules: Rules | None = None,
  *,
  strict: bool = False,
) -> PartitionSpec:
  """Chooses a ``PartitionSpec`` for an array from its axis names.

  Args:
    named_shape: The array's named axes and sizes, in storage order.
    positional_ndim: Leading positional (unnamed) axes, never sharded.
    mesh: The mesh.
    rules: ``(axis name, mesh axis)`` pairs, tried in order.
    strict: Raise instead of replicating when a rule's axis does not divide.

  Raises:
    ShardingError: If a rule names a mesh axis the mesh lacks, or (``strict``)
      an axis size is not divisible by its mesh axis size.
  """
  rules = DEFAULT_RULES if rules is None else rules
  assignment: dict[str, str] = {}
  for axis, mesh_axis in rules:
    if mesh_axis not in mesh.shape:
      raise errors.ShardingError(
        f"Sharding rule {axis!r} -> {mesh_axis!r}: the mesh has no axis"
        f" {mesh_axis!r}; its axes are {dict(mesh.shape)}."
      )
    if axis not in named_shape or axis in assignment:
      continue
    if mesh_axis in assignment.values():
      continue
    if named_shape[axis] % mesh.shape[mesh_axis]:
      if strict:
        raise errors.ShardingError(
          f"Axis {axis!r} of size {named_shape[axis]} cannot be split over"
          f" mesh axis {mesh_axis!r} of size {mesh.shape[mesh_axis]}."
        )
      continue
    assignment[axis] = mesh_axis
  spec = [None] * positional_ndim + [assignment.get(a) for a in named_shape]
  return PartitionSpec(*spec)


def named_sharding(
  array: pz.nx.NamedArray | pz.nx.NamedArrayView,
  mesh: Mesh,
  rules: Rules | None = None,
  *,
  strict: bool = False,
) -> NamedSharding:
  """The `NamedSharding` of a NamedArray's underlying data array."""
  view = array.as_namedarrayview()
  name_of_dim = {dim: name for name, dim in view.data_axis_for_name.items()}
  shape = view.data_array.shape
  named_shape = {name_of_dim[d]: shape[d] for d in sorted(name_of_dim)}
  named_spec = iter(partition_spec(named_shape, 0, mesh, rules, strict=strict))
  full = [next(named_spec) if d in name_of_dim else None for d in range(len(shape))]
  return NamedSharding(mesh, PartitionSpec(*full))


def device_put_named(
  array: pz.nx.NamedArray | pz.nx.NamedArrayView,
  mesh: Mesh,
  rules: Rules | None = None,
  *,
  strict: bool = False,
) -> pz.nx.NamedArray | pz.nx.NamedArrayView:
  """Places a NamedArray on ``mesh``, sharded by its axis names."""
  sharding = named_sharding(array, mesh, rules, strict=strict)
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), array)


def shard_tree(
  tree: Any, mesh: Mesh, rules: Rules | None = None, *, strict: bool = False
) -> Any:
  """Shards every NamedArray in a pytree (other leaves are replicated)."""

  def put(leaf):
    if isinstance(leaf, pz.nx.NamedArray | pz.nx.NamedArrayView):
      return device_put_named(leaf, mesh, rules, strict=strict)
    if isinstance(leaf, jax.Array | np.ndarray):
      return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
    return leaf

  is_named = lambda x: isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView)  # noqa: E731
  return jax.tree_util.tree_map(put, tree, is_leaf=is_named)


def shard_model(
  model: Any, mesh: Mesh, rules: Rules | None = None, *, strict: bool = False
) -> Any:
  """Returns a copy of a Penzai model with parameters and state on ``mesh``.

  Parameters and state variables (e.g. KV caches) are unbound, placed by axis
  name, and bound again; the input model is not modified.
  """
  unbound, variables = pz.unbind_variables(model, freeze=True)
  placed = [
    dataclasses.replace(v, value=shard_tree(v.value, mesh, rules, strict=strict))
    for v in variables
  ]
  return pz.bind_variables(unbound, placed, unfreeze_as_copy=True)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Measured bytes of a pytree's arrays resident on each local device.

  Sums the shards this process holds (``addressable_shards``); a replicated
  array counts fully on every device holding a copy.
  """
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def spanning_mesh(tree: Any) -> Mesh | None:
  """The mesh of a pytree's arrays when they span several processes.

  None when every array is local to this process (the single-process case).
  """
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      placed = leaf.sharding
      if isinstance(placed, NamedSharding):
        return placed.mesh
  return None
