"""Attribution graphs as circuit-tracer / Neuronpedia graph JSON.

    data = graph_json(graph, pruned, slug="induction", tokenizer=tok)
    save_graph(graph, "out/induction.json", tokenizer=tok)

The layout is the one circuit-tracer's ``create_graph_files`` writes and
Neuronpedia's graph viewer reads: ``metadata`` (slug, scan, prompt tokens,
node threshold, ``schema_version`` 1), ``qParams`` (pinned ids, supernodes,
link type), ``nodes`` and ``links`` (``source``, ``target``, ``weight``).
Node ids: features ``"{layer}_{latent}_{pos}"``, error nodes
``"0_{layer}_{pos}"``, tokens ``"E_{id}_{pos}"``, logits
``"{layers+1}_{id}_{pos}"``; ``feature`` of a feature node is the Cantor
pairing of (layer, latent). Only nodes with a kept edge (and every token and
logit node) are written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gemma_surgery import atomic
from gemma_surgery.circuits.graph import Graph
from gemma_surgery.circuits.prune import Pruned, prune


def _cantor(x: int, y: int) -> int:
  return (x + y) * (x + y + 1) // 2 + y


def _decode(tokenizer: Any, token: int) -> str:
  if tokenizer is None:
    return str(token)
  return tokenizer.decode([int(token)])


def _node(graph: Graph, i: int, pruned: Pruned, tokenizer: Any) -> dict:
  kind, layer, pos, index = graph.describe(i)
  node = dict(
    token_prob=0.0,
    is_target_logit=False,
    run_idx=0,
    reverse_ctx_idx=0,
    clerp="",
    influence=float(pruned.cumulative[i]),
    activation=None,
    ctx_idx=pos,
  )
  if kind == "feature":
    act = float(graph.activations[i])
    node.update(
      node_id=f"{layer}_{index}_{pos}",
      feature=_cantor(layer, index),
      layer=str(layer),
      feature_type="cross layer transcoder",
      jsNodeId=f"{layer}_{index}-0",
      activation=act,
    )
  elif kind == "error":
    node.update(
      node_id=f"0_{layer}_{pos}",
      feature=-1,
      layer=str(layer),
      feature_type="mlp reconstruction error",
      jsNodeId=f"{layer}_{pos}-0",
    )
  elif kind == "token":
    node.update(
      node_id=f"E_{index}_{pos}",
      feature=pos,
      layer="E",
      feature_type="embedding",
      jsNodeId=f"E_{index}-{pos}",
    )
  else:
    j = i - graph.logit_start
    prob = float(graph.logit_probs[j])
    out_layer = str(graph.num_layers + 1)
    node.update(
      node_id=f"{out_layer}_{index}_{pos}",
      feature=index,
      layer=out_layer,
      feature_type="logit",
      token_prob=prob,
      is_target_logit=j == 0,
      jsNodeId=f"L_{index}-{pos}",
      clerp=f'Output "{_decode(tokenizer, index)}" (p={prob:.3f})',
      influence=None,
    )
  return node


def graph_json(
  graph: Graph,
  pruned: Pruned | None = None,
  *,
  slug: str = "graph",
  tokenizer: Any = None,
  node_threshold: float = 0.8,
  edge_threshold: float = 0.98,
) -> dict:
  """The circuit-tracer / Neuronpedia JSON object of a (pruned) graph."""
  if pruned is None:
    pruned = prune(graph, node_threshold, edge_threshold)
  nodes = {
    int(i): _node(graph, int(i), pruned, tokenizer)
    for i in np.flatnonzero(pruned.node_mask)
  }
  targets, sources = np.nonzero(pruned.edge_mask)
  links = [
    {
      "source": nodes[s]["node_id"],
      "target": nodes[t]["node_id"],
      "weight": float(graph.adjacency[t, s]),
    }
    for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
    if s in nodes and t in nodes
  ]
  used = {link["source"] for link in links} | {link["target"] for link in links}
  kept = [
    n
    for n in nodes.values()
    if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")
  ]
  metadata = dict(
    slug=slug,
    scan=graph.scan,
    transcoder_list=[],
    prompt_tokens=[_decode(tokenizer, t) for t in graph.tokens],
    prompt=graph.prompt or "",
    node_threshold=node_threshold,
    schema_version=1,
  )
  qparams = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
  return dict(metadata=metadata, qParams=qparams, nodes=kept, links=links)


def save_graph(
  graph: Graph,
  path: str | os.PathLike[str],
  *,
  pruned: Pruned | None = None,
  slug: str | None = None,
  tokenizer: Any = None,
  node_threshold: float = 0.8,
  edge_threshold: float = 0.98,
) -> dict:
  """Writes `graph_json` to ``path`` atomically; returns the object."""
  slug = slug or os.path.splitext(os.path.basename(os.fspath(path)))[0]
  data = graph_json(
    graph,
    pruned,
    slug=slug,
    tokenizer=tokenizer,
    node_threshold=node_threshold,
    edge_threshold=edge_threshold,
  )
  atomic.write_text(path, json.dumps(data, indent=1) + "\n")
  return data
