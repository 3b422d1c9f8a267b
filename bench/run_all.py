"""Runs every benchmark and writes BENCHMARKS.md's result tables from them.

    python bench/run_all.py                 # all benchmarks, then BENCHMARKS.md
    python bench/run_all.py --only generation sae --no-write
    python bench/run_all.py --quick         # fewer repeats: a smoke test only

Each benchmark runs in its own process (``python bench/NAME.py --json F``);
its figures are measured side by side inside that process (interleaved
repeats, see each script). For each benchmark this records the 1-minute load
average before it starts and every second while it runs, and the CPU time
that *other* processes used meanwhile (``/proc/stat`` busy time minus the
benchmark's own process tree), in cores.

Load rule: a benchmark is marked "measured under load" when other processes
used more than 0.1 × (CPU count) cores on average while it ran, or (where
``/proc/stat`` is missing) when the load average before it exceeded 0.5 per
core. The benchmark's own load is not counted against it, so back-to-back
benchmarks don't mark each other. ``--wait-quiet S`` waits up to S seconds
before each benchmark for the load average to fall below 0.5 per core.

Results go to ``bench/results/latest.json`` (``--results``); the tables in
BENCHMARKS.md between ``<!-- bench:begin NAME -->`` markers are rewritten from
them by `report.update_markdown` (``--no-write`` to skip; ``--from-results F``
rewrites from an earlier results file without running anything). ``--only``
replaces just those benchmarks' records in the results file and keeps the
others; every record carries the date it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

import jax
import penzai
import psutil
import report
from record import write_json, write_text

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OTHER_CPU_LIMIT = 0.1  # of the CPU count
LOAD_LIMIT = 0.5  # per core
LOAD_RULE = (
  f"a benchmark is marked as measured under load when other processes used"
  f" more than {OTHER_CPU_LIMIT} × CPU count cores on average while it ran"
  f" (from /proc/stat, the benchmark's own process tree excluded), or, without"
  f" /proc/stat, when the 1-minute load average before it exceeded {LOAD_LIMIT}"
  f" per core."
)

# name -> (script arguments, quick arguments)
BENCHMARKS = {
  "generation": (["generation.py"], ["generation.py", "--runs", "2", "--quick"]),
  "sae": (["sae.py", "--runs", "7"], ["sae.py", "--runs", "2"]),
  "patching": (["patching.py"], ["patching.py", "--runs", "1"]),
  "forward_capture": (["forward_capture.py"], ["forward_capture.py", "--runs", "5"]),
  "sweep": (["sweep.py"], ["sweep.py", "--runs", "2"]),
  # Starts the server as a child process (its CPU counts as the benchmark's).
  "serve": (
    ["serve.py"],
    ["serve.py", "--requests", "32", "--tokens", "8", "--latency-runs", "5"],
  ),
  "attribution": (["attribution.py"], ["attribution.py", "--runs", "1"]),
  "gemma4_generation": (
    ["gemma4_generation.py"],
    ["gemma4_generation.py", "--rounds", "1"],
  ),
  "decode_step": (
    ["decode_step.py"],
    ["decode_step.py", "--runs", "2", "--batch", "1"],
  ),
  "circuits": (["circuits.py"], ["circuits.py", "--no-uncapped"]),
  "trace_time": (["trace_time.py"], ["trace_time.py", "--runs", "1"]),
  "load_and_compile": (["load_and_compile.py"], ["load_and_compile.py"]),
  "load_tiny": (["load_tiny.py"], ["load_tiny.py"]),
  # Fresh processes with a cold, then a warm, compilation cache; the tour too.
  "first_minute": (["first_minute.py"], ["first_minute.py", "--no-tour"]),
  # Needs CIRCUIT_TRACER_PYTHON (a circuit-tracer venv); otherwise records "not run".
  "circuit_tracer": (["circuit_tracer_parity.py"], ["circuit_tracer_parity.py"]),
}


def _busy_jiffies() -> int | None:
  try:
    fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
  except OSError:
    return None
  values = [int(x) for x in fields]
  idle = values[3] + (values[4] if len(values) > 4 else 0)
  return sum(values[:8]) - idle


def _tree_cpu(process: psutil.Process) -> float:
  """CPU seconds of a process and its live children."""
  total = 0.0
  for p in [process, *process.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
      continue
  return total


class Monitor:
  """Samples load and other processes' CPU use while a process runs."""

  def __init__(self, pid: int):
    self.process = psutil.Process(pid)
    self.load: list[float] = []
    self.own = 0.0
    self._stop = threading.Event()
    self._start_busy = _busy_jiffies()
    self._start = time.perf_counter()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(1.0):
      self.load.append(round(os.getloadavg()[0], 2))
      try:
        self.own = max(self.own, _tree_cpu(self.process))
      except psutil.Error:
        pass

  def finish(self, own_cpu: float | None) -> dict:
    """Stops sampling; ``own_cpu``: the benchmark's CPU seconds if known."""
    self._stop.set()
    self._thread.join()
    wall = time.perf_counter() - self._start
    end_busy = _busy_jiffies()
    other = None
    own = max(self.own, own_cpu or 0.0)
    if self._start_busy is not None and end_busy is not None:
      busy = (end_busy - self._start_busy) / os.sysconf("SC_CLK_TCK")
      other = max(0.0, (busy - own) / wall)
    return {"load_during": self.load, "other_cpu": other, "seconds": wall}


def wait_quiet(limit_s: float) -> None:
  cores = os.cpu_count() or 1
  end = time.monotonic() + limit_s
  while os.getloadavg()[0] > LOAD_LIMIT * cores and time.monotonic() < end:
    time.sleep(5)


def run_one(name: str, argv: list[str]) -> dict:
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / f"{name}.json"
    command = [sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(out)]
    load_before = os.getloadavg()[0]
    print(f"== {name}: {' '.join(['python', 'bench/' + argv[0], *argv[1:]])}")
    print(f"   load average before {load_before:.2f}", flush=True)
    before = resource_children()
    proc = subprocess.Popen(command, cwd=HERE)
    monitor = Monitor(proc.pid)
    code = proc.wait()
    own = resource_children() - before
    record = monitor.finish(own)
    record.update(
      command=" ".join(["python", "bench/" + argv[0], *argv[1:]]),
      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      load_before=round(load_before, 2),
    )
    if record["other_cpu"] is None:
      record["loaded"] = load_before > LOAD_LIMIT * cores
    else:
      record["other_cpu"] = round(record["other_cpu"], 2)
      record["loaded"] = record["other_cpu"] > OTHER_CPU_LIMIT * cores
    if code != 0 or not out.exists():
      record.update(error=f"exit status {code}", figures=[])
    else:
      payload = json.loads(out.read_text())
      record.update(figures=payload["figures"], context=payload.get("context", {}))
  print(
    f"   {record['seconds']:.0f} s; other processes {record['other_cpu']} cores;"
    f" {'LOADED' if record['loaded'] else 'quiet'}",
    flush=True,
  )
  return record


def resource_children() -> float:
  """CPU seconds of this process's waited-for children so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def meta(command: str) -> dict:
  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": command,
    "jax": jax.__version__,
    "penzai": penzai.__version__,
    "python": platform.python_version(),
    "cpus": os.cpu_count(),
    "platform": f"{platform.system()} {platform.machine()}, {jax.default_backend()}",
    "load_rule": LOAD_RULE,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
  parser.add_argument(
    "--results", type=pathlib.Path, default=HERE / "results" / "latest.json"
  )
  parser.add_argument("--markdown", type=pathlib.Path, default=ROOT / "BENCHMARKS.md")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument("--from-results", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.from_results is not None:
    results = json.loads(args.from_results.read_text())
  else:
    command = "python bench/run_all.py" + "".join(
      f" {a}" for a in sys.argv[1:] if a != "--no-write"
    )
    results = {"meta": meta(command), "benchmarks": {}}
    if args.only and args.results.exists():
      # Keep the other benchmarks' records (each carries its own date).
      results["benchmarks"] = json.loads(args.results.read_text())["benchmarks"]
    for name in args.only or BENCHMARKS:
      if args.wait_quiet:
        wait_quiet(args.wait_quiet)
      argv = BENCHMARKS[name][1 if args.quick else 0]
      results["benchmarks"][name] = run_one(name, argv)
      write_json(args.results, results)  # keep what finished
    print(f"results: {args.results}")
  if not args.no_write:
    text = args.markdown.read_text()
    write_text(args.markdown, report.update_markdown(text, results))
    print(f"updated {args.markdown}")


if __name__ == "__main__":
  main()
