"""Steering server throughput and steering overhead, on the embedded model.

Starts ``gemma-surgery serve --model tiny --sae tiny`` as a process on
loopback, warms every batch shape up, then measures in one run:

* sequential: ``--requests`` completions one after another (one client,
  one kept-alive connection);
* concurrent: the same number of requests from 1, 8 and 32 concurrent
  clients (each request steered by SAE feature 212 at its own strength), as
  requests per second and the ratio to sequential; the server batches
  requests arriving within its window into one fused generation;
* steering overhead: median latency of single steered vs unsteered requests,
  interleaved (``--latency-runs`` each).

Every request asks for ``--tokens`` greedy tokens of an 8-token prompt.
The load average before and after is printed and recorded: the server and
its clients share this machine's CPUs, so only the ratios measured side by
side in one run mean much.

Run: ``python bench/serve.py`` (``--requests N --tokens T --latency-runs R``,
``--json F`` for run_all).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import record

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "The cat sat on the mat and"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(port: int, log) -> subprocess.Popen:
  """The server process, once it answers /health (its output goes to ``log``)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "gemma_surgery", "serve", "--model", "tiny"]
  args += ["--sae", "tiny", "--port", str(port), "--window-ms", "10"]
  proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return proc
    except httpx.TransportError:
      time.sleep(0.5)
    if proc.poll() is not None:
      break
  proc.kill()
  proc.wait()
  log.seek(0)
  tail = log.read().decode(errors="replace")[-3000:]
  raise SystemExit(f"server did not start:\n{tail}")


def body(tokens: int, strength: float | None) -> dict:
  out = {"prompt": PROMPT, "max_tokens": tokens}
  if strength is not None:
    feature = {"source": "2-res", "index": 212, "strength": strength}
    out["steering"] = {"features": [feature]}
  return out


async def burst(url: str, n: int, clients: int, tokens: int) -> float:
  """Seconds for ``n`` steered requests from ``clients`` concurrent clients."""
  queue = list(range(n))

  async def client(http):
    while queue:
      i = queue.pop()
      r = await http.post(f"{url}/v1/completions", json=body(tokens, 2.0 * i - n))
      assert r.status_code == 200, r.text

  async with httpx.AsyncClient(timeout=600) as http:
    start = time.perf_counter()
    await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - start


def one(http: httpx.Client, url: str, tokens: int, strength: float | None) -> float:
  """Seconds for one request (on ``http``'s kept-alive connection, like the
  concurrent clients', so connection setup is in neither figure)."""
  start = time.perf_counter()
  r = http.post(f"{url}/v1/completions", json=body(tokens, strength))
  assert r.status_code == 200, r.text
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=32)
  parser.add_argument("--latency-runs", type=int, default=20)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("serve", args)
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryFile() as log:
    proc = start_server(port, log)
    http = httpx.Client(timeout=600)
    try:
      for clients in (1, 2, 4, 8, 16, 32, 32):  # compile every batch bucket
        asyncio.run(burst(url, clients, clients, args.tokens))
      one(http, url, args.tokens, None)
      load_before = os.getloadavg()[0]
      n = args.requests
      start = time.perf_counter()
      for i in range(n):
        one(http, url, args.tokens, 2.0 * i - n)
      sequential = n / (time.perf_counter() - start)
      rates = {}
      for clients in (1, 8, 32):
        rates[clients] = n / asyncio.run(burst(url, n, clients, args.tokens))
      steered, plain = [], []
      for _ in range(args.latency_runs):  # interleaved
        steered.append(one(http, url, args.tokens, 8.0))
        plain.append(one(http, url, args.tokens, None))
      load_after = os.getloadavg()[0]
    finally:
      http.close()
      proc.send_signal(signal.SIGTERM)
      proc.wait(30)
  print(f"load average before {load_before:.2f}, after {load_after:.2f}")
  print(f"{n} requests x {args.tokens} tokens")
  print(f"sequential: {sequential:.2f} req/s")
  rec.context.update(
    requests=n,
    tokens=args.tokens,
    latency_runs=args.latency_runs,
    load_before=round(load_before, 2),
    load_after=round(load_after, 2),
  )
  rec.figure(
    "sequential_rps",
    f"sequential: {n} steered requests x {args.tokens} tokens, one at a time",
    sequential,
    "req/s",
  )
  for clients, rate in rates.items():
    ratio = rate / sequential
    print(
      f"{clients:2d} concurrent clients: {rate:.2f} req/s ({ratio:.1f}x sequential)"
    )
    rec.figure(f"clients{clients}_rps", f"{clients} concurrent clients", rate, "req/s")
    rec.figure(
      f"clients{clients}_ratio",
      f"{clients} concurrent clients / sequential",
      ratio,
      "x",
    )
  s, p = statistics.median(steered), statistics.median(plain)
  overhead = 100 * (s / p - 1)
  print(f"latency steered {s * 1e3:.0f} ms, unsteered {p * 1e3:.0f} ms:")
  print(f"steering overhead {overhead:+.1f} %")
  rec.figure("steered_ms", "latency of one steered request (median)", s * 1e3, "ms")
  rec.figure("plain_ms", "latency of one unsteered request (median)", p * 1e3, "ms")
  rec.figure(
    "steering_overhead",
    "steering latency overhead, steered / unsteered - 1",
    overhead,
    "%",
    goal="<= 5%",
  )
  rec.save()


if __name__ == "__main__":
  main()
