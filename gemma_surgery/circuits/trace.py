"""One call from a prompt to graph JSON + HTML (what ``gemma-surgery trace`` runs).

paths = trace_prompt(lm, gs.sae.load_transcoders("tiny"), "a b c a b", "out/")
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from gemma_surgery import errors
from gemma_surgery.circuits.export import save_graph
from gemma_surgery.circuits.graph import Graph, attribute
from gemma_surgery.circuits.prune import prune
from gemma_surgery.generation.inputs import named_tokens
from gemma_surgery.sae.clt import Dictionary
from gemma_surgery.viz.graph import graph_view


def trace_prompt(
  lm: Any,
  dictionary: Dictionary,
  prompt: str,
  out: str | os.PathLike[str],
  *,
  slug: str = "graph",
  node_threshold: float = 0.8,
  edge_threshold: float = 0.98,
  max_n_logits: int = 10,
  desired_logit_prob: float = 0.95,
  max_feature_nodes: int | None = None,
  progress: bool = True,
) -> tuple[Graph, pathlib.Path, pathlib.Path]:
  """Attributes ``prompt``, prunes, writes ``out/<slug>.json`` and ``.html``.

  Returns:
    ``(graph, json_path, html_path)``.

  Raises:
    TokenizerError: ``lm`` has no tokenizer. InputError: Bad settings.
  """
  if lm.tokenizer is None:
    raise errors.TokenizerError(
      f"{lm.path} has no tokenizer.model or tokenizer.json; pass one."
    )
  ids = lm.tokenizer.encode(prompt, add_bos=True)
  tokens = named_tokens(np.asarray([ids]))
  graph = attribute(
    lm.model,
    dictionary,
    tokens,
    max_n_logits=max_n_logits,
    desired_logit_prob=desired_logit_prob,
    max_feature_nodes=max_feature_nodes,
    prompt=prompt,
    progress=progress,
  )
  pruned = prune(graph, node_threshold, edge_threshold)
  folder = pathlib.Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  json_path = folder / f"{slug}.json"
  data = save_graph(
    graph,
    json_path,
    pruned=pruned,
    slug=slug,
    tokenizer=lm.tokenizer,
    node_threshold=node_threshold,
    edge_threshold=edge_threshold,
  )
  html_path = graph_view(data).save(folder / f"{slug}.html")
  return graph, json_path, html_path
