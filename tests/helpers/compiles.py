"""Counting XLA backend compilations in a block (shared by tests)."""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations in the block (``counts["compiles"]``)."""
  counts = {"compiles": 0}

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      counts["compiles"] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
