"""Random transcoder sets / CLTs for the tiny model, shared by circuit tests."""

from __future__ import annotations

import functools

import numpy as np

import gemma_surgery as gs
from gemma_surgery.sae.autoencoders import SAEInfo, Transcoder
from gemma_surgery.sae.clt import CLTInfo, CrossLayerTranscoder, TranscoderSet

D, F = 256, 24


@functools.lru_cache(maxsize=1)
def tiny():
  lm = gs.load("tiny")
  return lm.model, lm.tokenizer


def random_set(seed: int, skip_layers=(0, 3)) -> TranscoderSet:
  rng = np.random.default_rng(seed)
  tcs = []
  for i in range(6):
    arrays = dict(
      w_enc=rng.normal(size=(D, F)).astype(np.float32) * 0.15,
      b_enc=rng.normal(size=F).astype(np.float32) * 0.1,
      w_dec=rng.normal(size=(F, D)).astype(np.float32) * 0.2,
      b_dec=rng.normal(size=D).astype(np.float32) * 0.1,
      threshold=np.full(F, 0.8, np.float32),
    )
    if i in skip_layers:
      arrays["w_skip"] = rng.normal(size=(D, D)).astype(np.float32) * 0.03
    info = SAEInfo(
      family="transcoder",
      layer=i,
      site="mlp.in",
      out_site="mlp.out",
      d_in=D,
      width=F,
      d_out=D,
      source=f"rand{i}",
    )
    tcs.append(Transcoder.from_arrays(arrays, info))
  return TranscoderSet.of(tcs, source="random")


def random_clt(seed: int) -> CrossLayerTranscoder:
  rng = np.random.default_rng(seed)
  n = 6
  arrays = dict(
    w_enc=rng.normal(size=(n, D, F)).astype(np.float32) * 0.15,
    b_enc=rng.normal(size=(n, F)).astype(np.float32) * 0.1,
    threshold=np.full((n, F), 0.8, np.float32),
    w_dec=rng.normal(size=(n, F, n, D)).astype(np.float32) * 0.1,
    b_dec=rng.normal(size=(n, D)).astype(np.float32) * 0.1,
    w_skip=rng.normal(size=(n, D, D)).astype(np.float32) * 0.02,
  )
  info = CLTInfo(num_layers=n, d_model=D, width=F, source="random-clt")
  return CrossLayerTranscoder.from_arrays(arrays, info)


@functools.lru_cache(maxsize=4)
def traced(kind: str, seed: int = 1, text: str = "a b c a b"):
  """``(model, tok, dictionary, tokens, rep, graph)`` for a random dictionary
  (cached: the compiles dominate these tests' time)."""
  from gemma_surgery.circuits.graph import attribute_replacement
  from gemma_surgery.circuits.replacement import replacement_model

  model, tok = tiny()
  dictionary = random_set(seed) if kind == "transcoders" else random_clt(seed)
  tokens = gs.named_tokens([tok.encode(text)])
  rep = replacement_model(model, dictionary, tokens)
  graph = attribute_replacement(rep, max_n_logits=3, progress=False)
  return model, tok, dictionary, tokens, rep, graph
