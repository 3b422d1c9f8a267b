"""Starting the server: uvicorn on an `Engine` (see `gemma_surgery.serve.app`)."""

from __future__ import annotations

import sys

import uvicorn

from gemma_surgery.serve.app import make_app
from gemma_surgery.serve.engine import Engine

__all__ = ["serve"]


def serve(
  engine: Engine,
  *,
  host: str = "127.0.0.1",
  port: int = 8000,
  name: str = "gemma",
  window_s: float = 0.01,
  max_queue: int = 256,
) -> None:
  """Serves ``engine`` over HTTP until interrupted (blocking).

  Args:
    engine: The `Engine`.
    host: Interface to listen on (default loopback only).
    port: TCP port.
    name: Model name in responses.
    window_s: Batching window in seconds.
    max_queue: Most waiting requests before HTTP 429.
  """
  app = make_app(engine, name=name, window_s=window_s, max_queue=max_queue)
  print(f"serving {name} on http://{host}:{port}", file=sys.stderr, flush=True)
  uvicorn.run(app, host=host, port=port, log_level="warning")
