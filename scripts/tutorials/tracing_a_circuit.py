"""The "Tracing a circuit" tutorial: an attribution graph on the induction prompt."""

from tutorials.common import SETUP

CELLS = [
  (
    "md",
    "# Tracing a circuit\n\nAn attribution graph on the induction prompt: the"
    " MLPs replaced by the embedded model's transcoders (plus error nodes),"
    " attention and norms frozen, every edge a direct linear effect. From the"
    " repeated token's features to the copied logit, then an intervention in"
    " the real model to check the graph's prediction.",
  ),
  ("code", SETUP),
  (
    "code",
    "tcs = gs.sae.load_transcoders('tiny')  # or gs.sae.load_clt('tiny')\n"
    "rng = np.random.default_rng(0)\n"
    "span = rng.integers(262, lm.config.vocab_size, 8).tolist()\n"
    "ids = [lm.config.bos_id] + span + span[:4]   # ... the model should copy span[4]\n"
    "tokens = gs.named_tokens([ids])\n"
    "graph = gs.circuits.attribute(model, tcs, tokens, progress=False)\n"
    "print(graph.n_features, 'active features;', 'top logits:', tok.pieces(graph.logit_ids.tolist())[:3],"
    " 'expected:', tok.pieces([span[4]]))",
  ),
  (
    "md",
    "## Prune by influence and view the graph (offline HTML; the JSON is Neuronpedia's format)",
  ),
  (
    "code",
    "pruned = gs.circuits.prune(graph, node_threshold=0.8, edge_threshold=0.98)\n"
    "data = gs.circuits.graph_json(graph, pruned, tokenizer=tok, slug='induction')\n"
    "print(len(data['nodes']), 'nodes,', len(data['links']), 'links kept')\n"
    "viz.graph_view(data)",
  ),
  ("md", "## Which positions feed the copied logit?"),
  (
    "code",
    "target = int(graph.logit_ids[0])\n"
    "row = graph.adjacency[graph.logit_node(target)]\n"
    "by_pos = np.zeros(graph.n_pos)\n"
    "for node in np.flatnonzero(row):\n"
    "    by_pos[graph.describe(int(node))[2]] += row[node]\n"
    "viz.heatmap(by_pos[None], row_labels=['direct effect'], col_labels=tok.pieces(ids))",
  ),
  ("md", "## Ablate the top features in the real model"),
  (
    "code",
    "nodes = gs.circuits.top_feature_nodes(graph, target, k=5)\n"
    "res = gs.circuits.intervene(model, tcs, tokens, graph, nodes, target, scale=0.0)\n"
    "print(f'predicted {res.predicted:+.3f} (direct {res.predicted_direct:+.3f}), real {res.real:+.3f}')",
  ),
]
