"""The surgery wing: named sites, surgery layers and the rewrites that insert them.

* `sites`: site names -> ``pz.Selection`` s of insertion anchors.
* `heads`: one user-facing ``heads`` axis over Penzai's head layouts.
* `layers`: the small Penzai layers inserted at sites (capture, steer,
  ablate/patch, attention-pattern edits, neuron scaling, top-k, buffers).
* `rewrites`: `capture`, `steer`, `chain`, `unpatch`.
* `interventions`: ablation, patching, neurons, attention patterns, top-k.
* `experts`: Gemma 4 mixture of experts: `ablate_experts`, `force_routing`.
* `captures`: `Captures`, the one container every capture path returns.
* `checks`: the one place where user inputs and site sizes are checked.
* `rows`: `stack_rows`, per-row edits (row i of a batch gets edit i).
* `run`: `jit_forward` and frozen-parameter forwards.
* `readout`: the model's read-out head (final norm + unembedding).

Every rewrite is a pure function ``(model, site, layers, ...) -> model`` (or
``-> (model, Captures)`` when it captures); the input model is never modified.
"""

from gemma_surgery.surgery import (
  captures,
  checks,
  experts,
  heads,
  interventions,
  layers,
  readout,
  rewrites,
  rows,
  run,
  sites,
)
from gemma_surgery.surgery.captures import Captures
from gemma_surgery.surgery.experts import ablate_experts, force_routing
from gemma_surgery.surgery.layers.capture import DisplayIntermediate, SaveIntermediate
from gemma_surgery.surgery.layers.steer import SteerIntermediate
from gemma_surgery.surgery.rewrites import capture, chain, steer, unpatch
from gemma_surgery.surgery.rows import stack_rows
from gemma_surgery.surgery.run import jit_forward
from gemma_surgery.surgery.sites import SITES

__all__ = [
  "SITES",
  "Captures",
  "DisplayIntermediate",
  "SaveIntermediate",
  "SteerIntermediate",
  "ablate_experts",
  "capture",
  "captures",
  "chain",
  "checks",
  "experts",
  "force_routing",
  "heads",
  "interventions",
  "jit_forward",
  "layers",
  "readout",
  "rewrites",
  "rows",
  "run",
  "sites",
  "stack_rows",
  "steer",
  "unpatch",
]
