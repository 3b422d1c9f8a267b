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
import warnings
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
  ("experts", "model"),  # Gemma 4 MoE: expert parallelism (before neurons)
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


@dataclasses.dataclass(frozen=True)
class Replication:
  """Parameters that a mesh leaves replicated over one mesh axis.

  Attributes:
    mesh_axis: The mesh axis they can't be split over.
    mesh_size: Its size.
    axes: ``(axis name, size)`` of the parameters' axes a rule maps to it.
    labels: The parameters' labels.
    shares: Each one's share of all the parameters' elements.
    sizes_that_split: Mesh axis sizes (dividing the device count) that
      would split them.
  """

  mesh_axis: str
  mesh_size: int
  axes: tuple[tuple[str, int], ...]
  labels: tuple[str, ...]
  shares: tuple[float, ...]
  sizes_that_split: tuple[int, ...]

  @property
  def share(self) -> float:
    """Their share of all the parameters' elements (0..1)."""
    return sum(self.shares)

  def describe(self) -> str:
    """One line: how many, which axis sizes, which mesh axis, what share."""
    sizes = ", ".join(f"{a}={n}" for a, n in self.axes)
    return (
      f"{len(self.labels)} parameter(s) such as {self.labels[0]!r} ({sizes})"
      f" cannot be split over mesh axis {self.mesh_axis!r} of size"
      f" {self.mesh_size} ({self.share:.1%} of the parameters; sizes that would"
      f" split them: {list(self.sizes_that_split)})"
    )


def replicated(
  shapes: dict[str, dict[str, int]], mesh: Mesh, rules: Rules | None = None
) -> list[Replication]:
  """The parameters a rule would shard over a mesh axis but can't split.

  With the default (lenient) placement such a parameter stays replicated:
  it works, but is copied on every device of that mesh axis. Parameters no
  rule names an axis of (norm scales, multi-query k/v) are replicated by
  design and not listed.

  Args:
    shapes: ``{label: named shape}`` of every parameter.
    mesh: The mesh.
    rules: Axis-name rules (default `DEFAULT_RULES`).

  Raises:
    ShardingError: Rules naming axes the mesh lacks.
  """
  rules = DEFAULT_RULES if rules is None else tuple(rules)
  sizes = {label: int(np.prod(list(named.values()))) for label, named in shapes.items()}
  total = max(sum(sizes.values()), 1)
  problems: dict[tuple, list[str]] = {}
  for label, named in shapes.items():
    spec = set(partition_spec(named, 0, mesh, rules))
    for mesh_axis in {m for a, m in rules if a in named}:
      if mesh.shape[mesh_axis] > 1 and mesh_axis not in spec:
        axes = tuple((a, named[a]) for a, m in rules if a in named and m == mesh_axis)
        problems.setdefault((mesh_axis, axes), []).append(label)
  return [
    Replication(
      mesh_axis=mesh_axis,
      mesh_size=mesh.shape[mesh_axis],
      axes=axes,
      labels=tuple(labels),
      shares=tuple(sizes[label] / total for label in labels),
      sizes_that_split=tuple(
        d
        for d in range(1, mesh.size + 1)
        if mesh.size % d == 0 and any(n % d == 0 for _, n in axes)
      ),
    )
    for (mesh_axis, axes), labels in problems.items()
  ]


def warn_replicated(
  found: list[Replication], mesh: Mesh, what: str, *, stacklevel: int = 3
) -> None:
  """One `errors.ReplicationWarning` naming ``found`` (nothing if empty)."""
  if not found:
    return
  shares = {
    label: x for r in found for label, x in zip(r.labels, r.shares, strict=True)
  }
  share = sum(shares.values())
  warnings.warn(
    f"Mesh {dict(mesh.shape)} leaves parameters of {what} replicated: "
    + "; ".join(r.describe() for r in found)
    + f". Replicated, they are copied on every device of that mesh axis"
    f" (about {share:.1%} of the parameters). Pass strict_sharding=True"
    " (`load`) or strict=True (`shard_model`) to raise instead.",
    errors.ReplicationWarning,
    stacklevel=stacklevel,
  )


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
  name, and bound again; the input model is not modified. Parameters a rule
  would shard but whose axis doesn't divide the mesh axis stay replicated,
  with one `errors.ReplicationWarning` naming them (``strict=True``: a
  `ShardingError` instead).
  """
  unbound, variables = pz.unbind_variables(model, freeze=True)
  if not strict:
    shapes = {
      str(v.label): dict(v.value.named_shape)
      for v in variables
      if isinstance(v, pz.ParameterValue)
      and isinstance(v.value, pz.nx.NamedArray | pz.nx.NamedArrayView)
      and not v.value.positional_shape
    }
    warn_replicated(replicated(shapes, mesh, rules), mesh, "this model")
  placed = [
    dataclasses.replace(v, value=shard_tree(v.value, mesh, rules, strict=strict))
    for v in variables
  ]
  return pz.bind_variables(unbound, placed, unfreeze_as_copy=True)


def _arrays(tree: Any) -> list[jax.Array]:
  """The distinct ``jax.Array`` s of a pytree, Penzai variables unwrapped.

  Penzai ``Parameter`` s and ``StateVariable`` s are opaque pytree leaves;
  their values are searched too. A variable or array reached twice (a tied
  embedding shared by the embedder and the unembedder) counts once.
  """
  found: dict[int, jax.Array] = {}
  seen: set[int] = set()
  stack = [tree]
  while stack:
    for leaf in jax.tree_util.tree_leaves(stack.pop()):
      if isinstance(leaf, pz.AbstractVariable):
        if id(leaf) not in seen:
          seen.add(id(leaf))
          stack.append(leaf.value)
      elif isinstance(leaf, jax.Array):
        found.setdefault(id(leaf), leaf)
  return list(found.values())


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """Measured bytes of a pytree's arrays resident on each local device.

  Sums the shards this process holds (``addressable_shards``); a replicated
  array counts fully on every device holding a copy. The values of Penzai
  parameters and state variables are counted (a model can be passed as is);
  an array or variable that appears twice in the tree counts once.
  """
  out: dict[jax.Device, int] = {}
  for leaf in _arrays(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def parameter_bytes(model: Any) -> tuple[int, dict[jax.Device, int]]:
  """A model's parameter bytes: ``(total, per local device)``.

  ``total`` is the size of every parameter once (``nbytes`` of the global
  arrays, whatever their placement); the dict holds the bytes of the shards
  each local device holds (replicated parameters count on every device).
  State variables (KV caches, captures) are not counted: use
  `bytes_per_device` for everything a tree holds.
  """
  values = [p.value for p in pz.unbind_params(model)[1]]
  arrays = _arrays(values)
  return sum(a.nbytes for a in arrays), bytes_per_device(arrays)


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
