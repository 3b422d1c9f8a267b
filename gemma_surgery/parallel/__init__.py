"""The parallel wing: meshes, sharding by axis name, several processes, memory.

* `sharding`: meshes and ``NamedSharding`` s chosen from Penzai axis names.
* `distributed`: joining a multi-process (multi-host) run, mesh checks,
  gathering results to the host.
* `lobby`: the handshake that lets processes agree on a coordinator.
* `memory`: per-device memory plans computed from shapes alone.

Sits above the model wing and below loading: loaders place parameters with
it, nothing here loads checkpoints.
"""

from gemma_surgery.parallel import distributed, lobby, memory, sharding
from gemma_surgery.parallel.sharding import make_mesh, shard_model

__all__ = ["distributed", "lobby", "make_mesh", "memory", "shard_model", "sharding"]
