"""Per-device memory of Gemma 2 27B, Gemma 3 27B, Gemma 4 26B-A4B and 31B (bf16).

Computed from our `GemmaConfig` presets and the axis-name sharding rules
(`gemma_surgery.parallel.memory.plan`, checked against measured placements in
tests/test_memory_plan.py): parameters plus the KV cache that `gs.generate`
allocates for a stated batch and cache length. Prints the Markdown table
pasted into the README ("Running on several hosts")::

  python scripts/memory_plan.py                     # batch 8, 8192 tokens
  python scripts/memory_plan.py --batch 1 --cache-len 32768
"""

from __future__ import annotations

import argparse

from gemma_surgery import config
from gemma_surgery.parallel import memory

MODELS = ("gemma2_27b", "gemma3_27b", "gemma4_26b_a4b", "gemma4_31b")
MESHES = (
  {"data": 1, "model": 8},
  {"data": 1, "model": 16},
  {"data": 2, "model": 8},
)
GIB = 2**30


def table(batch: int, cache_len: int) -> str:
  """The Markdown table (one row per model and mesh)."""
  rows = [
    f"Parameters and KV cache per device, bfloat16, batch {batch} × {cache_len}"
    " cache positions (default sharding rules; GiB = 2^30 bytes):",
    "",
    "| model | devices | mesh | parameters | KV cache | total | of which replicated |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in MODELS:
    cfg = config.preset(name).replace(
      parameter_dtype="bfloat16", activation_dtype="bfloat16"
    )
    for shape in MESHES:
      p = memory.plan(cfg, shape, batch=batch, cache_len=cache_len)
      devices = shape["data"] * shape["model"]
      mesh = " × ".join(f"{k}={v}" for k, v in shape.items())
      rows.append(
        f"| {name} | {devices} | {mesh} | {p.parameters / GIB:.2f} GiB"
        f" | {p.kv_cache / GIB:.2f} GiB | {p.per_device / GIB:.2f} GiB"
        f" | {p.replicated_parameters / 2**20:.1f} MiB |"
      )
  totals = []
  for name in MODELS:
    cfg = config.preset(name).replace(
      parameter_dtype="bfloat16", activation_dtype="bfloat16"
    )
    p = memory.plan(cfg, {"data": 1, "model": 1}, batch=batch, cache_len=cache_len)
    totals.append(
      f"{name}: {cfg.num_parameters() / 1e9:.1f} B parameters ="
      f" {p.total_parameters / GIB:.1f} GiB, KV cache {p.total_kv_cache / GIB:.1f}"
      f" GiB ({_cache_layout(cfg)})"
    )
  return "\n".join([*rows, "", "Whole model, one copy: " + "; ".join(totals) + "."])


def _cache_layout(cfg) -> str:
  """The cached layers' kv heads × head width, grouped."""
  kinds: dict[tuple[int, int], int] = {}
  for i in range(cfg.num_layers):
    if not cfg.is_kv_shared(i):
      key = (cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
      kinds[key] = kinds.get(key, 0) + 1
  return " + ".join(f"{n} layers × {k} kv heads × {h}" for (k, h), n in kinds.items())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--cache-len", type=int, default=8192)
  args = parser.parse_args()
  print(table(args.batch, args.cache_len))


if __name__ == "__main__":
  main()
