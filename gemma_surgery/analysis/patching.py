"""Activation patching sweeps, batched: every patch of a sweep in a few calls.

A sweep runs the corrupted prompt with one piece of the clean run's
activation patched in — one ``(layer, position)`` or ``(layer, head)`` at a
time — and records a metric of the output. Instead of one forward per patch,
the patches of a sweep lie along the ``batch`` axis: at every layer a `Patch`
layer holds the clean activation and a ``{batch, seq}`` (or ``{batch,
heads}``) mask that is on only in the batch rows assigned to that layer, so a
chunk of patches is one jitted forward. Chunks have a fixed size, so the
whole sweep compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.analysis.named import LAYER, NamedResult
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import capture, sites
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.ablate import Patch
from gemma_surgery.surgery.run import call_model, jit_forward, run_frozen

Metric = Callable[[pz.nx.NamedArray], Any]


def _check_int(name: str, value: Any) -> int:
  """``value`` as a Python int; InputError for bools, floats, strings..."""
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise errors.InputError(
      f"{name}={value!r} must be an int (a token id or position), got"
      f" {type(value).__name__}."
    )
  return int(value)


@dataclasses.dataclass(frozen=True)
class LogitDifference:
  """Metric ``logit[correct] − logit[wrong]`` at ``position``, per batch row.

  A frozen dataclass: equal arguments compare equal, so sweeps with the same
  metric share compilations. Ids and the position are checked against the
  logits' static ``vocabulary`` and ``seq`` sizes when called (also inside
  ``jit``), so an id outside the vocabulary can't be clamped by JAX into
  another token's logit.

  Attributes:
    correct: Token id whose logit counts positively, in ``0..vocab − 1``.
    wrong: Token id whose logit counts negatively, in ``0..vocab − 1``.
    position: The ``seq`` position read; negative counts from the end.
  """

  correct: int
  wrong: int
  position: int = -1

  def __post_init__(self) -> None:
    for name in ("correct", "wrong", "position"):
      _check_int(name, getattr(self, name))
    for name in ("correct", "wrong"):
      if getattr(self, name) < 0:
        raise errors.InputError(
          f"{name}={getattr(self, name)} is a negative token id; token ids are"
          " 0..vocab_size − 1 (negative ids would silently read the logits of"
          " tokens counted from the end of the vocabulary)."
        )

  def check(self, vocab_size: int, seq: int) -> None:
    """Checks the ids against ``vocab_size`` and the position against ``seq``.

    Raises:
      InputError: An id outside ``0..vocab_size − 1`` or a position outside
        ``−seq..seq − 1``.
    """
    for name in ("correct", "wrong"):
      if not 0 <= getattr(self, name) < vocab_size:
        raise errors.InputError(
          f"logit_difference: {name}={getattr(self, name)} is outside the"
          f" vocabulary; token ids are 0..{vocab_size - 1} (JAX would clamp"
          " it to another token's logit)."
        )
    if not -seq <= self.position < seq:
      raise errors.InputError(
        f"The metric reads position {self.position}; prompts have {seq}"
        f" positions (valid: {-seq}..{seq - 1})."
      )

  def __call__(self, logits: pz.nx.NamedArray) -> Any:
    self.check(logits.named_shape["vocabulary"], logits.named_shape["seq"])
    at = logits[{"seq": self.position}].unwrap("batch", "vocabulary")
    return at[:, self.correct] - at[:, self.wrong]


@pz.pytree_dataclass
class KeepPosition(pz.nn.Layer):
  """Keeps one ``seq`` position (as a length-1 axis) of a ``{..., seq}`` input.

  Inserted after the final norm by `patching_sweep` when the metric reads a
  single position, so the unembedding (a large share of a small model's
  FLOPs) runs only there.

  Attributes:
    position: The kept position; negative counts from the end (static).
  """

  position: int = base.static_field()

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    at = self.position % x.named_shape["seq"]
    return x[{"seq": pz.slice[at : at + 1]}]


def _single_position(metric: Metric) -> tuple[int | None, Metric]:
  """``(position, metric on that position alone)`` for metrics that read one
  position (`LogitDifference`); ``(None, metric)`` otherwise."""
  if isinstance(metric, LogitDifference):
    return metric.position, dataclasses.replace(metric, position=0)
  return None, metric


def logit_difference(correct: int, wrong: int, position: int = -1) -> LogitDifference:
  """`LogitDifference` of two token ids at ``position`` (default: the last).

  Raises:
    InputError: Ids or position that are not ints, negative ids (ids beyond
      the vocabulary are refused once the vocabulary is known: by
      `patching_sweep` before it runs, or when the metric is called).
  """
  return LogitDifference(
    _check_int("correct", correct),
    _check_int("wrong", wrong),
    _check_int("position", position),
  )


@dataclasses.dataclass(frozen=True)
class _MetricOfModel:
  """``metric(model(tokens))``; hashable by value for `run_frozen`."""

  metric: Metric

  def __call__(self, model: Any, tokens: Any) -> Any:
    return self.metric(call_model(model, tokens))


@dataclasses.dataclass(frozen=True)
class PatchingResult(NamedResult):
  """Metric of the corrupted run with each clean piece patched in.

  ``named()`` gives ``scores`` as a NamedArray ``{layer, seq}`` (by
  position) or ``{layer, heads}`` (by head).

  Attributes:
    site: The patched site.
    by: ``"position"`` or ``"head"``.
    layers: Row labels: the layers swept.
    scores: ``[layer, position]`` or ``[layer, head]`` raw metric values.
    clean: Metric of the clean run.
    corrupted: Metric of the corrupted run.
  """

  site: str
  by: str
  layers: list[int]
  scores: np.ndarray
  clean: float
  corrupted: float

  def axes(self) -> dict[str, tuple[str, ...]]:
    """``{"scores": (layer, seq | heads)}``."""
    return {"scores": (LAYER, "seq" if self.by == "position" else "heads")}

  @property
  def normalized(self) -> np.ndarray:
    """``(score − corrupted) / (clean − corrupted)``: 1 = fully restored."""
    span = self.clean - self.corrupted
    if span == 0:
      raise errors.InputError(
        "Clean and corrupted metrics are equal: nothing to restore."
      )
    return (self.scores - self.corrupted) / span


def _per_row(out: Any, batch: int) -> np.ndarray:
  """The metric's ``[batch]`` values; InputError for any other shape."""
  named = hasattr(out, "named_shape")
  if named and (set(out.named_shape) != {"batch"} or out.positional_shape):
    raise errors.InputError(
      f"The metric must return one value per batch row ({{batch}}); got a"
      f" NamedArray with axes {dict(out.named_shape)} and positional shape"
      f" {out.positional_shape}."
    )
  values = to_numpy(out.unwrap("batch") if named else out)
  if values.shape != (batch,):
    raise errors.InputError(
      f"The metric must return one value per batch row, shape ({batch},); got"
      f" shape {values.shape} (a mean over the batch would mix patches)."
    )
  return values


def _metric(model: Any, metric: Metric, ids: np.ndarray) -> float:
  out = run_frozen(model, _MetricOfModel(metric), named_tokens(ids))
  return float(_per_row(out, ids.shape[0])[0])


def patching_sweep(
  model: Any,
  clean: Any,
  corrupted: Any,
  metric: Metric,
  *,
  site: str = "resid_post",
  by: str = "position",
  layers: Any = None,
  chunk_size: int = 64,
  tokenizer: Any = None,
  progress: bool = True,
) -> PatchingResult:
  """Patches the clean activation into the corrupted run, piece by piece.

  Args:
    model: A Penzai ``TransformerLM`` without captures.
    clean: One clean prompt (a string with ``tokenizer``, ids, …).
    corrupted: One corrupted prompt of the same length.
    metric: Maps logits ``{batch, seq, vocabulary}`` to a ``[batch]`` array
      inside ``jit`` (e.g. `logit_difference`); pass the same object again to
      reuse compilations.
    site: Any per-layer site, e.g. ``resid_pre``/``resid_post``,
      ``attn.out``, ``mlp.out``, or ``attn.z`` for heads.
    by: ``"position"`` (one patch per layer × position, all of the site's
      other axes) or ``"head"`` (one per layer × head, all positions; head
      sites only).
    layers: Layers to sweep (default all).
    chunk_size: Patches per jitted forward (memory vs calls).
    tokenizer: Needed for string prompts.
    progress: Show a progress bar over chunks.

  Returns:
    A `PatchingResult`.

  Raises:
    InputError: Prompts of different shapes or batch sizes other than 1; a
      `LogitDifference` whose ids lie outside the model's vocabulary or whose
      position lies outside the prompts (checked before anything runs); a
      metric that doesn't return one value per batch row.
    SiteError: Unknown site, bad layers, ``by="head"`` at a site without heads.
  """
  info = sites.site_info(site)
  if not info.per_layer:
    raise errors.SiteError(f"Sweeps need a per-layer site; {site!r} is global.")
  if by not in ("position", "head"):
    raise errors.InputError(f"by={by!r}; valid: 'position', 'head'.")
  if by == "head" and "heads" not in info.axes:
    raise errors.SiteError(
      f"by='head' needs a head site ({sorted(sites.HEAD_SITES)}); got {site!r}."
    )
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise errors.InputError(f"chunk_size={chunk_size!r} must be a positive int.")
  clean_ids = token_batch(model, clean, tokenizer)
  bad_ids = token_batch(model, corrupted, tokenizer)
  if clean_ids.shape != bad_ids.shape or clean_ids.shape[0] != 1:
    raise errors.InputError(
      f"Clean and corrupted must be one prompt each of the same length; got"
      f" shapes {clean_ids.shape} and {bad_ids.shape}."
    )
  seq = clean_ids.shape[1]
  if isinstance(metric, LogitDifference):
    metric.check(model.metadata.vocab_size, seq)
  chosen = sites.layer_indices(model, layers)
  patched, acts = capture(model, site, chosen)
  jit_forward(patched)(named_tokens(clean_ids))
  values = {layer: acts[site, layer][{"batch": 0}] for layer in chosen}
  width = seq if by == "position" else next(iter(values.values())).named_shape["heads"]
  items = [(row, col) for row in range(len(chosen)) for col in range(width)]
  scores = np.zeros(len(items))
  position, chunk_metric = _single_position(metric)
  keep = None if position is None else KeepPosition(position)
  starts = range(0, len(items), chunk_size)
  for start in tqdm.tqdm(starts, desc=f"patching {site}", disable=not progress):
    part = items[start : start + chunk_size]
    model_chunk = _patched(model, site, chosen, values, part, chunk_size, by, width)
    if keep is not None:
      model_chunk = sites.insert(model_chunk, "final_norm", None, lambda _: keep)
    tokens = np.repeat(bad_ids, chunk_size, axis=0)
    out = run_frozen(model_chunk, _MetricOfModel(chunk_metric), named_tokens(tokens))
    scores[start : start + len(part)] = _per_row(out, chunk_size)[: len(part)]
  return PatchingResult(
    site=site,
    by=by,
    layers=chosen,
    scores=scores.reshape(len(chosen), width),
    clean=_metric(model, metric, clean_ids),
    corrupted=_metric(model, metric, bad_ids),
  )


def _patched(
  model: Any,
  site: str,
  layers: list[int],
  values: dict[int, pz.nx.NamedArray],
  items: list[tuple[int, int]],
  size: int,
  by: str,
  width: int,
) -> Any:
  """``model`` with one `Patch` per layer whose mask selects its batch rows."""
  masks = np.zeros((len(layers), size, width), bool)
  for b, (row, col) in enumerate(items):
    masks[row, b, col] = True
  axis = "seq" if by == "position" else "heads"

  def make(layer: int) -> Patch:
    mask = pz.nx.wrap(jnp.asarray(masks[layers.index(layer)])).tag("batch", axis)
    if by == "position":
      return Patch(value=values[layer], seq_mask=mask, site=site)
    return Patch(value=values[layer], head_mask=mask, site=site)

  return sites.insert(model, site, layers, make)
