"""Model configurations shared by the benchmark scripts.

``MID`` is the mid-size Gemma 2 architecture of the surgery-core targets: 8
layers, d_model 512, 8 query / 4 KV heads, head_dim 64, MLP 2048, vocab
32 000, window 256 alternating with global, soft caps 50/30. ``MID3`` is the
same size as a Gemma 3 (QK-norm, no soft caps, local RoPE base 10k / global
1M, five local layers per global one): the architecture circuit-tracer's
nnsight backend maps transcoder hooks for.
"""

from __future__ import annotations

import dataclasses
import pathlib

import gemma_surgery as gs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "gemma2"

MID = gs.GemmaConfig(
  family="gemma2",
  num_layers=8,
  embedding_dim=512,
  num_heads=8,
  num_kv_heads=4,
  head_dim=64,
  mlp_hidden_dim=2048,
  vocab_size=32_000,
  attention_types=("local", "global") * 4,
  sliding_window=256,
  attn_logits_soft_cap=50.0,
  final_logit_softcap=30.0,
  query_pre_attn_scalar=64.0,
  use_post_attn_norm=True,
  use_post_ffw_norm=True,
)

MID3 = dataclasses.replace(
  MID,
  family="gemma3",
  attention_types=("local",) * 5 + ("global",) + ("local",) * 2,
  attn_logits_soft_cap=None,
  final_logit_softcap=None,
  rope_global_base=1_000_000.0,
  rope_local_base=10_000.0,
  use_qk_norm=True,
)
