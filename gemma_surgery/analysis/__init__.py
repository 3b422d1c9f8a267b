"""Analyses: pure functions over models and activations (named axes in, numpy out).

Results are numpy that knows its axis names: result dataclasses have
``named()`` (``{field: NamedArray}``) and ``axes()``; functions returning a
bare array take ``named=True`` (see `named` for the axis names).

* `logit_lens`: premature decoding of the residual stream after the embedding
  and every sublayer, with the change each sublayer made.
* `neurons`: top-k MLP neurons per token, neuron → token projections,
  deactivate/boost comparisons.
* `attention`: patterns, head detector scores (previous-token,
  duplicate-token, induction), induction on repeated random sequences, head
  knockout losses.
* `patching`: activation patching sweeps (layers × positions or heads), all
  patches of a sweep batched into a few jitted calls.
* `gradients`: gradients of a metric at any site for a clean and a corrupted
  batch in one jitted forward and backward (zero-valued taps); metrics
  `log_prob`, `kl_to_clean` beside `logit_difference`.
* `attribution`: attribution patching (AtP, AtP* with the QK fix in
  `qk_fix` and GradDrop, integrated gradients), compared with exact sweeps;
  AtP and AtP* run as one `atp_pass` (clean forward, corrupted forward and
  backward).
* `direct_logit`: direct logit attribution of heads, MLPs and neurons
  through the frozen final norm.
* `edges`: edge attribution patching (sender → receiver scores, pruning).
* `random_tokens`: which ids random-token analyses draw (`token_pool`) and
  repeated random sequences.
"""

from gemma_surgery.analysis import (
  atp_pass,
  attention,
  attribution,
  direct_logit,
  edges,
  gradients,
  named,
  neurons,
  patching,
  qk_fix,
  random_tokens,
)
from gemma_surgery.analysis.attention import (
  InductionResult,
  attention_patterns,
  duplicate_token_scores,
  induction_scores,
  induction_token_scores,
  knockout_losses,
  mask_bos,
  previous_token_scores,
  repeat_losses,
  token_losses,
)
from gemma_surgery.analysis.attribution import (
  AttributionResult,
  attribution_patching,
  spearman,
  top_k_recall,
)
from gemma_surgery.analysis.direct_logit import (
  DirectLogitAttribution,
  direct_logit_attribution,
)
from gemma_surgery.analysis.edges import Edge, EdgeAttribution, edge_attribution
from gemma_surgery.analysis.gradients import (
  SiteGradients,
  kl_to_clean,
  log_prob,
  site_gradients,
)
from gemma_surgery.analysis.logit_lens import LogitLens, logit_lens
from gemma_surgery.analysis.neurons import (
  NeuronTokens,
  TopNeurons,
  compare_neuron_edits,
  neuron_tokens,
  top_neurons,
)
from gemma_surgery.analysis.patching import (
  PatchingResult,
  logit_difference,
  patching_sweep,
)
from gemma_surgery.analysis.random_tokens import repeated_tokens, token_pool
from gemma_surgery.surgery.readout import readout_head, top_tokens

__all__ = [
  "AttributionResult",
  "DirectLogitAttribution",
  "Edge",
  "EdgeAttribution",
  "InductionResult",
  "LogitLens",
  "NeuronTokens",
  "PatchingResult",
  "SiteGradients",
  "TopNeurons",
  "atp_pass",
  "attention",
  "attention_patterns",
  "attribution",
  "attribution_patching",
  "compare_neuron_edits",
  "direct_logit",
  "direct_logit_attribution",
  "duplicate_token_scores",
  "edge_attribution",
  "edges",
  "gradients",
  "induction_scores",
  "induction_token_scores",
  "kl_to_clean",
  "knockout_losses",
  "log_prob",
  "logit_difference",
  "logit_lens",
  "mask_bos",
  "named",
  "neuron_tokens",
  "neurons",
  "patching",
  "patching_sweep",
  "previous_token_scores",
  "qk_fix",
  "random_tokens",
  "readout_head",
  "repeated_tokens",
  "repeat_losses",
  "site_gradients",
  "spearman",
  "token_losses",
  "token_pool",
  "top_neurons",
  "top_k_recall",
  "top_tokens",
]
