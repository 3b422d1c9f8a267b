"""The attribution-graph view works offline in headless Chromium."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cdp_browser import Browser, find_chromium

from gemma_surgery import viz
from gemma_surgery.circuits.export import graph_json
from gemma_surgery.circuits.graph import Graph
from gemma_surgery.errors import InputError

pytestmark = pytest.mark.browser
EVIL = (
  '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'
)


class _Tok:
  def decode(self, ids):
    return {2: "<bos>", 7: EVIL, 9: " cat"}[ids[0]]


def _data() -> dict:
  a = np.zeros((7, 7), np.float32)
  a[0, 5], a[1, 4], a[6, 0], a[6, 1], a[6, 3], a[6, 5] = 2.0, 0.5, 3.0, -1.0, 0.5, 1.0
  g = Graph(
    tokens=np.array([2, 7]),
    features=np.array([[0, 1, 11], [0, 1, 12]]),
    activations=np.array([1.5, 0.1], np.float32),
    logit_ids=np.array([9]),
    logit_probs=np.array([0.9], np.float32),
    adjacency=a,
    num_layers=1,
    scan="hand",
  )
  return graph_json(g, tokenizer=_Tok(), node_threshold=1.0, edge_threshold=1.0)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  exe = find_chromium()
  if exe is None:
    pytest.fail("No Chromium found (apt-get install chromium or set $CHROMIUM).")
  path = viz.graph_view(_data()).save(tmp_path_factory.mktemp("g") / "graph.html")
  browser = Browser(exe)
  try:
    yield browser.open(path.as_uri())
  finally:
    browser.close()


def test_renders_offline_without_errors(page):
  page.wait_for("document.querySelector('.gsv-graph').dataset.ready")
  assert page.problems() == []
  assert all(u.startswith(("file:", "data:")) for u in page.requested_urls())
  data = _data()
  assert page.eval("document.querySelectorAll('.gsv-graph-node').length") == len(
    data["nodes"]
  )
  assert page.eval("document.querySelectorAll('.gsv-graph-edge').length") == len(
    data["links"]
  )
  assert page.eval("window.__pwned === undefined")


def test_click_highlights_the_nodes_edges(page):
  page.click(".gsv-graph-node[data-id='0_11_1']")
  on = page.eval("document.querySelectorAll('.gsv-graph-edge.gsv-on').length")
  want = sum("0_11_1" in (e["source"], e["target"]) for e in _data()["links"])
  assert on == want == 2
  status = page.eval("document.querySelector('.gsv-graph .gsv-status').textContent")
  assert "0_11_1" in status and "activation 1.50" in status
  page.click(".gsv-graph-node[data-id='E_2_0']")
  assert page.eval("document.querySelector('.gsv-graph').dataset.selected") == "E_2_0"


def test_bad_graph_objects_are_refused():
  with pytest.raises(InputError, match="metadata, nodes and links"):
    viz.graph_view({"nodes": []})
  data = _data()
  data["links"].append({"source": "nope", "target": "E_2_0", "weight": 1.0})
  with pytest.raises(InputError, match="not in the graph"):
    viz.graph_view(data)
