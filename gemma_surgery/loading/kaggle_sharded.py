"""Kaggle/Flax orbax checkpoints restored straight onto a (multi-process) mesh.

`kaggle.read_kaggle_checkpoint` restores host numpy arrays; with a mesh,
`restore_sharded` instead asks orbax for ``jax.Array`` s with *global
shardings*, so each process reads from disk only the shards of its own
devices and no process ever holds the whole model:

1. As in `kaggle.open_plan`: metadata, layout, config and every shape are
   checked before anything is read.
2. Each Penzai parameter gets its ``NamedSharding`` from its axis names
   (`gemma_surgery.parallel.sharding`). The stored leaf it comes from (a fused
   ``qkv_einsum``/``gating_einsum``, a stacked ``[layers, ...]`` weight, or a
   plain one) is restored sharded along the matching dims (`leaf_spec`):
   the canonical mapping (`kaggle_layout.Part`, `parameters.Target`) is inverted
   dim by dim, e.g. the ``model`` axis of a ``neurons`` dim of ``mlp/gate``
   lands on ``F`` of a ``[2, D, F]`` or ``[2, F, D]`` ``gating_einsum``.
3. One jitted function per kind of parameter slices/transposes/reshapes the
   restored leaf into the Penzai parameter, casts it to the parameter dtype
   (norms as ``1 + w`` in float32 first, as on the host path) and constrains
   it to its sharding. When the leaf's sharding already matches, this moves
   no data between devices; otherwise XLA reshuffles it (e.g. ``query_heads``
   sharded while the flat head axis is split in other blocks).

Leaves are restored in groups of about `kaggle.CHUNK_BYTES`, and a group's
restored leaves are dropped once its parameters are built.
"""

from __future__ import annotations

import collections
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from gemma_surgery.config import GemmaConfig
from gemma_surgery.loading import kaggle, kaggle_layout, placement
from gemma_surgery.model import parameters
from gemma_surgery.parallel import sharding


def leaf_spec(
  target: parameters.Target,
  part: kaggle_layout.Part,
  ref: kaggle_layout.Ref,
  penzai_spec: PartitionSpec,
  leaf_shape: tuple[int, ...],
  mesh: Mesh,
) -> PartitionSpec:
  """How to shard a stored leaf so each device gets what its parameter needs.

  Args:
    target: The Penzai parameter made from the leaf.
    part: The canonical array's transform of the module weight.
    ref: Where the module weight is in the leaf (``ref.index`` for stacked).
    penzai_spec: The parameter's ``PartitionSpec``.
    leaf_shape: The stored leaf's full shape.
    mesh: The mesh.

  Returns:
    A ``PartitionSpec`` of the leaf; dims whose size doesn't divide their
    mesh axis stay replicated.
  """
  spec = part.stored_spec(target.canonical_spec(tuple(penzai_spec)))
  if ref.index is not None:
    spec = (None, *spec)
  spec = tuple(
    None if axis is None or size % mesh.shape[axis] else axis
    for axis, size in zip(spec, leaf_shape, strict=True)
  )
  return PartitionSpec(*spec)


_STATIC = ("indexed", "part", "target", "dtype", "out")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _to_penzai(
  leaf: jax.Array,
  index: jax.Array,
  *,
  indexed: bool,
  part: kaggle_layout.Part,
  target: parameters.Target,
  dtype: Any,
  out: NamedSharding,
) -> jax.Array:
  """Leaf (stored layout, sharded) -> Penzai parameter data, constrained."""
  x = jax.lax.dynamic_index_in_dim(leaf, index, 0, keepdims=False) if indexed else leaf
  x = target.apply(part(x)).astype(dtype)
  return jax.lax.with_sharding_constraint(x, out)


def restore_sharded(
  path: str | pathlib.Path,
  *,
  mesh: Mesh,
  rules: sharding.Rules | None = None,
  variant: str | None = None,
  config: GemmaConfig | None = None,
  parameter_dtype: str = "float32",
  activation_dtype: str | None = None,
  check: Callable[[GemmaConfig, Mesh, Any], None] | None = None,
  progress: bool = True,
) -> tuple[GemmaConfig, dict[str, pz.nx.NamedArray]]:
  """Restores a Kaggle/Flax checkpoint as Penzai parameters on ``mesh``.

  Args:
    path: The orbax checkpoint folder or a Kaggle download folder.
    mesh: The device mesh (may span several processes).
    rules: Axis-name sharding rules (default `sharding.DEFAULT_RULES`).
    variant: See `kaggle.read_kaggle_checkpoint`.
    config: See `kaggle.read_kaggle_checkpoint`.
    parameter_dtype: The parameters' dtype (cast on the devices).
    activation_dtype: ``config.activation_dtype``.
    check: Called with ``(config, mesh, rules)`` before anything is read
      (e.g. `gemma_surgery.parallel.distributed.check_mesh`).
    progress: Show a progress bar (bytes of the checkpoint's leaves).

  Returns:
    ``(config, arrays)``: Penzai label -> NamedArray, for
    `params.bind_named`.

  Raises:
    CheckpointError, ConfigError: See `kaggle.read_kaggle_checkpoint`.
    ShardingError: Rules naming axes the mesh lacks (or from ``check``).
  """
  import orbax.checkpoint as ocp  # Slow import; only needed here.

  with kaggle.open_plan(
    path,
    variant=variant,
    config=config,
    parameter_dtype=parameter_dtype,
    activation_dtype=activation_dtype,
  ) as opened:
    config, directory = opened.config, opened.directory
    if check is not None:
      check(config, mesh, rules)
    dtype = jnp.dtype(config.parameter_dtype)
    jobs: dict[kaggle_layout.TreePath, list] = collections.defaultdict(list)
    leaf_meta, leaf_specs = {}, {}
    for label, target in parameters.penzai_targets(config).items():
      ref, part = opened.plan[target.canonical]
      shape = target.shape(part(ref.proxy()).shape)
      out = placement.target_sharding(target, shape, mesh, rules)
      jobs[ref.path].append((label, target, ref, part, shape, out))
      if ref.path not in leaf_meta:
        meta = kaggle.leaf_at(opened.tree, ref.path)
        leaf_meta[ref.path] = meta
        leaf_specs[ref.path] = leaf_spec(
          target, part, ref, out.spec, tuple(meta.shape), mesh
        )
    sizes = kaggle.leaf_bytes(leaf_meta)
    arrays = {}
    with kaggle.bytes_bar(sizes, f"Restoring {directory.name}", progress) as bar:
      for chunk in kaggle.chunked(sizes, kaggle.CHUNK_BYTES):
        item = kaggle.subtree({p: leaf_meta[p] for p in chunk})
        restore_args = kaggle.subtree(
          {
            p: ocp.ArrayRestoreArgs(
              restore_type=jax.Array,
              sharding=NamedSharding(mesh, leaf_specs[p]),
              global_shape=tuple(leaf_meta[p].shape),
              dtype=np.dtype(leaf_meta[p].dtype),
            )
            for p in chunk
          }
        )
        args = ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True
        )
        try:
          restored = opened.handler.restore(directory, args=args)
        except Exception as e:  # orbax/tensorstore raise many types.
          first = "/".join(chunk[0])
          raise kaggle.corrupt_error(
            directory, f"restore {first!r} and others", e
          ) from e
        for p in chunk:
          leaf = kaggle.leaf_at(restored, p)
          for label, target, ref, part, shape, out in jobs[p]:
            data = _to_penzai(
              leaf,
              jnp.int32(0 if ref.index is None else ref.index),
              indexed=ref.index is not None,
              part=part,
              target=target,
              dtype=dtype,
              out=out,
            )
            axes = collections.OrderedDict(zip(target.axes, shape, strict=True))
            arrays[label] = pz.nx.NamedArray(named_axes=axes, data_array=data)
          bar.update(sizes[p])
        del restored
  return config, arrays
