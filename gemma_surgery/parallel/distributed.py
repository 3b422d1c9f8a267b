"""Running the same script on several processes: JAX's multi-controller mode.

Every process (one per host, or per GPU) runs the same script; JAX's
distributed runtime joins their devices into one set of global devices, and
a mesh over them makes ordinary jitted code run across all of them::

    import gemma_surgery as gs

    gs.distributed.initialize()                   # arguments or JAX_* variables
    mesh = gs.distributed.make_mesh("data=2,model=4")
    lm = gs.load(path, mesh=mesh)                 # each process reads its shards
    patched, acts = gs.capture(lm.model, "resid_post", [3])
    out = gs.generate(patched, prompts, max_new_tokens=8, mesh=mesh)
    resid = gs.distributed.gather(out.captures["resid_post", 3])  # numpy, everywhere
    if gs.distributed.is_primary():
      print(out.text)

`initialize` takes the coordinator address, number of processes and process
id from its arguments or the environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); on Cloud TPU pods, SLURM and
Open MPI, JAX discovers them itself. With none of these it does nothing, so
the same script runs unchanged on one process. Arrays that span processes
can't be read with ``np.asarray``; `gather` (or `to_numpy`) brings them to the
host. Library functions that return numpy (`gs.generate`'s tokens, the
analyses) gather internally: every process must call them, in the same
order, as in any SPMD program.

Axis-name sharding (`gemma_surgery.parallel.sharding`) is the same as on one process:
parameters, KV caches, capture buffers and SAEs follow
`sharding.DEFAULT_RULES` (``batch`` → ``data``; heads, ``neurons``,
``vocabulary``, ``latents`` → ``model``). `make_mesh` orders devices
process by process with the last mesh axis fastest, so with ``model`` last
and no larger than one process's devices, each model-parallel group lives in
one host and ``data`` spans hosts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig
from gemma_surgery.host import to_numpy
from gemma_surgery.model import parameters
from gemma_surgery.parallel import lobby as _lobby
from gemma_surgery.parallel import sharding

__all__ = [
  "ProcessInfo",
  "check_mesh",
  "gather",
  "info",
  "initialize",
  "is_primary",
  "make_mesh",
  "parse_mesh",
  "replicated_parameters",
  "shutdown",
  "to_numpy",
  "warn_replicated",
]

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_COUNT = "JAX_NUM_PROCESSES"
ENV_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands in the run.

  Attributes:
    process_index: This process's id (0 is the primary).
    process_count: Number of processes.
    local_device_count: Devices this process drives.
    device_count: Devices of all processes.
    coordinator: The coordinator address, or None (one process, or JAX
      discovered the cluster itself).
  """

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  coordinator: str | None = None


_COORDINATOR: str | None = None


def info() -> ProcessInfo:
  """The current `ProcessInfo` (initializes JAX's backends if needed)."""
  return ProcessInfo(
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    local_device_count=jax.local_device_count(),
    device_count=jax.device_count(),
    coordinator=_COORDINATOR,
  )


def is_primary() -> bool:
  """Whether this is process 0, the one that prints and writes files."""
  return jax.process_index() == 0


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if text is None or not text.strip():
    return None
  try:
    return int(text)
  except ValueError:
    raise errors.DistributedError(f"${name}={text!r} is not an integer.") from None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise errors.DistributedError(
      f"Coordinator address {address!r} must be HOST:PORT (e.g."
      " 10.0.0.1:1234), with process 0 running on HOST."
    )
  return host.strip("[]"), int(port)


def _backends_started() -> bool:
  from jax._src import xla_bridge  # no public equivalent

  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: Sequence[int] | None = None,
  timeout_s: int = 300,
) -> ProcessInfo:
  """Joins this process to a multi-process run (call before any JAX work).

  Arguments left as None come from ``$JAX_COORDINATOR_ADDRESS``,
  ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID``. If none is given anywhere,
  JAX's cluster discovery is tried (Cloud TPU pods, SLURM, Open MPI); outside
  such a cluster this is a single-process run and nothing is started. With
  ``num_processes=1`` nothing is started either.

  Before JAX's runtime starts, all processes meet on the coordinator port
  (`gemma_surgery.parallel.lobby`), so an unreachable coordinator, a missing process
  or inconsistent counts raise `DistributedError` within ``timeout_s``
  instead of JAX terminating the process. On CPU, cross-process collectives
  use gloo.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (which listens there).
    num_processes: Number of processes in the run.
    process_id: This process's id, ``0 .. num_processes - 1``.
    local_device_ids: Restrict this process to these local devices (e.g.
      one GPU per process).
    timeout_s: Bound on waiting for the other processes.

  Returns:
    The `ProcessInfo`.

  Raises:
    DistributedError: Bad or incomplete arguments, an unreachable
      coordinator, inconsistent counts or ids, processes that don't join in
      time, or JAX already started computing in this process.
  """
  global _COORDINATOR
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(ENV_COUNT)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  if jax.distributed.is_initialized():
    if count is not None and count != jax.process_count():
      raise errors.DistributedError(
        f"Already initialized with {jax.process_count()} processes, not {count}."
      )
    return info()
  if address is None and count is None and pid is None:
    return _auto_detect(timeout_s)
  if count is not None and (not isinstance(count, int) or count < 1):
    raise errors.DistributedError(f"num_processes={count!r} must be >= 1.")
  if pid is not None and (
    not isinstance(pid, int) or pid < 0 or (count is not None and pid >= count)
  ):
    valid = "a non-negative int" if count is None else f"in 0..{count - 1}"
    raise errors.DistributedError(
      f"process_id={pid!r} is not {valid} (num_processes={count})."
    )
  if count == 1:
    return info()
  missing = [
    name
    for name, value in (
      ("coordinator address", address),
      ("number of processes", count),
      ("process id", pid),
    )
    if value is None
  ]
  if missing:
    raise errors.DistributedError(
      f"A multi-process run needs the {', '.join(missing)} (arguments, or"
      f" ${ENV_ADDRESS}, ${ENV_COUNT}, ${ENV_ID})."
    )
  host, port = _split_address(address)
  if _backends_started():
    raise errors.DistributedError(
      "JAX has already run computations in this process; call"
      " gemma_surgery.parallel.distributed.initialize() first, before loading models"
      " or creating arrays."
    )
  if pid == 0:
    _lobby.host(port, count, timeout_s)
  else:
    _lobby.join(host, port, count, pid, timeout_s)
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      address,
      count,
      pid,
      local_device_ids=local_device_ids,
      initialization_timeout=int(timeout_s),
    )
  except (RuntimeError, ValueError) as e:
    raise errors.DistributedError(
      f"JAX's distributed runtime did not start (process {pid} of {count},"
      f" coordinator {address}): {e}"
    ) from e
  _COORDINATOR = address
  return info()


def _auto_detect(timeout_s: int) -> ProcessInfo:
  """Cloud TPU pods, SLURM, Open MPI: JAX finds everything; else one process."""
  if _backends_started():
    return info()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout_s))
  except ValueError as e:
    if "coordinator_address" in str(e):  # No cluster around: one process.
      return info()
    raise errors.DistributedError(f"JAX's cluster discovery failed: {e}") from e
  except RuntimeError as e:
    raise errors.DistributedError(f"JAX's cluster discovery failed: {e}") from e
  return info()


def shutdown() -> None:
  """Leaves the run (JAX also does this at exit)."""
  global _COORDINATOR
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
  _COORDINATOR = None


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}`` (one size may be -1).

  Raises:
    ShardingError: Malformed text, repeated names, sizes < 1 (other than one
      -1).
  """
  shape: dict[str, int] = {}
  for part in str(text).split(","):
    name, sep, size = part.partition("=")
    name = name.strip()
    try:
      value = int(size)
    except ValueError:
      value = None
    if not sep or not name.isidentifier() or value is None or name in shape:
      raise errors.ShardingError(
        f"Mesh {text!r}: expected NAME=SIZE pairs separated by commas, with"
        " distinct names, e.g. 'data=2,model=4'."
      )
    shape[name] = value
  return shape


def make_mesh(
  shape: dict[str, int] | str | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A named mesh over all processes' devices, e.g. ``"data=2,model=4"``.

  Devices are ordered process by process (then by id) and the last axis
  varies fastest, so each group along the last axis sits in one process
  when its size divides the local device count.

  Args:
    shape: Axis names and sizes (a dict or `parse_mesh` text); one size may be
      -1 (inferred). Default: ``{"data": 1, "model": all devices}``.
    devices: The devices (default: every process's, `jax.devices()`).

  Raises:
    ShardingError: Sizes whose product is not the number of devices.
  """
  devices = sorted(
    jax.devices() if devices is None else devices,
    key=lambda d: (d.process_index, d.id),
  )
  if isinstance(shape, str):
    shape = parse_mesh(shape)
  shape = dict(shape or {"data": 1, "model": len(devices)})
  inferred = [name for name, size in shape.items() if size == -1]
  if len(inferred) == 1:
    known = math.prod(size for size in shape.values() if size != -1)
    if known > 0 and len(devices) % known == 0:
      shape[inferred[0]] = len(devices) // known
  if any(not isinstance(s, int) or s < 1 for s in shape.values()):
    raise errors.ShardingError(
      f"Mesh shape {shape}: sizes must be positive integers (one may be -1)"
      f" whose product is the number of devices, {len(devices)}."
    )
  return sharding.make_mesh(shape, devices)


def replicated_parameters(
  config: GemmaConfig, mesh: Mesh, rules: sharding.Rules | None = None
) -> list[sharding.Replication]:
  """The parameters of ``config`` that a rule would shard but can't split.

  See `sharding.replicated`; computed from shapes alone (nothing loaded).

  Raises:
    ShardingError: Rules naming axes the mesh lacks.
  """
  return sharding.replicated(parameters.penzai_shapes(config), mesh, rules)


def check_mesh(
  config: GemmaConfig, mesh: Mesh, rules: sharding.Rules | None = None
) -> None:
  """Checks that every parameter a rule shards over a mesh axis can be split.

  With the default (lenient) placement an axis that doesn't divide its mesh
  axis stays replicated: the model still runs, but that parameter is copied
  on every device of that mesh axis (`warn_replicated` says so). This
  raises instead, naming what wouldn't split and which mesh axis sizes
  would work.

  Args:
    config: The architecture.
    mesh: The mesh.
    rules: Axis-name rules (default `sharding.DEFAULT_RULES`).

  Raises:
    ShardingError: Rules naming axes the mesh lacks, or parameters that
      would be replicated over a mesh axis of size > 1.
  """
  found = replicated_parameters(config, mesh, rules)
  if not found:
    return
  raise errors.ShardingError(
    f"Mesh {dict(mesh.shape)} doesn't fit this {config.family} model; these"
    " parameters would be replicated on every device: "
    + "; ".join(r.describe() for r in found)
    + "."
  )


def warn_replicated(
  config: GemmaConfig, mesh: Mesh, rules: sharding.Rules | None = None
) -> list[sharding.Replication]:
  """One `ReplicationWarning` if the mesh leaves parameters replicated.

  Called by `gemma_surgery.load` with a mesh and ``strict_sharding=False``.

  Returns:
    What `replicated_parameters` found (empty: no warning).
  """
  found = replicated_parameters(config, mesh, rules)
  sharding.warn_replicated(found, mesh, f"this {config.family} model", stacklevel=4)
  return found


def gather(tree: Any, *, primary_only: bool = False) -> Any:
  """Every array of a pytree as host numpy (NamedArrays keep their axes).

  Args:
    tree: Arrays, NamedArrays, `Captures` values, results... Non-array leaves
      are kept.
    primary_only: Return None on processes other than 0 (they still take
      part in the all-gather, which every process must call).

  Returns:
    The same tree with numpy leaves (on every process, or only process 0).
  """
  out = jax.tree_util.tree_map(
    lambda x: to_numpy(x) if isinstance(x, jax.Array) else x, tree
  )
  if primary_only and not is_primary():
    return None
  return out
