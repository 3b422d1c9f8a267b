"""Test helpers: start Python processes that may hang, and always reap them.

Each process runs in its own process group with its output in a log file;
`wait_all` kills the whole group of any process still running at the
deadline, so a hung multi-process run fails its test instead of blocking CI.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parents[1]  # tests/: helpers importable


def free_port() -> int:
  """A TCP port that was free a moment ago on loopback."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(
  args: list[str],
  devices: int,
  log: pathlib.Path,
  extra_path: list[pathlib.Path] = (),
) -> subprocess.Popen:
  """Starts a Python process in its own process group, output to ``log``.

  ``extra_path`` entries go first on its PYTHONPATH (e.g. the repository, so
  ``python -m gemma_surgery`` imports this checkout).
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  paths = [*map(str, extra_path), str(TESTS), env.get("PYTHONPATH", "")]
  env["PYTHONPATH"] = os.pathsep.join(paths)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  with open(log, "wb") as out:
    return subprocess.Popen(
      [sys.executable, *args],
      stdout=out,
      stderr=subprocess.STDOUT,
      env=env,
      start_new_session=True,
    )


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
  """Exit codes; processes still running after ``timeout_s`` are killed (None)."""
  deadline = time.monotonic() + timeout_s
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(max(deadline - time.monotonic(), 0.1)))
    except subprocess.TimeoutExpired:
      codes.append(None)
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  return codes


def describe(logs: list[pathlib.Path]) -> str:
  return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
