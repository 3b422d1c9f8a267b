"""Process 0 tells the other processes of a multi-process mesh what to run.

The server runs on process 0; the model spans every process, so each
generation is a collective that all processes must enter with the same
inputs. Before each generation process 0 broadcasts its `Plan` (a small
fixed-size header, then the steered (site, layer) points, the padded prompt
ids and steering vectors) with
``multihost_utils.broadcast_one_to_all``; the other processes wait in
`receive` (inside `Engine.follow`) and run the same generation. A header
with command 0 ends their loop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.experimental import multihost_utils

from gemma_surgery.surgery.sites import SITES

__all__ = ["Plan", "announce", "receive", "stop"]

_RUN, _STOP = 1, 0
_SITES = tuple(SITES)  # sites by number in the points array
_INTS = 8


@dataclasses.dataclass(frozen=True)
class Plan:
  """One generation: ``ids`` ``[batch, width]`` (0 = left padding),
  ``vectors`` ``[points, batch, embedding]`` added at ``points`` ((site,
  layer) each), new tokens, sampling, and tokens per streamed chunk
  (``chunk``; 0: one fused generation)."""

  ids: np.ndarray
  vectors: np.ndarray
  new: int
  temperature: float
  top_p: float | None
  seed: int
  points: tuple[tuple[str, int], ...] = ()
  chunk: int = 0


def _header(command: int, plan: Plan | None) -> tuple[np.ndarray, np.ndarray]:
  if plan is None:
    return np.zeros(_INTS, np.int32), np.zeros(2, np.float32)
  batch, width = plan.ids.shape
  ints = [command, batch, width, plan.new, plan.seed, plan.top_p is not None]
  ints += [plan.chunk, len(plan.points)]
  floats = [plan.temperature, plan.top_p or 0.0]
  return np.asarray(ints, np.int32), np.asarray(floats, np.float32)


def _broadcast(value):
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def announce(plan: Plan) -> Plan:
  """On process 0: sends ``plan`` to the other processes; returns it as sent."""
  ints, floats = _header(_RUN, plan)
  _broadcast(ints), _broadcast(floats)
  points = [(_SITES.index(site), layer) for site, layer in plan.points]
  _broadcast(np.asarray(points, np.int32).reshape(-1, 2))
  ids, vectors = _broadcast(plan.ids), _broadcast(plan.vectors)
  return dataclasses.replace(plan, ids=ids.astype(np.int32), vectors=vectors)


def receive(dim: int) -> Plan | None:
  """On other processes: the next plan of process 0 (None: stop)."""
  ints = _broadcast(np.zeros(_INTS, np.int32))
  floats = _broadcast(np.zeros(2, np.float32))
  command, batch, width, new, seed, has_top_p, chunk, n = (int(v) for v in ints)
  if command == _STOP:
    return None
  points = _broadcast(np.zeros((n, 2), np.int32))
  ids = _broadcast(np.zeros((batch, width), np.int32)).astype(np.int32)
  vectors = _broadcast(np.zeros((n, batch, dim), np.float32))
  top_p = float(floats[1]) if has_top_p else None
  named = tuple((_SITES[int(s)], int(layer)) for s, layer in points)
  return Plan(ids, vectors, new, float(floats[0]), top_p, seed, named, chunk)


def stop() -> None:
  """On process 0: ends the other processes' `receive` loops."""
  ints, floats = _header(_STOP, None)
  _broadcast(ints), _broadcast(floats)
