"""One process of the multi-process test (launched by tests/test_distributed.py).

Runs the same script on 1 process with 8 CPU devices (the reference) or on
each of 2 processes with 4 devices (one global mesh of 8): load a tiny
checkpoint onto a ``data=2 × model=4`` mesh through the real loaders, steer,
capture, splice an SAE with edits, run a forward pass and fused generation
(greedy and sampled), and gather the results with `gs.distributed.gather`.
Each process writes what it got, its measured per-device parameter bytes and
the bytes it read from the checkpoint to ``OUT/proc<i>.npz``.

The single-process reference also runs the same surgery unsharded (``ref_*``
keys). Nothing is compared here: the test does that.
"""

from __future__ import annotations

import argparse
import json
import pathlib

SEQ, BATCH = 12, 4


def _counting_reads(hf, totals: dict) -> None:
  """Wraps every safetensors `LazyArray` so its reads are counted (bytes)."""
  original = hf._lazy

  def lazy(name, tensor, path, config):
    array = original(name, tensor, path, config)

    def read(index):
      out = array.read(index)
      totals[name] = totals.get(name, 0) + out.nbytes
      totals.setdefault("_largest", {})[name] = max(
        totals.get("_largest", {}).get(name, 0), out.nbytes
      )
      return out

    return type(array)(array.shape, array.dtype, read)

  hf._lazy = lazy


def _surgery(gs, model, enc, vector):
  """Steering, captures and an SAE splice with edits: the patched model."""
  from penzai import pz

  steered = gs.steer(model, "resid_post", 1, pz.nx.wrap(vector).tag("embedding"), 1.0)
  captured, acts = gs.capture(steered, ["resid_post", "mlp.hidden"], [1, 3])
  edits = gs.sae.feature_edits(enc, clamp={5: 3.0}, scale={7: 2.0})
  spliced, feats = gs.sae.splice_sae(
    captured, enc, use_error_term=True, capture_features=True, edits=edits
  )
  return spliced, acts, feats


def _run(gs, model, enc, vector, tokens, prompts, mesh):
  """Forward + generation results (gathered to numpy on every process)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from penzai import pz

  patched, acts, feats = _surgery(gs, model, enc, vector)
  ids = tokens
  if mesh is not None:
    ids = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("data")))
  logits = gs.jit_forward(patched)(pz.nx.wrap(ids).tag("batch", "seq"))
  out = {
    "logits": logits.unwrap("batch", "seq", "vocabulary"),
    "resid_post_1": acts["resid_post", 1].unwrap("batch", "seq", "embedding"),
    "mlp_hidden_3": acts["mlp.hidden", 3].unwrap("batch", "seq", "neurons"),
    "features": feats.value().unwrap("batch", "seq", "latents"),
  }
  greedy = gs.generate(patched, prompts, max_new_tokens=5, mesh=mesh)
  sampled = gs.generate(
    patched, prompts, max_new_tokens=5, temperature=0.8, top_k=20, seed=3, mesh=mesh
  )
  out.update(
    tokens=greedy.tokens,
    sampled=sampled.tokens,
    gen_resid_post_1=greedy.captures["resid_post", 1].unwrap(
      "batch", "seq", "embedding"
    ),
    gen_mlp_hidden_3=greedy.captures["mlp.hidden", 3].unwrap("batch", "seq", "neurons"),
    gen_features=greedy.captures["sae.features", 2].unwrap("batch", "seq", "latents"),
  )
  return gs.distributed.gather(out)


def _memory(gs, model) -> dict:
  """Measured parameter bytes per local device, split sharded/replicated."""
  from penzai import pz

  sharded, replicated, total_sharded = [], [], 0
  for p in pz.unbind_params(model)[1]:
    data = p.value.data_array
    if "model" in tuple(data.sharding.spec):
      sharded.append(data)
      total_sharded += data.size * data.dtype.itemsize
    else:
      replicated.append(data)
  per_device = gs.sharding.bytes_per_device(sharded)
  return {
    "sharded_per_device": sorted(per_device.values()),
    "sharded_total": total_sharded,
    "replicated_per_device": sorted(gs.sharding.bytes_per_device(replicated).values()),
    "replicated_total": sum(d.size * d.dtype.itemsize for d in replicated),
  }


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--hf", required=True)
  parser.add_argument("--kaggle", required=True)
  parser.add_argument("--sae", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  import gemma_surgery as gs

  info = gs.distributed.initialize(
    args.coordinator, args.num_processes, args.process_id, timeout_s=60
  )
  import jax
  import numpy as np

  from gemma_surgery.loading import hf

  reads: dict = {}
  _counting_reads(hf, reads)
  mesh = gs.distributed.make_mesh("data=2,model=4")
  lm = gs.load(args.hf, dtype="float32", mesh=mesh, progress=False)
  read_2x4 = {k: v for k, v in reads.items() if k != "_largest"}
  largest_2x4 = dict(reads["_largest"])
  memory = _memory(gs, lm.model)

  # Model axis across the processes: each reads only its half.
  reads.clear()
  wide = gs.distributed.make_mesh("data=1,model=8")
  lm_wide = gs.load(args.hf, dtype="float32", mesh=wide, progress=False)
  read_1x8 = {k: v for k, v in reads.items() if k != "_largest"}
  sharded_1x8 = sorted(
    p.label.removeprefix("transformer/")
    for p in __import__("penzai").pz.unbind_params(lm_wide.model)[1]
    if "model" in tuple(p.value.data_array.sharding.spec)
  )
  del lm_wide

  kaggle = gs.load(
    args.kaggle, dtype="float32", config=lm.config, mesh=mesh, progress=False
  )
  from penzai import pz

  hf_params = {p.label: p.value.data_array for p in pz.unbind_params(lm.model)[1]}
  kaggle_params = {
    p.label: p.value.data_array for p in pz.unbind_params(kaggle.model)[1]
  }
  kaggle_diff = max(
    float(np.max(np.abs(gs.distributed.to_numpy(kaggle_params[k]) - a)))
    for k, a in gs.distributed.gather(hf_params).items()
  )

  enc = gs.sae.load_sae(args.sae, mesh=mesh)  # per-device slice reads
  rng = np.random.default_rng(0)
  vector = rng.normal(size=lm.config.embedding_dim).astype(np.float32)
  tokens = rng.integers(3, lm.config.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
  prompts = [[2, *map(int, row[: 4 + 2 * i])] for i, row in enumerate(tokens)]
  results = _run(gs, lm.model, enc, vector, tokens, prompts, mesh)

  if info.process_count == 1:
    plain = gs.load(args.hf, dtype="float32", progress=False)
    enc_plain = gs.sae.load_sae(args.sae)
    ref = _run(gs, plain.model, enc_plain, vector, tokens, prompts, None)
    results.update({f"ref_{k}": v for k, v in ref.items()})

  meta = {
    "process_index": info.process_index,
    "process_count": info.process_count,
    "local_devices": info.local_device_count,
    "devices": info.device_count,
    "memory": memory,
    "read_2x4": read_2x4,
    "largest_2x4": largest_2x4,
    "read_1x8": read_1x8,
    "sharded_1x8": sharded_1x8,
    "kaggle_diff": kaggle_diff,
    "sae_spec": str(enc.w_enc.value.data_array.sharding.spec),
    "jax_processes": jax.process_count(),
  }
  out = pathlib.Path(args.out)
  np.savez(out / f"proc{info.process_index}.npz", **results)
  (out / f"proc{info.process_index}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
  main()
