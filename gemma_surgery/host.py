"""Host copies of arrays that may span several processes.

``np.asarray`` fails on a ``jax.Array`` whose shards live partly on other
processes (a multi-process mesh, `gemma_surgery.parallel.distributed`). Library code
that hands numpy to users goes through `to_numpy`, which all-gathers such
arrays and is a plain ``np.asarray`` otherwise (no cost on one process).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def spans_processes(array: Any) -> bool:
  """Whether ``array`` is a jax.Array with shards this process can't read."""
  return isinstance(array, jax.Array) and not (
    array.is_fully_addressable or array.is_fully_replicated
  )


def to_numpy(array: Any, dtype: Any = None) -> np.ndarray:
  """``np.asarray(array, dtype)``, all-gathering an array that spans processes.

  For such an array every process must call it (a collective), in the same
  order, as in any multi-process JAX program.
  """
  if spans_processes(array):
    from jax.experimental import multihost_utils

    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array, dtype)
