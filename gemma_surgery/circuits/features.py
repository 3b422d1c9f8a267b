"""Feature attribution: SAE/transcoder features spliced with their error term.

Spliced with its error term, a dictionary leaves the model's output unchanged
and decomposes the activation ``y`` at its output site into nodes:

    y = Σ_i f_i · W_dec[i]  +  b_dec (+ x · W_skip)  +  error

with ``f = encode(x)`` read at the input site (the same site for an SAE) and
``error = y − decode(f) (− skip)``. Each node's attribution is activation ×
gradient: ``f_i · (W_dec[i] · dM/dy)`` for a feature, ``error · dM/dy`` for
the error node, ``(b_dec + skip) · dM/dy`` for the bias node. The gradient is
taken at the site of the unspliced model (the error-term splice is the
identity there, so it is the same gradient) in one jitted forward and
backward (`gemma_surgery.analysis.gradients`). The nodes of a position sum to
``y · dM/dy``; ``−attribution`` is the first-order estimate of ablating (zeroing) the
node, which `feature_ablation_effects` measures exactly.

Position 0 (BOS) is not spliced (as in `splice_sae` without
``include_bos``), so every node there is zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.analysis import gradients
from gemma_surgery.analysis.named import NamedResult
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.sae.autoencoders import AutoEncoder, Transcoder, contract
from gemma_surgery.sae.edits import feature_edits
from gemma_surgery.sae.features import check_features
from gemma_surgery.sae.splice import flatten_heads, set_edits, splice_sae
from gemma_surgery.surgery.run import call_model, run_frozen


@dataclasses.dataclass(frozen=True)
class FeatureAttribution(NamedResult):
  """Activation × gradient of a dictionary's nodes (means over the batch).

  Attributes:
    site: The output site the nodes write (``out_site`` for transcoders).
    layer: The dictionary's layer.
    features: ``[seq, latents]`` feature attributions.
    error: ``[seq]`` error-node attributions.
    bias: ``[seq]`` decoder bias (+ skip) attributions.
    metric: The metric on the clean run (mean over the batch).
  """

  site: str
  layer: int
  features: np.ndarray
  error: np.ndarray
  bias: np.ndarray
  metric: float

  AXES = {"features": ("seq", "latents"), "error": ("seq",), "bias": ("seq",)}

  @property
  def by_feature(self) -> np.ndarray:
    """``[latents]``: each feature's attribution summed over positions."""
    return self.features.sum(0)

  def top(self, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` features with the largest ``|by_feature|``: ``(latent, value)``."""
    order = np.argsort(-np.abs(self.by_feature), kind="stable")[:k]
    return [(int(i), float(self.by_feature[i])) for i in order]


def _sites(sae: AutoEncoder) -> tuple[str, str]:
  if not isinstance(sae, AutoEncoder):
    raise errors.InputError(f"Expected an SAE or transcoder; got {type(sae).__name__}.")
  out = sae.info.out_site if isinstance(sae, Transcoder) else None
  return sae.info.site, out or sae.info.site


def _mean_rows(x: pz.nx.NamedArray, *axes: str) -> np.ndarray:
  total = pz.nx.nmap(jnp.sum)(x.untag("batch")) / x.named_shape["batch"]
  return to_numpy(total.unwrap(*axes))


def feature_attribution(
  model: Any,
  sae: AutoEncoder,
  prompts: Any,
  metric: gradients.Metric,
  *,
  tokenizer: Any = None,
) -> FeatureAttribution:
  """Activation × gradient of every feature, the error and the bias node.

  Args:
    model: A Penzai transformer LM (not modified), without the dictionary
      spliced in.
    sae: An `AutoEncoder` (SAE) or `Transcoder` (gs.sae loaders).
    prompts: ``[batch, seq]`` ids, one prompt, or strings with a tokenizer.
    metric: ``logits -> [batch]`` (see `gemma_surgery.analysis.gradients`).
    tokenizer: Needed for string prompts.

  Returns:
    A `FeatureAttribution`.

  Raises:
    InputError: Not a dictionary; a metric that doesn't return one value
      per row, or needs a corrupted run.
    SiteError: A dictionary whose layer the model lacks.
  """
  read, write = _sites(sae)
  if getattr(metric, "needs_reference", False):
    raise errors.InputError("Feature attribution runs one prompt set: no kl_to_clean.")
  layer = sae.info.layer
  names = [read] if read == write else [read, write]
  got = gradients.site_gradients(
    model, prompts, None, metric, names, [layer], tokenizer=tokenizer
  )
  x = flatten_heads(read, got.clean[read, layer])
  y = flatten_heads(write, got.clean[write, layer])
  grad = flatten_heads(write, got.grad_clean[write, layer])
  f = sae.encode(x)
  per_feature = f * contract("embedding", grad, sae.w_dec.value)
  decoded = sae.decode(f)
  skip = sae.skip(x) if isinstance(sae, Transcoder) else None
  bias = decoded - contract("latents", f, sae.w_dec.value)
  if skip is not None:
    decoded, bias = decoded + skip, bias + skip
  error = y.astype(jnp.float32) - decoded
  spliced = pz.nx.wrap(jnp.arange(x.named_shape["seq"]) > 0).tag("seq")

  def node(value: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return pz.nx.nmap(jnp.where)(spliced, value, 0.0)

  def dot(value: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return node(pz.nx.nmap(jnp.sum)((value * grad).untag("embedding")))

  return FeatureAttribution(
    site=write,
    layer=layer,
    features=_mean_rows(node(per_feature), "seq", "latents"),
    error=_mean_rows(dot(error), "seq"),
    bias=_mean_rows(dot(bias), "seq"),
    metric=float(np.mean(got.metric_clean)),
  )


def feature_ablation_effects(
  model: Any,
  sae: AutoEncoder,
  prompts: Any,
  metric: gradients.Metric,
  features: Sequence[int],
  *,
  tokenizer: Any = None,
) -> np.ndarray:
  """Exact effects of zeroing each feature (at every spliced position).

  The dictionary is spliced with its error term and one feature clamped to
  zero at a time: ``metric(ablated) − metric(clean)``, mean over the batch,
  one jitted forward per feature (the clamp is an array: one compilation).

  Returns:
    ``[len(features)]`` effects, comparable with
    ``−FeatureAttribution.by_feature[features]``.

  Raises:
    SAEError: Feature ids outside the dictionary.
  """
  chosen = check_features(sae, list(features))
  if getattr(metric, "needs_reference", False):
    raise errors.InputError("Feature ablation runs one prompt set: no kl_to_clean.")
  tokens = named_tokens(token_batch(model, prompts, tokenizer))
  spliced = splice_sae(model, sae, use_error_term=True, edits=feature_edits(sae))
  base = np.asarray(metric(run_frozen(spliced, call_model, tokens))).mean()
  out = []
  for i in chosen:
    ablated = set_edits(spliced, feature_edits(sae, ablate=[i]), sae)
    out.append(np.asarray(metric(run_frozen(ablated, call_model, tokens))).mean())
  return np.asarray(out) - base
