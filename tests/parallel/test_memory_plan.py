"""`gs.memory.plan` (and scripts/memory_plan.py) against measured placements.

The plan computes bytes per device from named shapes and the sharding rules;
here the fixture models are really loaded onto 8 fake devices and really
prepared for generation, and the bytes of their shards are summed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.paths import HF_FIXTURES, HF_VARIANTS, ROOT
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding
from gemma_surgery.parallel import memory, sharding


@pytest.mark.parametrize("variant", HF_VARIANTS)
@pytest.mark.parametrize("shape", [{"data": 2, "model": 4}, {"data": 1, "model": 8}])
def test_plan_equals_measured_bytes_per_device(variant, shape):
  mesh = sharding.make_mesh(shape)
  lm = gs.load(HF_FIXTURES / variant, dtype="float32", mesh=mesh, progress=False)
  batch, cache_len = 4, 24
  got = memory.plan(lm.config, shape, batch=batch, cache_len=cache_len)

  values = [p.value for p in pz.unbind_params(lm.model)[1]]
  measured = sharding.bytes_per_device(values)
  assert len(measured) == 8
  assert set(measured.values()) == {got.parameters}
  assert got.total_parameters == sum(v.data_array.nbytes for v in values)

  prepared, _ = decoding.prepare(lm.model, batch, cache_len, mesh, None)
  caches = [
    leaf
    for i, var in enumerate(prepared.variables)
    if str(var.label).startswith("gemma_surgery.generate/cache_")
    and not str(var.label).endswith("end_index")
    for leaf in prepared.variable_leaves(i)
  ]
  assert len(caches) == 2 * lm.config.num_layers
  assert set(sharding.bytes_per_device(caches).values()) == {got.kv_cache}
  assert got.total_kv_cache == sum(c.nbytes for c in caches)


def test_27b_numbers_and_the_script():
  """Gemma 2 27B in bf16 on 16 devices: ~1/16 of its parameters per device
  (the config's own count), and a KV cache of 2 × layers × batch × length ×
  kv heads × head_dim × 2 bytes / 16 (published sizes: 46 layers, 16 kv
  heads of 128); the script prints the same numbers."""
  cfg = gs.preset("gemma2_27b").replace(
    parameter_dtype="bfloat16", activation_dtype="bfloat16"
  )
  got = memory.plan(cfg, {"data": 1, "model": 16}, batch=8, cache_len=8192)
  assert abs(got.parameters - cfg.num_parameters() * 2 / 16) < 0.01 * got.parameters
  assert got.kv_cache == 2 * 46 * 8 * 8192 * 16 * 128 * 2 // 16
  script = ROOT / "scripts" / "memory_plan.py"
  out = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  ).stdout
  row = (
    f"| gemma2_27b | 16 | data=1 × model=16 | {got.parameters / 2**30:.2f} GiB"
    f" | {got.kv_cache / 2**30:.2f} GiB |"
  )
  assert row in out
  # the README's memory table is exactly what the script prints
  readme = (ROOT / "README.md").read_text()
  table = [line for line in out.splitlines() if line.startswith("|")]
  assert len(table) > 4 and all(line in readme for line in table), (
    "README's memory table differs from `python scripts/memory_plan.py`"
  )
  assert "| gemma3_27b | 8 | data=1 × model=8 |" in out
