"""Circuit tracing: replacement models and attribution graphs.

    tcs = gs.sae.load_transcoders("tiny")        # or load_clt("tiny")
    graph = gs.circuits.attribute(model, tcs, tokens)
    pruned = gs.circuits.prune(graph)
    gs.circuits.save_graph(graph, "out/graph.json", tokenizer=tok)

A wing above ``analysis`` and ``sae`` (it needs both the model rewrites and
the transcoders). Modules: `replacement` (frozen-attention replacement
model), `graph` (attribution graphs), `prune` (influence pruning), `export`
(circuit-tracer / Neuronpedia JSON), `interventions` (graph features in the
real model), `qk` (attention scores split into node pairs), `features`
(activation × gradient of SAE/transcoder features spliced with their error
term, and exact single-feature ablations).
"""

from gemma_surgery.circuits.export import graph_json, save_graph
from gemma_surgery.circuits.features import (
  FeatureAttribution,
  feature_ablation_effects,
  feature_attribution,
)
from gemma_surgery.circuits.graph import Graph, attribute, attribute_replacement
from gemma_surgery.circuits.interventions import (
  InterventionResult,
  edit_features,
  intervene,
  predict,
  top_feature_nodes,
)
from gemma_surgery.circuits.linear import linear_reads
from gemma_surgery.circuits.prune import Pruned, prune
from gemma_surgery.circuits.qk import QKAttribution, qk_attribution
from gemma_surgery.circuits.replacement import Replacement, replacement_model
from gemma_surgery.circuits.trace import trace_prompt

__all__ = [
  "FeatureAttribution",
  "Graph",
  "QKAttribution",
  "qk_attribution",
  "InterventionResult",
  "edit_features",
  "feature_ablation_effects",
  "feature_attribution",
  "intervene",
  "predict",
  "top_feature_nodes",
  "trace_prompt",
  "Pruned",
  "Replacement",
  "attribute",
  "attribute_replacement",
  "graph_json",
  "linear_reads",
  "prune",
  "replacement_model",
  "save_graph",
]
