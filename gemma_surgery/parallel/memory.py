"""Per-device memory of parameters and KV caches on a mesh, without arrays.

`plan` applies the same axis-name rules as loading and generation
(`gemma_surgery.parallel.sharding`) to the named shapes a `GemmaConfig` implies, on a
mesh described only by its axis sizes, so it works for any size on any
machine (``scripts/memory_plan.py`` prints the README's table):

* parameters: every Penzai parameter (`loading.parameters.penzai_shapes`);
* KV cache: what `gs.generate` allocates (Penzai's
  ``KVCachingTransformerLM``): per layer a key and a value cache ``{batch,
  seq: cache_len, <kv head axes>, projection}`` in the activation dtype; the
  kv head axis is ``heads`` (MHA) or ``head_groups`` (GQA), none for MQA.
  Local (sliding-window) layers cache the full length too.

Not counted: activations of the forward pass, capture buffers, XLA's
scratch space and the compiled program.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.sharding import AbstractMesh

from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import build, parameters
from gemma_surgery.parallel import sharding

__all__ = ["MemoryPlan", "kv_cache_shapes", "plan"]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of a model on a mesh (see `plan`).

  Attributes:
    mesh: Mesh axis sizes.
    parameters: Parameter bytes on each device.
    kv_cache: KV-cache bytes on each device.
    replicated_parameters: Of ``parameters``, the bytes of parameters with
      no sharded axis (copied on every device).
    total_parameters: Bytes of the whole model (one copy).
    total_kv_cache: Bytes of the whole KV cache (one copy).
  """

  mesh: dict[str, int]
  parameters: int
  kv_cache: int
  replicated_parameters: int
  total_parameters: int
  total_kv_cache: int

  @property
  def per_device(self) -> int:
    return self.parameters + self.kv_cache


def kv_cache_shapes(
  config: GemmaConfig, batch: int, cache_len: int
) -> dict[str, dict[str, int]]:
  """Named shapes of the KV caches of `gs.generate` (per layer, key and value).

  Gemma 4: each layer's own kv heads and head width; KV-shared layers have
  no cache (they read their producer's).
  """
  out = {}
  for i in range(config.num_layers):
    if config.is_kv_shared(i):
      continue
    kv_heads, _ = build.head_axes(config, i)
    shape = {
      "batch": batch,
      **kv_heads,
      "projection": config.layer_head_dim(i),
      "seq": cache_len,
    }
    for kind in ("key", "value"):
      out[f"layer_{i}/{kind}"] = dict(shape)
  return out


def _split(named: dict[str, int], mesh: AbstractMesh, rules) -> int:
  """How many pieces an array of this named shape is cut into."""
  spec = sharding.partition_spec(named, 0, mesh, rules)
  return math.prod(mesh.shape[axis] for axis in spec if axis is not None)


def plan(
  config: GemmaConfig,
  mesh_shape: dict[str, int],
  *,
  batch: int,
  cache_len: int,
  rules: sharding.Rules | None = None,
) -> MemoryPlan:
  """Parameter and KV-cache bytes per device of ``config`` on a mesh.

  Args:
    config: The architecture; its ``parameter_dtype`` and
      ``activation_dtype`` (the KV cache's) give the element sizes.
    mesh_shape: Mesh axis sizes, e.g. ``{"data": 2, "model": 8}``.
    batch: Sequences generated at once.
    cache_len: KV-cache length (prompt + new tokens).
    rules: Axis-name rules (default `sharding.DEFAULT_RULES`).

  Raises:
    ShardingError: Rules naming axes the mesh lacks.
  """
  mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
  p_bytes = jnp.dtype(config.parameter_dtype).itemsize
  a_bytes = jnp.dtype(config.activation_dtype or config.parameter_dtype).itemsize
  per_device = replicated = total = 0
  for named in parameters.penzai_shapes(config).values():
    size = math.prod(named.values()) * p_bytes
    pieces = _split(named, mesh, rules)
    total += size
    per_device += size // pieces
    replicated += size if pieces == 1 else 0
  cache_device = cache_total = 0
  for named in kv_cache_shapes(config, batch, cache_len).values():
    size = math.prod(named.values()) * a_bytes
    cache_total += size
    cache_device += size // _split(named, mesh, rules)
  return MemoryPlan(
    mesh=dict(mesh_shape),
    parameters=per_device,
    kv_cache=cache_device,
    replicated_parameters=replicated,
    total_parameters=total,
    total_kv_cache=cache_total,
  )
