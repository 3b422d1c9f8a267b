"""Acceptance on the embedded model's induction prompt, with its shipped
transcoders: the graph finds the copy path through the induction layer's
attention, and ablating the graph's top features moves the logit as the
graph predicts.

The issue names "a layer-1 attention edge" (a two-layer induction circuit);
the embedded model v2 has its induction heads in layer 5 (the manifest's
induction scores, measured independently of the graph), so the edge is
checked at the layer those scores name."""

from __future__ import annotations

import dataclasses
import functools
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from helpers.circuits import tiny
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.circuits.graph import attribute_replacement
from gemma_surgery.circuits.linear import linear_reads
from gemma_surgery.circuits.replacement import FrozenPattern, replacement_model

COPY = 5  # position of the token the model should copy (span[4])


@functools.lru_cache(maxsize=1)
def _traced():
  model, tok = tiny()
  tcs = gs.sae.load_transcoders("tiny")
  span = np.random.default_rng(0).integers(262, model.metadata.vocab_size, 8).tolist()
  ids = [2, *span, *span[:4]]  # BOS, span, its first half again
  tokens = gs.named_tokens([ids])
  rep = replacement_model(model, tcs, tokens)
  graph = attribute_replacement(rep, progress=False)
  return model, tcs, tokens, rep, graph, span[4]


def _path(edge_mask: np.ndarray, src: int, dst: int) -> list[int] | None:
  prev, queue = {src: None}, deque([src])
  while queue:
    u = queue.popleft()
    for t in np.flatnonzero(edge_mask[:, u]).tolist():
      if t not in prev:
        prev[t] = u
        queue.append(t)
  if dst not in prev:
    return None
  out, x = [], dst
  while x is not None:
    out.append(x)
    x = prev[x]
  return out[::-1]


def _knock_pattern(rep, layer: int, query: int, key: int):
  """The replacement with layer ``layer``'s frozen attention from ``query`` to
  ``key`` set to 0 (all heads)."""
  count = [0]

  def edit(fp: FrozenPattern) -> FrozenPattern:
    i, count[0] = count[0], count[0] + 1
    if i != layer:
      return fp
    seq = fp.pattern.named_shape["seq"]
    mask = np.ones((seq, seq), np.float32)
    mask[query, key] = 0.0
    m = pz.nx.wrap(jnp.asarray(mask)).tag("seq", "kv_seq")
    return dataclasses.replace(fp, pattern=fp.pattern * m)

  model = pz.select(rep.model).at_instances_of(FrozenPattern).apply(edit)
  return dataclasses.replace(rep, model=model)


def _token_to_logit_edge(rep, pos: int, logit_id: int) -> float:
  reads = linear_reads(rep)
  n, seq, d = rep.errors.shape
  _, vjp = jax.vjp(reads, jnp.zeros((seq, d)), jnp.asarray(rep.written))
  vocab = rep.logits.shape[-1]
  cot = np.full(vocab, -1.0 / vocab, np.float32)
  cot[logit_id] += 1.0
  g_embed, _ = vjp((jnp.zeros((n, seq, d)), jnp.asarray(cot)))
  return float(np.asarray(g_embed)[pos] @ rep.embed[pos])


def test_the_model_copies_and_the_graph_predicts_the_copy():
  _, _, _, rep, graph, want = _traced()
  assert int(graph.logit_ids[0]) == want and graph.logit_probs[0] > 0.5
  real = rep.logits[-1]
  assert int(np.argmax(real)) == want


def _induction_layer() -> int:
  scores = np.asarray(gs.assets.manifest()["metrics"]["induction_scores"])
  return int(np.argmax(scores.max(-1).mean(0)))  # [spans, layers, heads]


def test_pruned_graph_has_the_copy_path_through_induction_attention():
  _, _, _, rep, graph, want = _traced()
  pruned = gs.circuits.prune(graph, node_threshold=0.8, edge_threshold=0.98)
  src, dst = graph.token_node(COPY), graph.logit_node(want)
  path = _path(pruned.edge_mask, src, dst)
  assert path is not None, "no kept path from the copied token to its logit"
  # The step that leaves position COPY for the last position is an attention
  # edge; knocking the induction layer's attention last -> COPY out of the
  # frozen model removes most of the copied token's direct effect (other
  # layers' knock-outs remove less).
  last = graph.n_pos - 1
  full = _token_to_logit_edge(rep, COPY, want)
  assert full > 1.0
  drops = {}
  for layer in range(graph.num_layers):
    knocked = _knock_pattern(rep, layer, last, COPY)
    drops[layer] = 1 - _token_to_logit_edge(knocked, COPY, want) / full
  layer = _induction_layer()
  assert drops[layer] > 0.5, drops
  assert max(v for k, v in drops.items() if k != layer) < drops[layer], drops


def test_ablating_top_features_moves_the_logit_as_predicted():
  """Tolerance: both graph predictions have the real change's sign, and the
  real change is within a factor 2 of the direct prediction (other features
  fixed). Measured: direct -3.46, propagated -1.57 (other features
  responding linearly through the graph), real -3.16: with these very
  sparse transcoders (L0 ~2) the linear response over-credits downstream
  features, and attention/norms are frozen in the graph only."""
  model, tcs, tokens, _, graph, want = _traced()
  nodes = gs.circuits.top_feature_nodes(graph, want, k=5)
  assert len(nodes) == 5
  res = gs.circuits.intervene(model, tcs, tokens, graph, nodes, want, scale=0.0)
  assert res.predicted < 0 and res.predicted_direct < 0 and res.real < 0, res
  assert 0.5 <= res.real / res.predicted_direct <= 2.0, res
  # Negative control: ablating as many random active features moves it far less.
  rng = np.random.default_rng(0)
  pool = np.setdiff1d(np.arange(graph.n_features), nodes)
  others = rng.choice(pool, 5, replace=False)
  control = gs.circuits.intervene(model, tcs, tokens, graph, others.tolist(), want, 0.0)
  assert abs(control.real) < abs(res.real)
