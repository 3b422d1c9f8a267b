"""The serve wing: a steered Gemma behind OpenAI-compatible HTTP endpoints.

    gemma-surgery serve --model tiny --sae tiny --port 8000

* `protocol`: request bodies (OpenAI completions/chat with a ``steering``
  extension, Neuronpedia's steer shape) checked into `Job` s; `RequestError`.
* `engine`: `Engine`, rows of many requests in one fused generation with
  per-row steering vectors (SAE features and raw vectors); streamed batches
  run in chunks.
* `batcher`: `Batcher`, windowed batching with a bounded queue.
* `streaming`: `TextStream`, a streamed row's text as its tokens come.
* `app`: `make_app`, the FastAPI routes; `run.serve` starts uvicorn.

Needs the ``serve`` extra (``pip install gemma-surgery[serve]``: FastAPI and
uvicorn); importing the library itself never needs them.
"""

from gemma_surgery.serve import app, batcher, engine, protocol, run, streaming
from gemma_surgery.serve.app import make_app
from gemma_surgery.serve.engine import Engine
from gemma_surgery.serve.protocol import Limits, RequestError
from gemma_surgery.serve.run import serve

__all__ = [
  "Engine",
  "Limits",
  "RequestError",
  "app",
  "batcher",
  "engine",
  "make_app",
  "protocol",
  "run",
  "serve",
  "streaming",
]
