"""Time to load the embedded model, its tokenizer and its SAE (offline).

Measures, in one process: the first ``gs.load("tiny")`` (safetensors read,
parameter binding, tokenizer), later loads (median of 5), the first
``gs.sae.load_sae("tiny")`` and the first jitted forward of an 8×64 batch
(trace + compile + run).

Run: ``python bench/load_tiny.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import record
from penzai import pz

import gemma_surgery as gs


def seconds(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  record.add_arguments(parser)
  rec = record.Recorder.from_args("load_tiny", parser.parse_args())
  first, lm = seconds(lambda: gs.load("tiny", progress=False))
  later = statistics.median(
    seconds(lambda: gs.load("tiny", progress=False))[0] for _ in range(5)
  )
  sae_first, _ = seconds(lambda: gs.sae.load_sae("tiny"))
  tokens = np.random.default_rng(0).integers(262, 2048, (8, 64)).astype(np.int32)
  forward = gs.jit_forward(lm.model)
  named = pz.nx.wrap(tokens).tag("batch", "seq")
  compile_s, _ = seconds(lambda: forward(named).data_array.block_until_ready())
  print(f'gs.load("tiny")            first {first:6.3f} s   later {later:6.3f} s')
  print(f'gs.sae.load_sae("tiny")    first {sae_first:6.3f} s')
  print(f"first jitted forward 8x64  {compile_s:6.3f} s (trace + compile + run)")
  rec.figure("load_first", '`gs.load("tiny")`, first', first, "s")
  rec.figure("load_later", '`gs.load("tiny")`, later (median of 5)', later, "s")
  rec.figure("sae_first", '`gs.sae.load_sae("tiny")`, first', sae_first, "s")
  rec.figure(
    "forward_first", "first jitted forward 8×64 (trace + compile + run)", compile_s, "s"
  )
  rec.save()


if __name__ == "__main__":
  main()
