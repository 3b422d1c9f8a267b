"""Multi-process runs with real processes: 2 × 4 CPU devices == 1 × 8.

`tests/distributed_worker.py` runs the same surgery (steering, captures, an
SAE splice with edits, forward pass, greedy and sampled fused generation) on
a tiny Gemma 3 checkpoint written here, once as 2 processes joined over
loopback (JAX CPU collectives via gloo, `gs.distributed.initialize`) and
once as a single process with 8 devices. Both use one ``data=2 × model=4``
mesh. Every process runs under a timeout and is killed with its process
group if it hangs.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from helpers import kaggle_writers as writers
from helpers import sae_writers
from helpers.paths import TESTS
from helpers.processes import describe, free_port, launch, wait_all

from gemma_surgery import config as config_lib
from gemma_surgery.loading import hf_export, params

WORKER = TESTS / "helpers" / "distributed_worker.py"
TIMEOUT_S = 240


def tiny_config() -> config_lib.GemmaConfig:
  """Gemma 3, 4 layers (local/global), 8 query heads in 4 kv groups: every
  matrix splits over ``model=4``."""
  return config_lib.preset("gemma3_1b").replace(
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    embedding_dim=32,
    mlp_hidden_dim=64,
    vocab_size=128,
    attention_types=config_lib.alternating_pattern(4, 2),
    sliding_window=6,
    query_pre_attn_scalar=8,
    parameter_dtype="float32",
    activation_dtype="float32",
  )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
  """The same random weights as an HF checkpoint and a Kaggle (flat) one,
  and a Gemma Scope 2 resid_post SAE on layer 2."""
  root = tmp_path_factory.mktemp("ckpt")
  cfg = tiny_config()
  # Matrices with std 0.1 (not 0.5) keep activations O(1-10), where float32
  # sums in another order differ by ~1e-6, inside the 1e-5 bound.
  canonical = {
    name: value if value.ndim == 1 else (0.2 * value).astype(np.float32)
    for name, value in writers.random_params(cfg, seed=1).items()
  }
  hf_dir = hf_export.save_hf(params.bind_parameters(cfg, canonical), root / "hf")
  kaggle_dir = writers.save(writers.to_flat(cfg, canonical), root / "kaggle")
  arrays = sae_writers.random_sae(2, d_in=cfg.embedding_dim, width=64)
  sae_dir = sae_writers.write_gs2(root / "sae", "resid_post", 2, arrays, width="64")
  return {"hf": hf_dir, "kaggle": kaggle_dir, "sae": sae_dir}


def test_two_processes_match_one_and_hold_only_their_shards(checkpoints, tmp_path):
  common = [
    str(WORKER),
    "--hf",
    str(checkpoints["hf"]),
    "--kaggle",
    str(checkpoints["kaggle"]),
    "--sae",
    str(checkpoints["sae"]),
  ]
  multi, single = tmp_path / "multi", tmp_path / "single"
  multi.mkdir()
  single.mkdir()
  address = f"127.0.0.1:{free_port()}"
  logs = [tmp_path / "proc0.log", tmp_path / "proc1.log", tmp_path / "ref.log"]
  procs = [
    launch(
      [*common, "--out", str(multi), "--coordinator", address]
      + ["--num-processes", "2", "--process-id", str(i)],
      4,
      logs[i],
    )
    for i in range(2)
  ]
  procs.append(launch([*common, "--out", str(single)], 8, logs[2]))
  codes = wait_all(procs, TIMEOUT_S)
  assert codes == [0, 0, 0], f"exit codes {codes} (None: killed)\n{describe(logs)}"

  ref = dict(np.load(single / "proc0.npz"))
  ref_meta = json.loads((single / "proc0.json").read_text())
  assert ref_meta["process_count"] == 1 and ref_meta["devices"] == 8
  for i in range(2):
    got = dict(np.load(multi / f"proc{i}.npz"))
    meta = json.loads((multi / f"proc{i}.json").read_text())
    assert (meta["process_index"], meta["process_count"]) == (i, 2)
    assert (meta["local_devices"], meta["devices"]) == (4, 8)
    # Identical to the single-process run, on every process (gathered).
    for key in ("tokens", "sampled"):
      np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    for key in (
      "logits",
      "resid_post_1",
      "mlp_hidden_3",
      "features",
      "gen_resid_post_1",
      "gen_mlp_hidden_3",
      "gen_features",
    ):
      assert got[key].shape == ref[key].shape, key
      np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    # The Kaggle (orbax, sharded restore) and HF loads agree (the HF export
    # stores RMSNorm scales as (1 + w) - 1: float32 rounding at most).
    assert meta["kaggle_diff"] <= 1e-6
    assert "model" in meta["sae_spec"]
    check_memory(meta)
    check_reads(meta, ref_meta)

  # The surgery did something, and the sharded run matches the unsharded one
  # (float32 sums over 4 shards in another order: ~1e-6, bounded by 1e-4).
  assert np.abs(ref["features"]).max() > 0
  np.testing.assert_array_equal(ref["tokens"], ref["ref_tokens"])
  for key in ("logits", "gen_resid_post_1", "features"):
    np.testing.assert_allclose(ref[key], ref[f"ref_{key}"], rtol=0, atol=1e-4)


def check_memory(meta: dict) -> None:
  """Shardable parameters: each device holds total / 4 (the model axis).

  Replicated (stated): the RMSNorm scales (and QK-norm scales), which have
  no sharded axis; their bytes are on every device.
  """
  memory = meta["memory"]
  per_device = memory["sharded_per_device"]
  assert len(per_device) == 4
  expected = memory["sharded_total"] / 4
  for got in per_device:
    assert abs(got - expected) <= 0.1 * expected, (got, expected)
  assert memory["replicated_total"] < 0.05 * memory["sharded_total"]
  assert set(memory["replicated_per_device"]) == {memory["replicated_total"]}


def check_reads(meta: dict, ref_meta: dict) -> None:
  """What a process read from the safetensors file.

  On ``data=2 × model=4`` each process holds one full replica over its 4
  devices: it reads every tensor once, in 4 pieces for sharded ones. On
  ``data=1 × model=8`` each reads only its half of every sharded tensor.
  """
  read, largest = meta["read_2x4"], meta["largest_2x4"]
  assert read == ref_meta["read_2x4"]
  assert largest["layer_0/mlp/gate"] * 4 == read["layer_0/mlp/gate"]
  assert largest["embedder"] * 4 == read["embedder"]
  wide, whole = meta["read_1x8"], ref_meta["read_1x8"]
  for name in ("embedder", "layer_0/mlp/gate", "layer_2/mlp/down"):
    assert wide[name] * 2 == whole[name], name
  # 4 kv groups × 2 queries don't split over 8: attention is replicated, and
  # so are the norms; each process reads them whole.
  for name in ("layer_1/attn/q", "layer_3/attn/k", "final_norm"):
    assert wide[name] == whole[name], name
