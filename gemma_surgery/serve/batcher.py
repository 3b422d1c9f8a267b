"""Windowed batching: requests arriving together share one fused generation.

A request's rows wait in a bounded queue. The batching loop takes the first
waiting request, then keeps collecting for ``window_s`` seconds (or until
``max_batch`` rows are collected), splits what it has by sampling settings
(rows of one generation share temperature, top-p and seed) and runs each
group as ONE `Engine.run` in a worker thread, one generation at a time. A
request whose rows would overflow the batch waits for the next one. When the
queue is full, `submit` refuses at once (HTTP 429): the server never holds
more than ``max_queue`` requests.

This is windowed, not continuous, batching: a generation runs to its end
before the next starts, so a request arriving mid-generation waits for it;
the window trades up to ``window_s`` of latency for larger batches.

Streaming: a request enqueued with a ``listener`` makes its batch run in
chunks (``run(rows, progress)`` with a ``progress`` callback); each chunk's
slice of that request's rows is handed to the listener on the event loop as
``(start, tokens [rows, k], done [rows])`` while the generation goes on. The
other requests of the batch still get their outputs at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from gemma_surgery.serve.protocol import RequestError

__all__ = ["Batcher"]


class Batcher:
  """Collects rows of concurrent requests into batches for ``run``.

  Args:
    run: ``run(rows, progress) -> outputs`` (blocking; called in one worker
      thread); ``progress`` is None, or a callable to call with every
      decoded chunk (a `StreamChunk`) when some request streams.
    max_batch: Most rows per call.
    window_s: How long to wait for more requests after the first.
    max_queue: Most requests waiting; more are refused with 429.
  """

  def __init__(
    self,
    run: Callable[[Sequence[Any]], list[Any]],
    *,
    max_batch: int = 32,
    window_s: float = 0.01,
    max_queue: int = 256,
  ):
    self._run, self.max_batch, self.window_s = run, max_batch, window_s
    self.max_queue = max_queue
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._carry: list = []
    self._pool = concurrent.futures.ThreadPoolExecutor(1, "gemma-surgery-serve")
    self.batches: list[int] = []  # rows per generation, for tests and stats
    self.completed = 0  # generations finished

  async def start(self) -> None:
    self._queue = asyncio.Queue(self.max_queue)
    self._task = asyncio.create_task(self._loop())

  async def stop(self) -> None:
    """Stops batching and waits for a generation in progress to finish."""
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
    await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

  async def submit(self, rows: Sequence[Any]) -> list[Any]:
    """The outputs of ``rows`` (one request), generated in some batch.

    Raises:
      RequestError: See `enqueue`.
    """
    return await self.enqueue(rows)

  def enqueue(
    self, rows: Sequence[Any], listener: Callable[[tuple], None] | None = None
  ) -> asyncio.Future:
    """Queues ``rows`` (one request): a future of their outputs.

    Args:
      rows: The request's rows.
      listener: Streaming: called on the event loop with ``(start, tokens,
        done)`` of these rows for every chunk as it is decoded.

    Raises:
      RequestError: 429 when the queue is full; 400 for more rows than a
        batch holds.
    """
    if len(rows) > self.max_batch:
      raise RequestError(f"A request may use at most {self.max_batch} rows.")
    future = asyncio.get_running_loop().create_future()
    try:
      self._queue.put_nowait((list(rows), future, listener))
    except asyncio.QueueFull:
      raise RequestError(
        f"The server is busy: {self.max_queue} requests are waiting. Retry later.",
        status=429,
      ) from None
    return future

  async def _collect(self) -> list:
    items = self._carry or [await self._queue.get()]
    self._carry = []
    size = sum(len(item[0]) for item in items)
    deadline = asyncio.get_running_loop().time() + self.window_s
    while size < self.max_batch:
      left = deadline - asyncio.get_running_loop().time()
      try:
        item = (
          self._queue.get_nowait()
          if left <= 0
          else await asyncio.wait_for(self._queue.get(), left)
        )
      except (TimeoutError, asyncio.QueueEmpty):
        break
      if size + len(item[0]) > self.max_batch:
        self._carry = [item]
        break
      items.append(item)
      size += len(item[0])
    return items

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = await self._collect()
      groups: dict[Any, list] = {}
      for item in items:
        groups.setdefault(item[0][0].sampling, []).append(item)
      for group in groups.values():
        rows = [row for item in group for row in item[0]]
        self.batches.append(len(rows))
        try:
          outputs = await loop.run_in_executor(
            self._pool, self._run, rows, self._progress(loop, group)
          )
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
          for _, future, _ in group:
            if not future.done():
              future.set_exception(e)
          continue
        start = 0
        for rows_, future, _ in group:
          if not future.done():
            future.set_result(outputs[start : start + len(rows_)])
          start += len(rows_)
        self.completed += 1

  @staticmethod
  def _progress(loop: asyncio.AbstractEventLoop, group: list) -> Any:
    """The ``progress`` callback of a batch (None: nobody streams)."""
    listeners, start = [], 0
    for rows, _, listener in group:
      if listener is not None:
        listeners.append((start, len(rows), listener))
      start += len(rows)
    if not listeners:
      return None

    def progress(chunk: Any) -> None:  # in the worker thread
      for first, n, listener in listeners:
        piece = (
          chunk.start,
          chunk.tokens[first : first + n],
          chunk.done[first : first + n],
        )
        loop.call_soon_threadsafe(listener, piece)

    return progress
