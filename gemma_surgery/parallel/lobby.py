"""A handshake on the coordinator port before JAX's distributed runtime starts.

When JAX's coordination client cannot register (no coordinator, a process
missing, counts that disagree), it terminates the whole process from C++
after its timeout with a ``DEADLINE_EXCEEDED`` log: nothing Python can catch.
`gemma_surgery.parallel.distributed.initialize` therefore first meets every process in
this small lobby on the same port, over plain TCP:

* process 0 listens; every other process connects (retrying until its
  deadline) and sends one JSON line ``{"num_processes", "process_id",
  "host"}``;
* process 0 checks that all counts agree and the ids are distinct and in
  range, then answers every process ``{"ok": true}`` (or the error) once all
  have joined; the clients close first, so no socket of process 0 lingers
  in ``TIME_WAIT`` on the port JAX binds next.

Every failure is a `DistributedError` raised within the timeout, on every
process that took part.
"""

from __future__ import annotations

import json
import socket
import time

from gemma_surgery import errors

_VERSION = 1


def _send(conn: socket.socket, message: dict) -> None:
  conn.sendall((json.dumps(message) + "\n").encode())


def _receive(conn: socket.socket, deadline: float) -> dict | None:
  """One JSON line, or None on timeout, EOF or garbage."""
  data = b""
  while not data.endswith(b"\n"):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return None
    conn.settimeout(remaining)
    try:
      chunk = conn.recv(4096)
    except OSError:
      return None
    if not chunk:
      return None
    data += chunk
  try:
    message = json.loads(data)
  except ValueError:
    return None
  return message if isinstance(message, dict) else None


def _listen(port: int) -> socket.socket:
  try:
    if socket.has_dualstack_ipv6():
      return socket.create_server(
        ("", port), family=socket.AF_INET6, dualstack_ipv6=True
      )
    return socket.create_server(("", port))
  except OSError as e:
    raise errors.DistributedError(
      f"Process 0 cannot listen on coordinator port {port}: {e}. Another"
      " program (or an earlier run still shutting down) uses it; pick another"
      " port."
    ) from e


def _answer(conn: socket.socket, problem: str | None, close: bool = True) -> None:
  try:
    _send(conn, {"ok": problem is None, "error": problem})
  except OSError:
    pass
  if close:
    conn.close()


def host(port: int, num_processes: int, timeout_s: float) -> None:
  """Process 0: waits for every other process and checks what they say.

  Raises:
    DistributedError: The port is busy, a process disagrees on the number
      of processes or has a duplicate id, or not all joined in time.
  """
  deadline = time.monotonic() + timeout_s
  joined: dict[int, tuple[socket.socket, str]] = {}
  problem = None
  with _listen(port) as listener:
    while len(joined) < num_processes - 1 and problem is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      listener.settimeout(remaining)
      try:
        conn, address = listener.accept()
      except TimeoutError:
        break
      message = _receive(conn, min(deadline, time.monotonic() + 10))
      if message is None or message.get("version") != _VERSION:
        conn.close()  # Not one of ours (e.g. a port scanner); ignore it.
        continue
      pid, count = message.get("process_id"), message.get("num_processes")
      where = f"process {pid} on {message.get('host')} ({address[0]})"
      valid_id = isinstance(pid, int) and 0 < pid < num_processes
      if count != num_processes:
        problem = (
          f"Inconsistent process counts: process 0 was started with"
          f" num_processes={num_processes} but {where} with"
          f" num_processes={count}. Start every process with the same count."
        )
      elif not valid_id or pid in joined:
        problem = (
          f"Process ids must be distinct integers 0..{num_processes - 1}:"
          f" {where} reused or gave an invalid id."
        )
      if valid_id and pid not in joined:
        joined[pid] = (conn, where)
      else:
        _answer(conn, problem)
    if problem is None and len(joined) < num_processes - 1:
      missing = sorted(set(range(1, num_processes)) - set(joined))
      problem = (
        f"Only {len(joined) + 1} of {num_processes} processes joined within"
        f" {timeout_s:g} s; missing process id(s) {missing}. Start all of"
        " them with the same coordinator address and num_processes."
      )
    for conn, _ in joined.values():
      _answer(conn, problem, close=False)
    for conn, _ in joined.values():
      _receive(conn, time.monotonic() + 5)  # Wait for the client to close.
      conn.close()
  if problem is not None:
    raise errors.DistributedError(problem)


def join(
  address: str, port: int, num_processes: int, process_id: int, timeout_s: float
) -> None:
  """Process ``process_id`` > 0: checks in with process 0.

  Raises:
    DistributedError: The coordinator is unreachable, or process 0 rejected
      the run (see `host`), or did not answer in time.
  """
  deadline = time.monotonic() + timeout_s
  last_error: Exception | None = None
  conn = None
  while conn is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise errors.DistributedError(
        f"Process {process_id} could not reach the coordinator at"
        f" {address}:{port} within {timeout_s:g} s ({last_error}). Is process"
        " 0 running, with this address and port, and reachable from here?"
      )
    try:
      conn = socket.create_connection((address, port), timeout=min(remaining, 2.0))
    except OSError as e:
      last_error = e
      time.sleep(min(0.2, max(remaining, 0)))
  with conn:
    try:
      _send(
        conn,
        {
          "version": _VERSION,
          "num_processes": num_processes,
          "process_id": process_id,
          "host": socket.gethostname(),
        },
      )
    except OSError as e:
      raise errors.DistributedError(
        f"Process {process_id} lost the coordinator at {address}:{port}: {e}."
      ) from e
    reply = _receive(conn, deadline + 5)
  if reply is None:
    raise errors.DistributedError(
      f"Process {process_id} reached the coordinator at {address}:{port} but"
      f" got no answer within {timeout_s:g} s: not all {num_processes}"
      " processes joined, or process 0 stopped."
    )
  if not reply.get("ok"):
    raise errors.DistributedError(str(reply.get("error")))
