"""Surgery layers: small Penzai layers inserted at named sites.

Every one derives from `base.SurgeryLayer` (so `gemma_surgery.unpatch` finds
them) and is a ``@pz.pytree_dataclass`` whose array fields are leaves
(changing them never recompiles) and whose structural fields are static.

* `base`: the type tag and shared helpers (phase masks, static fields).
* `capture`: `SaveIntermediate`, `DisplayIntermediate` and `CaptureLayer`.
* `buffer`: `CaptureBuffer`, a capture's fixed-shape form in fused decoding.
* `topk`: `TopKCapture`.
* `steer`: `SteerIntermediate`.
* `ablate`: `Ablate`, `Patch`.
* `attention`: `KnockOutHeads`, `OverridePattern`, `RescalePattern`.
* `neurons`: `NeuronScale`.
* `tap`: `GradientTap` (differentiable additive taps for attribution) and
  `GradientGate` (drops the gradient through a site: AtP*'s GradDrop).
"""
