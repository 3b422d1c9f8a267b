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
before the next starts (the fused loop is one compiled call), so a request
arriving mid-generation waits for it; the window trades up to ``window_s`` of
latency for larger batches.
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
    run: ``run(rows) -> outputs`` (blocking; called in one worker thread).
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
      RequestError: 429 when the queue is full; 400 for more rows than a
        batch holds.
    """
    if len(rows) > self.max_batch:
      raise RequestError(f"A request may use at most {self.max_batch} rows.")
    future = asyncio.get_running_loop().create_future()
    try:
      self._queue.put_nowait((list(rows), future))
    except asyncio.QueueFull:
      raise RequestError(
        f"The server is busy: {self.max_queue} requests are waiting. Retry later.",
        status=429,
      ) from None
    return await future

  async def _collect(self) -> list:
    items = self._carry or [await self._queue.get()]
    self._carry = []
    size = sum(len(rows) for rows, _ in items)
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
        rows = [row for rows, _ in group for row in rows]
        self.batches.append(len(rows))
        try:
          outputs = await loop.run_in_executor(self._pool, self._run, rows)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
          for _, future in group:
            if not future.done():
              future.set_exception(e)
          continue
        start = 0
        for rows_, future in group:
          if not future.done():
            future.set_result(outputs[start : start + len(rows_)])
          start += len(rows_)
