"""An offline view of an attribution graph (circuit-tracer JSON layout).

    view = graph_view(data)          # data: gs.circuits.graph_json(...)
    view.save("graph.html")

Nodes are laid out by prompt position (x) and layer (y: token embeddings at
the bottom, then each layer's features and error nodes, the logits on top);
edges are drawn with width by |weight| (blue positive, red negative).
Clicking a node highlights its edges and lists its strongest inputs and
outputs. Everything is inline SVG and JavaScript: no network.
"""

from __future__ import annotations

from typing import Any

from gemma_surgery import errors
from gemma_surgery.viz import _html

_KINDS = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")


def _check(data: Any) -> None:
  if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
    raise errors.InputError(
      "graph_view needs a graph JSON object with metadata, nodes and links"
      " (gemma_surgery.circuits.graph_json)."
    )
  ids = {n.get("node_id") for n in data["nodes"]}
  for node in data["nodes"]:
    if node.get("feature_type") not in _KINDS:
      raise errors.InputError(
        f"Node {node.get('node_id')!r} has feature_type"
        f" {node.get('feature_type')!r}; valid: {_KINDS}."
      )
  for link in data["links"]:
    if link.get("source") not in ids or link.get("target") not in ids:
      raise errors.InputError(f"Link {link} names a node that is not in the graph.")


def graph_view(data: dict, title: str | None = None) -> _html.HtmlView:
  """Renders a graph JSON object (see module doc) as an `HtmlView`.

  Raises:
    InputError: Not a graph object, unknown node kinds, or dangling links.
  """
  _check(data)
  meta = data["metadata"]
  tokens = [_html.display_token(t) for t in meta.get("prompt_tokens", [])]
  nodes = [
    {
      "id": n["node_id"],
      "kind": n["feature_type"],
      "layer": n["layer"],
      "pos": int(n["ctx_idx"]),
      "feature": n.get("feature"),
      "act": n.get("activation"),
      "infl": n.get("influence"),
      "label": n.get("clerp") or "",
    }
    for n in data["nodes"]
  ]
  links = [[l_["source"], l_["target"], float(l_["weight"])] for l_ in data["links"]]
  payload = {"tokens": tokens, "nodes": nodes, "links": links}
  root = _html.new_id()
  title = title or f"Attribution graph: {meta.get('slug', '')}"
  inner = (
    '<div class="gsv-note gsv-status">click a node</div>'
    '<svg class="gsv-graph-svg" xmlns="http://www.w3.org/2000/svg"></svg>'
    '<div class="gsv-note gsv-graph-info"></div>'
    + _html.json_script(f"{root}-data", payload)
    + f'<script>window.gsViz && gsViz.init("graph", "{root}");</script>'
  )
  body = _html.section(title, inner, "graph", f' id="{root}"')
  return _html.HtmlView(body, title)
