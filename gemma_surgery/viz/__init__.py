"""Self-contained HTML visualizations (and treescope / PNG export).

Every renderer takes plain numpy arrays (or NamedArrays, unwrapped by axis
name) and lists of token strings, and returns an `HtmlView`: it shows itself
in Jupyter / VS Code, `save(path)` writes a standalone page, and a `Report`
concatenates several into one file. Pages use inline CSS/JavaScript only and
reference nothing on the network.
"""

from gemma_surgery.viz._html import HtmlView, display_token
from gemma_surgery.viz.attention import attention_view
from gemma_surgery.viz.graph import graph_view
from gemma_surgery.viz.heatmap import Heatmap, heatmap
from gemma_surgery.viz.lens import logit_lens_table
from gemma_surgery.viz.neurons import neuron_buckets, neuron_strip
from gemma_surgery.viz.report import Report
from gemma_surgery.viz.sae import feature_strip, feature_texts, max_activating_examples
from gemma_surgery.viz.treescope_view import show

__all__ = [
  "HtmlView",
  "Heatmap",
  "Report",
  "attention_view",
  "display_token",
  "feature_strip",
  "feature_texts",
  "graph_view",
  "heatmap",
  "logit_lens_table",
  "max_activating_examples",
  "neuron_buckets",
  "neuron_strip",
  "show",
]
