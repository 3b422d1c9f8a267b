"""The HTTP app: OpenAI-compatible completions and Neuronpedia-style steering.

Routes:
  GET  /health                 ``{"status": "ok", "batches": [rows, ...],
                               "completed": generations finished}``
  GET  /v1/models              the served model and its steerable SAEs
  POST /v1/completions         OpenAI completions (``stream`` too)
  POST /v1/chat/completions    OpenAI chat completions (``stream`` too)
  POST /v1/steer               Neuronpedia's steer request: ``{"STEERED",
                               "DEFAULT"}`` completions of one prompt

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status for bad requests (400), a full queue (429), and 500 if a
generation fails; every request is handled on its own, so one bad request
never affects another. Streaming sends OpenAI's server-sent events as the
tokens are decoded: a batch holding a streamed request runs in chunks of
``Engine.stream_chunk`` tokens (`gemma_surgery.serve.streaming`), the first
right after the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gemma_surgery.serve import protocol
from gemma_surgery.serve.batcher import Batcher
from gemma_surgery.serve.engine import Engine, Output
from gemma_surgery.serve.protocol import Job, RequestError
from gemma_surgery.serve.streaming import TextStream
from gemma_surgery.tokenizer.chat import GEMMA_CHAT

__all__ = ["make_app"]


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
  kind = "invalid_request_error" if status < 500 else "server_error"
  body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
  return JSONResponse(body, status_code=status)


def _cut(output: Output, stop: tuple[str, ...]) -> tuple[str, str]:
  """The text before the first stop string, and the finish reason."""
  text, reason = output.text, output.finish_reason
  cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
  if cuts:
    return text[: min(cuts)], "stop"
  return text, reason


def make_app(
  engine: Engine,
  *,
  name: str = "gemma",
  window_s: float = 0.01,
  max_queue: int = 256,
) -> FastAPI:
  """A FastAPI app serving ``engine`` (see the module doc).

  Args:
    engine: The `Engine` (model, tokenizer, SAEs, limits).
    name: The model name reported in responses.
    window_s: Batching window (see `gemma_surgery.serve.batcher`).
    max_queue: Most waiting requests before 429.
  """
  batcher = Batcher(
    engine.run, max_batch=engine.max_batch, window_s=window_s, max_queue=max_queue
  )
  # Chat turns in the tokenizer's markers (Gemma 4: <|turn>...<turn|>).
  chat_format = getattr(engine.tokenizer, "chat_format", GEMMA_CHAT)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await batcher.start()
    yield
    await batcher.stop()
    engine.stop_followers()  # several processes: the others stop following

  app = FastAPI(title="gemma-surgery", lifespan=lifespan)
  app.state.batcher = batcher

  @app.exception_handler(RequestError)
  async def request_error(request, e: RequestError):
    return _error(e.status, e.message, e.param)

  @app.exception_handler(Exception)
  async def server_error(request, e: Exception):
    return _error(500, f"Generation failed: {type(e).__name__}: {e}")

  def space() -> tuple:
    return engine.limits, engine.steerable

  async def body_of(request: Request) -> dict:
    return protocol.parse_json(await request.body())

  @app.get("/health")
  async def health():
    # Rows of the last generations: shows how requests were batched.
    return {
      "status": "ok",
      "batches": batcher.batches[-256:],
      "completed": batcher.completed,
    }

  @app.get("/v1/models")
  async def models():
    return {
      "object": "list",
      "data": [{"id": name, "object": "model", "owned_by": "gemma-surgery"}],
      "steering_sources": engine.sources,
    }

  async def complete(job: Job) -> tuple[Output, int]:
    rows = engine.rows(job)
    return (await batcher.submit(rows))[0], len(rows[0].ids)

  def usage(prompt: int, output: Output) -> dict:
    n = len(output.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

  def stream(job: Job, chat: bool, ident: str) -> StreamingResponse:
    """Queues the job's row; its text is sent chunk by chunk as decoded."""
    rows = engine.rows(job)
    pieces: asyncio.Queue = asyncio.Queue()
    future = batcher.enqueue(rows, pieces.put_nowait)  # 4xx before streaming
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    ends = rows[0].end_ids
    text = TextStream(engine.tokenizer, ends, job.max_new_tokens, job.stop)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
      if chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if piece is not None:
          delta["content"] = piece
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
      else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        choice["logprobs"] = None
      body = {
        "id": ident,
        "object": kind,
        "created": int(time.time()),
        "model": job.model or name,
        "choices": [choice],
      }
      return f"data: {json.dumps(body)}\n\n"

    async def events():
      if chat:
        yield chunk(None, None, first=True)
      while text.reason is None:
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():  # the generation ended: every piece was queued
          getter.cancel()
          if pieces.empty():
            break
          continue
        _, tokens, _ = getter.result()
        if piece := text.feed(tokens[0]):
          yield chunk(piece, None)
      if text.reason is None:  # not done by its chunks (or the batch failed)
        try:
          final, reason = _cut((await future)[0], job.stop)
        except Exception as e:  # noqa: BLE001 - reported in the stream
          error = {"message": f"Generation failed: {e}", "type": "server_error"}
          yield f"data: {json.dumps({'error': error})}\n\n"
          return
        if piece := text.finish(final, reason):
          yield chunk(piece, None)
      yield chunk(None, text.reason)
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  @app.post("/v1/completions")
  async def completions(request: Request):
    job = protocol.completion_job(await body_of(request), *space())
    ident = f"cmpl-{uuid.uuid4().hex}"
    if job.stream:
      return stream(job, False, ident)
    output, prompt = await complete(job)
    text, reason = _cut(output, job.stop)
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
      "id": ident,
      "object": "text_completion",
      "created": int(time.time()),
      "model": job.model or name,
      "choices": [choice],
      "usage": usage(prompt, output),
    }

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    job = protocol.chat_job(await body_of(request), *space(), chat_format)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    if job.stream:
      return stream(job, True, ident)
    output, prompt = await complete(job)
    text, reason = _cut(output, job.stop)
    message = {"role": "assistant", "content": text}
    return {
      "id": ident,
      "object": "chat.completion",
      "created": int(time.time()),
      "model": job.model or name,
      "choices": [{"index": 0, "message": message, "finish_reason": reason}],
      "usage": usage(prompt, output),
    }

  @app.post("/v1/steer")
  async def steer(request: Request) -> Any:
    job = protocol.steer_job(await body_of(request), *space())
    steered, default = await batcher.submit(engine.rows(job))
    return {
      "STEERED": steered.text,
      "DEFAULT": default.text,
      "features": [f.__dict__ for f in job.features],
      "n_tokens": job.max_new_tokens,
    }

  return app
