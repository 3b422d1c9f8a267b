"""The sites Gemma 4 adds, and where they anchor inside a block.

==================  ==========================================  =================
site                activation                                  axes (+batch, seq)
==================  ==========================================  =================
per_layer.input     the block's per-layer embedding input       per_layer
moe.router_logits   router logits, before softmax and top-k     experts
moe.weights         routing weights: renormalized top-k times   experts
                    per-expert scale, 0 for unchosen experts
moe.expert_out      every expert's output, before weighting     experts, embedding
==================  ==========================================  =================

Hugging Face module paths (``Gemma4ForCausalLM``): ``per_layer.input`` is
``per_layer_inputs[:, :, L]`` passed to ``model.layers[L]`` (the output of
``model.project_per_layer_inputs``); ``moe.router_logits`` is
``model.layers[L].router.proj`` output; ``moe.weights`` scatters
``router``'s ``top_k_weights`` over ``top_k_index``; ``moe.expert_out`` is
``model.layers[L].experts``' per-expert ``down_proj`` output (before
``top_k_weights``). Every site anchors at the last item of a Sequential in
`gemma_surgery.model.gemma4` / `gemma_surgery.model.moe`, so inserted layers
see exactly that activation, uncached and KV-cached.
"""

from __future__ import annotations

from typing import Any

from penzai import pz

from gemma_surgery import errors
from gemma_surgery.model import gemma4, moe

# (site, axes, Hugging Face module, meaning)
ROWS = (
  (
    "per_layer.input",
    ("per_layer",),
    "model.project_per_layer_inputs(...)[:, :, L]",
    "per-layer embedding input of block L (Gemma 4 E models)",
  ),
  (
    "moe.router_logits",
    ("experts",),
    "model.layers.L.router.proj",
    "router logits (Gemma 4 MoE)",
  ),
  (
    "moe.weights",
    ("experts",),
    "model.layers.L.router -> top_k_weights",
    "routing weights, 0 off the top k (Gemma 4 MoE)",
  ),
  (
    "moe.expert_out",
    ("experts", "embedding"),
    "model.layers.L.experts (per expert, unweighted)",
    "each expert's output before weighting (Gemma 4 MoE)",
  ),
)
SITE_NAMES = frozenset(row[0] for row in ROWS)


def anchor(block: Any, site: str) -> pz.Selection:
  """The anchor of a Gemma 4 site inside one block ("after" semantics).

  Raises:
    SiteError: If the block lacks the part (a dense or non-E layer).
  """
  sel = pz.select(block)
  if site == "per_layer.input":
    parts = sel.at_instances_of(gemma4.PerLayerInput)
    what = "per-layer input (Gemma 4 E models only)"
    field = "source"
  else:
    parts = sel.at_instances_of(moe.MixtureOfExperts)
    what = "mixture of experts (Gemma 4 MoE layers only)"
    field = {"moe.router_logits": "router", "moe.weights": "routing"}.get(
      site, "experts"
    )
  if parts.count() != 1:
    raise errors.SiteError(
      f"Site {site!r} needs a {what}; this block has {parts.count()}."
    )
  return parts.at(lambda p: getattr(p, field).sublayers[-1])
