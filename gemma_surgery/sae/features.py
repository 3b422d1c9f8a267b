"""Feature analysis: top features per token, max-activating examples, a
feature's decoder direction (for steering) and its logit lens, Neuronpedia.

Features are an SAE's ``latents``; every function validates feature indices
(JAX would clamp an out-of-range index silently) and raises `SAEError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.sae.autoencoders import AutoEncoder
from gemma_surgery.sae.metrics import token_mask
from gemma_surgery.sae.splice import check_fits, splice_sae
from gemma_surgery.surgery import checks, steer
from gemma_surgery.surgery.readout import readout_head, top_tokens
from gemma_surgery.surgery.run import jit_forward

NEURONPEDIA = "https://www.neuronpedia.org"


def check_features(sae: AutoEncoder, features: Any) -> list[int]:
  """Feature indices as ints, each in ``0..width − 1`` (else `SAEError`)."""
  items = [features] if isinstance(features, int | np.integer) else list(features)
  width = sae.info.width
  for i in items:
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < width:
      raise errors.SAEError(
        f"Feature index {i!r} is out of range for {sae.info.name}:"
        f" valid 0..{width - 1}."
      )
  return [int(i) for i in items]


def feature_activations(model: Any, sae: AutoEncoder, tokens: np.ndarray) -> np.ndarray:
  """``[batch, seq, latents]`` features of the SAE spliced (error term) into
  ``model`` on ``tokens`` (one jitted forward; the model's output unchanged)."""
  spliced, feats = splice_sae(model, sae, use_error_term=True, capture_features=True)
  jit_forward(spliced)(named_tokens(tokens))
  return to_numpy(feats.value().unwrap("batch", "seq", "latents"))


def top_features(
  model: Any, sae: AutoEncoder, tokens: Any, *, k: int = 10, tokenizer: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """The ``k`` most active features of every token.

  Returns:
    ``(ids, values)``, each ``[batch, seq, k]``, strongest first; BOS (which
    the splice passes through) has all-zero values.
  """
  if not isinstance(k, int) or not 1 <= k <= sae.info.width:
    raise errors.SAEError(f"k={k!r} must be in 1..{sae.info.width}.")
  f = feature_activations(model, sae, token_batch(model, tokens, tokenizer))
  ids = np.argsort(-f, axis=-1, kind="stable")[..., :k]
  return ids, np.take_along_axis(f, ids, -1)


@dataclasses.dataclass(frozen=True)
class Example:
  """One max-activating example.

  Attributes:
    feature: The feature.
    value: Its activation at ``position``.
    row: Index of the row in the corpus (rows counted across batches).
    position: Token position in that row.
    context: Token ids around it (``before`` tokens before, the token, then
      ``after`` tokens after, clipped to the row).
    index: Index of the max token within ``context``.
    activations: The feature's activation at every token of ``context`` (from
      the same scan, so ``activations[index] == value``); render with
      ``viz.max_activating_examples([tok.pieces(e.context) for e in examples],
      [e.activations for e in examples])``.
  """

  feature: int
  value: float
  row: int
  position: int
  context: list[int]
  index: int
  activations: list[float] = dataclasses.field(default_factory=list)


def max_activating_examples(
  model: Any,
  sae: AutoEncoder,
  batches: Iterable[Any],
  features: Any,
  *,
  n: int = 10,
  before: int = 12,
  after: int = 4,
  special_ids: tuple[int, ...] = (0, 1, 2),
  progress: bool = True,
) -> dict[int, list[Example]]:
  """The ``n`` highest activations of each feature over a token corpus.

  Args:
    model: The model.
    sae: The SAE (spliced with its error term while scanning).
    batches: Iterable of ``[batch, seq]`` token arrays (rows of a batch have
      one length; batches may differ).
    features: One feature index or several.
    n: Examples kept per feature (a running top-n: memory O(n) per feature).
    before, after: Context tokens kept around each example.
    special_ids: Tokens never counted (pad, EOS, BOS); the first position of
      each row is skipped too.
    progress: Show a progress bar over batches.

  Returns:
    ``{feature: [Example, ...]}``, strongest first (ties: earlier row, then
    earlier position).
  """
  chosen = check_features(sae, features)
  best: dict[int, list[tuple[float, int, int]]] = {f: [] for f in chosen}
  rows: dict[int, np.ndarray] = {}
  row_acts: dict[tuple[int, int], np.ndarray] = {}  # (feature, row) -> [seq]
  offset = 0
  for batch in tqdm.tqdm(batches, desc="max-activating examples", disable=not progress):
    ids = token_batch(model, batch)
    acts = feature_activations(model, sae, ids)[..., chosen]  # [b, s, F]
    mask = token_mask(ids, special_ids)
    for j, feature in enumerate(chosen):
      values = np.where(mask, acts[..., j], -np.inf)
      flat = np.argsort(-values, axis=None, kind="stable")[:n]
      for b, s in zip(*np.unravel_index(flat, values.shape), strict=True):
        if np.isfinite(values[b, s]):
          best[feature].append((float(values[b, s]), offset + int(b), int(s)))
      best[feature] = sorted(best[feature], key=lambda t: (-t[0], t[1], t[2]))[:n]
    keep = {r for items in best.values() for _, r, _ in items}
    rows = {r: v for r, v in rows.items() if r in keep}
    rows.update({offset + b: ids[b] for b in range(len(ids)) if offset + b in keep})
    kept = {(f, r) for f, items in best.items() for _, r, _ in items}
    row_acts = {k: v for k, v in row_acts.items() if k in kept}
    for j, feature in enumerate(chosen):
      for b in range(len(ids)):
        if (feature, offset + b) in kept:
          row_acts[feature, offset + b] = acts[b, :, j]
    offset += len(ids)
  out = {}
  for feature, items in best.items():
    examples = []
    for value, row, pos in items:
      start = max(0, pos - before)
      context = [int(t) for t in rows[row][start : pos + after + 1]]
      values = [float(v) for v in row_acts[feature, row][start : pos + after + 1]]
      examples.append(Example(feature, value, row, pos, context, pos - start, values))
    out[feature] = examples
  return out


def feature_direction(
  sae: AutoEncoder, feature: int, *, scale: float = 1.0, normalize: bool = False
) -> pz.nx.NamedArray:
  """``scale · W_dec[feature]`` as a steering vector in the site's axes.

  The decoder row lives in the SAE's output space: ``{embedding}`` for
  residual/MLP SAEs and transcoders. With ``normalize`` the row is scaled
  to unit norm first (then ``scale`` is the steering norm; Gemma Scope
  decoder rows are not unit-norm). ``attn.z`` SAEs: use `steer_with_feature`.
  """
  (feature,) = check_features(sae, feature)
  row = to_numpy(sae.w_dec.value.unwrap("latents", "embedding"), np.float32)[feature]
  if normalize:
    row = row / max(float(np.linalg.norm(row)), 1e-12)
  if sae.info.site == "attn.z":
    raise errors.SAEError(
      "An attn.z SAE's decoder row is flattened over heads; use"
      " steer_with_feature(model, sae, ...), which reshapes it with the"
      " model's head_dim."
    )
  return pz.nx.wrap(jnp.asarray(scale * row)).tag("embedding")


def steer_with_feature(
  model: Any, sae: AutoEncoder, feature: int, scale: float, **steer_kwargs: Any
) -> Any:
  """``gs.steer`` at the SAE's site and layer with ``scale · W_dec[feature]``.

  ``scale`` is in activation units (e.g. a multiple of the feature's typical
  activation); other keyword arguments go to `gemma_surgery.steer`
  (positions, skip_bos, …).
  """
  (feature,) = check_features(sae, feature)
  row = to_numpy(sae.w_dec.value.unwrap("latents", "embedding"), np.float32)[feature]
  vector = pz.nx.wrap(jnp.asarray(scale * row))
  if sae.info.site == "attn.z":
    sizes, _ = checks.edit_sizes(model, "attn.z", sae.info.layer)
    head_dim = sizes["projection"]  # Gemma 4: the layer's own head width
    vector = pz.nx.wrap(vector.unwrap().reshape(-1, head_dim)).tag(
      "heads", "projection"
    )
  else:
    vector = vector.tag("embedding")
  # A transcoder's decoder writes its output site (mlp.out), not its input.
  site = sae.info.out_site or sae.info.site
  return steer(model, site, sae.info.layer, vector, 1.0, **steer_kwargs)


def feature_logit_lens(
  model: Any, sae: AutoEncoder, feature: int, *, k: int = 10, tokenizer: Any = None
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str] | None]]:
  """Tokens a feature's decoder row promotes and suppresses.

  The row goes through the model's read-out head (final RMSNorm with its
  gain, unembedding, final soft cap) as if it were the last residual vector:
  the direct-logit view of residual-stream features. Only for SAEs writing
  ``{embedding}`` (resid/MLP SAEs and transcoders).

  Returns:
    ``{"top": (ids, logits, pieces), "bottom": (...)}``.

  Raises:
    SAEError: A bad feature index, an ``attn.z`` SAE, or an SAE that doesn't
      fit the model (`splice.check_fits`: its size or layer).
  """
  (feature,) = check_features(sae, feature)
  check_fits(model, sae)
  if sae.info.site == "attn.z":
    raise errors.SAEError(
      "The logit lens of an attn.z SAE feature needs the output projection;"
      " it is defined for residual-stream SAEs only."
    )
  row = sae.w_dec.value[{"latents": feature}].astype(jnp.float32)
  logits = to_numpy(readout_head(model)(row).unwrap("vocabulary"), np.float64)
  top = top_tokens(logits, k, tokenizer)
  ids, values, pieces = top_tokens(-logits, k, tokenizer)
  return {"top": top, "bottom": (ids, -values, pieces)}


def neuronpedia_url(
  sae: AutoEncoder, feature: int, *, source: str | None = None, embed: bool = False
) -> str:
  """The Neuronpedia dashboard URL of a feature.

  Args:
    sae: A Gemma Scope SAE (its `SAEInfo.neuronpedia` id, e.g.
      ``gemma-2-2b/20-gemmascope-res-16k``, is derived when it is loaded).
    feature: The feature index.
    source: Override the ``model/source`` id.
    embed: The embeddable variant (for notebook IFrames).

  Raises:
    SAEError: No id is known (not a Gemma Scope release Neuronpedia hosts)
      and none was given; or a bad feature index.
  """
  (feature,) = check_features(sae, feature)
  source = source or sae.info.neuronpedia
  if not source:
    raise errors.SAEError(
      f"No Neuronpedia id is known for {sae.info.source or sae.info.name}; pass"
      " source='model/source' (e.g. 'gemma-2-2b/20-gemmascope-res-16k')."
    )
  url = f"{NEURONPEDIA}/{source}/{feature}"
  if embed:
    url += "?embed=true&embedexplanation=true&embedplots=true&embedtest=true&height=300"
  return url


def neuronpedia_iframe(
  sae: AutoEncoder, feature: int, *, width: int = 1200, height: int = 600, **kwargs
) -> Any:
  """An ``IPython.display.IFrame`` of the feature's dashboard (needs IPython)."""
  try:
    from IPython.display import IFrame
  except ImportError as e:  # pragma: no cover - IPython ships with notebooks
    raise errors.SAEError("neuronpedia_iframe needs IPython (a notebook).") from e
  return IFrame(neuronpedia_url(sae, feature, embed=True, **kwargs), width, height)
