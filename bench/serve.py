"""Steering server throughput and steering overhead, on the embedded model.

Starts ``gemma-surgery serve --model tiny --sae tiny`` as a process on
loopback, warms every batch shape up, then measures in one run:

* sequential: ``--requests`` completions one after another (one client);
* concurrent: the same number of requests from 1, 8 and 32 concurrent
  clients (each request steered by SAE feature 212 at its own strength), as
  requests per second and the ratio to sequential; the server batches
  requests arriving within its window into one fused generation;
* steering overhead: median latency of single steered vs unsteered requests,
  interleaved (``--latency-runs`` each).

Every request asks for ``--tokens`` greedy tokens of an 8-token prompt.

Run: ``python bench/serve.py`` (``--requests N --tokens T``).
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "The cat sat on the mat and"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(port: int, log) -> subprocess.Popen:
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
  proc.kill()
  raise SystemExit("server did not start")


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


def one(url: str, tokens: int, strength: float | None) -> float:
  start = time.perf_counter()
  r = httpx.post(f"{url}/v1/completions", json=body(tokens, strength), timeout=600)
  assert r.status_code == 200, r.text
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=32)
  parser.add_argument("--latency-runs", type=int, default=20)
  args = parser.parse_args()
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryFile() as log:
    proc = start_server(port, log)
    try:
      for clients in (1, 2, 4, 8, 16, 32, 32):  # compile every batch bucket
        asyncio.run(burst(url, clients, clients, args.tokens))
      load_before = os.getloadavg()[0]
      n = args.requests
      start = time.perf_counter()
      for i in range(n):
        one(url, args.tokens, 2.0 * i - n)
      sequential = time.perf_counter() - start
      rates = {}
      for clients in (1, 8, 32):
        rates[clients] = n / asyncio.run(burst(url, n, clients, args.tokens))
      steered, plain = [], []
      for _ in range(args.latency_runs):  # interleaved
        steered.append(one(url, args.tokens, 8.0))
        plain.append(one(url, args.tokens, None))
      load_after = os.getloadavg()[0]
    finally:
      proc.send_signal(signal.SIGTERM)
      proc.wait(30)
  print(f"load average before {load_before:.2f}, after {load_after:.2f}")
  print(f"{n} requests x {args.tokens} tokens")
  print(f"sequential: {n / sequential:.2f} req/s")
  for clients, rate in rates.items():
    ratio = rate / (n / sequential)
    print(
      f"{clients:2d} concurrent clients: {rate:.2f} req/s ({ratio:.1f}x sequential)"
    )
  s, p = statistics.median(steered), statistics.median(plain)
  print(f"latency steered {s * 1e3:.0f} ms, unsteered {p * 1e3:.0f} ms:")
  print(f"steering overhead {100 * (s / p - 1):+.1f} %")


if __name__ == "__main__":
  main()
