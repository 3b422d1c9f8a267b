"""The tutorial notebooks run end to end on the embedded model (offline).

Each notebook is executed top to bottom in a fresh kernel (nbclient); any
cell error fails the test. After its last cell the test runs, in the same
kernel, the checks below: every effect a notebook's text describes on the
embedded model ("the prediction forms in attn 5", "steering puts ` input`
after the prompt", ...) is asserted on the variables the notebook computed,
so the tutorials cannot silently drift into describing what no longer
happens. The committed notebooks must also be exactly what
``scripts/make_notebooks.py`` writes.
"""

from __future__ import annotations

import re
import sys

import nbformat
import pytest
from helpers.paths import ROOT  # noqa: E402
from nbclient import NotebookClient

sys.path.insert(0, str(ROOT / "scripts"))
import make_notebooks  # noqa: E402

NOTEBOOKS = sorted(make_notebooks.NOTEBOOKS)

# What each notebook's text claims about the embedded model.
CHECKS = {
  "activation_hacking.ipynb": """
assert tok.pieces([PREDICTED])[0] == "\u2423+", PREDICTED     # copies ` +` from add
assert DECIDED_AT == f"attn {lm.config.num_layers - 1}", DECIDED_AT
p = NEURON_PROBS
assert p["deactivated"] < p["original"] < p["boosted x10"], p
assert p["boosted x10"] > 0.9 and p["flipped x-10"] < p["deactivated"], p
heads_on_plus = [h for h in range(lm.config.num_heads)
                 if pieces[int(np.argmax(pattern[LAYER, h, -1, 1:])) + 1] == "\u2423+"]
assert heads_on_plus, "no last-layer head attends most to the earlier ` +`"
""",
  "gemma_scope.ipynb": """
assert float(metrics.explained_variance) > 0.8, metrics
assert float(metrics.dead_fraction) <= 0.05, metrics
assert float(metrics.ce_loss_recovered) > 0.9, metrics
assert 40 < float(metrics.l0) < 70, metrics            # "roughly 50-60 per token"
assert SPLICE_DIFF < 1e-4, SPLICE_DIFF
assert PEAKS == ["\u2423command"] * 10, PEAKS             # "all ten peak on ` command`"
assert LENS["top"][2][0] == "\u2423input", LENS["top"][2]
assert STEERED_TEXT[2.0][0].startswith(" input"), STEERED_TEXT
assert all(a != b for a, b in zip(STEERED_TEXT[0.0], STEERED_TEXT[2.0])), STEERED_TEXT
""",
  "induction_heads.ipynb": """
assert ind.loss_first > 0.8 * np.log(lm.config.vocab_size), ind.loss_first
assert ind.loss_second < 0.01 * ind.loss_first, ind.loss_second
assert BEST_LAYER == lm.config.num_layers - 1 and ind.best_heads(2)[1][2] > 0.5
assert PREV_LAYER < BEST_LAYER and prev[PREV_LAYER, PREV_HEAD] > 0.5
assert KNOCKOUT["knocked_out"] > 0.8 * ind.loss_first, KNOCKOUT
for layer, head in best:                               # each one is necessary
  assert SINGLE[layer, head] > 0.5 * ind.loss_first, SINGLE
assert np.median(SINGLE) < 0.1, SINGLE                 # most heads are harmless
assert SINGLE[PREV_LAYER, PREV_HEAD] < 0.5, SINGLE     # the prev-token head barely
losses = [RESCALED[f] for f in sorted(RESCALED, reverse=True)]
assert all(a < b for a, b in zip(losses, losses[1:])), RESCALED   # smooth rise
assert by_position.normalized[0, source] > 0.8 and by_position.normalized[-1, -1] > 0.8
assert by_position.normalized[-1, source] < 0.2
top_head = (by_head.layers[BEST_PATCHED_HEAD[0]], BEST_PATCHED_HEAD[1])
assert top_head == best[0], top_head
""",
  "tracing_a_circuit.ipynb": """
assert span[4] in graph.logit_ids.tolist()[:3], graph.logit_ids   # copies the token
assert len(data["nodes"]) > 0 and len(data["links"]) > 0
assert res.real * res.predicted > 0, res        # the graph gets the sign right
""",
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_errors(name, tmp_path):
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
  client = NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  html = [o for o in outputs if "text/html" in o.get("data", {})]
  assert html, "the notebook shows no rendered view"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_the_script(name):
  committed = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  built = make_notebooks.build(make_notebooks.NOTEBOOKS[name])
  assert [c.source for c in committed.cells] == [c.source for c in built.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_use_only_documented_api(name):
  """Every library name a tutorial calls (``gs.…``, ``an.…``, ``viz.…``) is
  documented in the README, so a reader can look it up."""
  readme = (ROOT / "README.md").read_text()
  cells = make_notebooks.NOTEBOOKS[name]
  code = "\n".join(src for kind, src in cells if kind == "code")
  used = {
    part
    for chain in re.findall(r"\b(?:gs|an|viz)((?:\.\w+)+)", code)
    for part in chain.strip(".").split(".")
  }
  undocumented = sorted(n for n in used if not re.search(rf"\b{n}\b", readme))
  assert not undocumented, f"{name} uses names the README lacks: {undocumented}"
