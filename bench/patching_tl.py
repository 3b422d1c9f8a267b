"""The same activation-patching sweep as ``patching.py``, with TransformerLens.

Stock TransformerLens (``transformer_lens.patching.get_act_patch_resid_pre``:
one hooked PyTorch forward per layer × position) on a ``HookedTransformer``
with the mid-size Gemma 2 architecture of `configs.MID` (8 layers, d_model
512, 8 query / 4 KV heads of 64, gated GELU MLP 2048, RMSNorm before and
after each sublayer, rotary embeddings, soft caps 50/30, vocab 32 000;
random weights, float32, CPU), and our batched `patching_sweep` on the same
architecture, timed side by side in one run (first call and median of later
calls). TransformerLens is not a dependency of gemma_surgery; install it in
a separate environment with ours (``pip install transformer-lens``).

Run: ``python bench/patching_tl.py`` (``--runs N``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch
from configs import MID
from patching import CORRECT, LAYERS, POSITIONS, WRONG, prompts, resid_pre_sweep
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

import gemma_surgery as gs


def tl_model() -> HookedTransformer:
  cfg = HookedTransformerConfig(
    n_layers=MID.num_layers,
    d_model=MID.embedding_dim,
    n_heads=MID.num_heads,
    n_key_value_heads=MID.num_kv_heads,
    d_head=MID.head_dim,
    d_mlp=MID.mlp_hidden_dim,
    d_vocab=MID.vocab_size,
    n_ctx=1024,
    act_fn="gelu_pytorch_tanh",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=MID.head_dim,
    gated_mlp=True,
    use_normalization_before_and_after=True,
    attn_scores_soft_cap=MID.attn_logits_soft_cap,
    output_logits_soft_cap=MID.final_logit_softcap,
    window_size=MID.sliding_window,
    attn_types=["local", "global"] * (MID.num_layers // 2),
    dtype=torch.float32,
    device="cpu",
    seed=0,
  )
  return HookedTransformer(cfg).eval()


def timed(fn, runs: int) -> tuple[float, float, object]:
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=2)
  args = parser.parse_args()
  clean, corrupted = prompts()

  tl = tl_model()
  clean_t = torch.as_tensor(clean, dtype=torch.long)
  corrupted_t = torch.as_tensor(corrupted, dtype=torch.long)

  def tl_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, CORRECT] - logits[0, -1, WRONG]

  def tl_sweep():
    with torch.no_grad():
      _, cache = tl.run_with_cache(clean_t)
      return tl_patching.get_act_patch_resid_pre(tl, corrupted_t, cache, tl_metric)

  model = gs.build_model(MID, jax.random.key(0))

  def ours():
    return resid_pre_sweep(model, clean, corrupted, LAYERS * POSITIONS)

  results = {}
  for name, fn in (("gemma_surgery batched", ours), ("TransformerLens", tl_sweep)):
    first, steady, out = timed(fn, args.runs)
    results[name] = (first, steady)
    print(f"{name:<22} first call {first:7.2f} s   steady {steady:7.2f} s", flush=True)
    assert np.asarray(out).shape == (LAYERS, POSITIONS), np.asarray(out).shape
  ratio = results["TransformerLens"][1] / results["gemma_surgery batched"][1]
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  print(f"speed-up gemma_surgery batched / TransformerLens (steady): {ratio:.1f} x")


if __name__ == "__main__":
  main()
