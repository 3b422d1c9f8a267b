"""Gradients of a metric with respect to the activations at named sites.

`site_gradients` inserts a zero-valued `GradientTap` at every requested site
(a pure rewrite: the caller's model is untouched), runs the clean and the
corrupted prompts as one batch, and differentiates the metric with respect to
the taps' ``delta`` — one jitted forward and backward that returns, for every
site, the activation and the metric's gradient on both runs.

Metrics map the logits ``{batch, seq, vocabulary}`` to one value per batch
row: `patching.logit_difference`, `log_prob`, `kl_to_clean` (needs the clean
run's logits, which the batch carries) or any function of the logits. Each row's
value depends only on that row, so the gradient of their sum is every row's
own gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.analysis.patching import LogitDifference, logit_difference
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers.capture import CaptureLayer
from gemma_surgery.surgery.layers.tap import GradientTap

Key = tuple[str, int | None]
Metric = Callable[..., Any]


def _at_least_f32(x: jax.Array) -> jax.Array:
  """``x`` in float32, or wider (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class LogProb:
  """Metric ``log p(target)`` at ``position``, per batch row.

  Attributes:
    target: Token id, ``0..vocab − 1`` (checked against the logits).
    position: The ``seq`` position read; negative counts from the end.
  """

  target: int
  position: int = -1

  def __call__(self, logits: pz.nx.NamedArray) -> Any:
    vocab, seq = logits.named_shape["vocabulary"], logits.named_shape["seq"]
    LogitDifference(self.target, self.target, self.position).check(vocab, seq)
    at = logits[{"seq": self.position}].unwrap("batch", "vocabulary")
    return jax.nn.log_softmax(_at_least_f32(at), axis=-1)[:, self.target]


@dataclasses.dataclass(frozen=True)
class KLToClean:
  """Metric ``KL(p_clean || p_row)`` of next-token distributions, per row.

  The clean distribution is the clean run's (the gradient runner passes it as
  ``reference``, without gradient). ``position=None`` averages over positions.

  Attributes:
    position: The ``seq`` position read (negative from the end) or None.
  """

  position: int | None = -1
  needs_reference = True

  def __call__(self, logits: pz.nx.NamedArray, reference: Any = None) -> Any:
    if reference is None:
      raise errors.InputError(
        "kl_to_clean needs the clean run's logits: use it through"
        " site_gradients / attribution_patching, which pass them."
      )
    row = _at_least_f32(logits.unwrap("batch", "seq", "vocabulary"))
    ref = jnp.asarray(reference, row.dtype)
    if self.position is not None:
      seq = row.shape[1]
      if not -seq <= self.position < seq:
        raise errors.InputError(
          f"kl_to_clean reads position {self.position}; prompts have {seq}"
          f" positions (valid: {-seq}..{seq - 1})."
        )
      row, ref = row[:, self.position], ref[:, self.position]
    logp, logq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(row, -1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return kl if self.position is not None else kl.mean(-1)


def log_prob(target: int, position: int = -1) -> LogProb:
  """`LogProb` of ``target`` at ``position`` (default the last).

  Raises:
    InputError: A target or position that is not an int, a negative target.
  """
  checked = logit_difference(target, target, position)  # the same checks
  return LogProb(checked.correct, checked.position)


def kl_to_clean(position: int | None = -1) -> KLToClean:
  """`KLToClean` at ``position`` (None: mean over all positions).

  Raises:
    InputError: A position that is neither an int nor None.
  """
  if position is None:
    return KLToClean(None)
  return KLToClean(logit_difference(0, 0, position).position)


def _rows(out: Any, batch: int) -> jax.Array:
  """The metric's ``[batch]`` values as a JAX array (checked at trace time)."""
  if hasattr(out, "named_shape"):
    if set(out.named_shape) != {"batch"} or out.positional_shape:
      raise errors.InputError(
        f"The metric must return one value per batch row ({{batch}}); got axes"
        f" {dict(out.named_shape)}."
      )
    out = out.unwrap("batch")
  out = jnp.asarray(out)
  if out.shape != (batch,):
    raise errors.InputError(
      f"The metric must return one value per batch row, shape ({batch},); got"
      f" shape {out.shape}."
    )
  return out


def apply_metric(metric: Metric, logits: pz.nx.NamedArray, clean_rows: int) -> Any:
  """``metric(logits)`` as ``[batch]``; reference metrics get the clean logits.

  Rows ``0..clean_rows − 1`` are the clean run; later rows repeat the clean
  prompts' order (row ``i`` compares with clean row ``i mod clean_rows``).
  """
  data = logits.unwrap("batch", "seq", "vocabulary")
  return metric_values(metric, logits, data[:clean_rows])


def metric_values(metric: Metric, logits: pz.nx.NamedArray, clean: Any) -> Any:
  """``metric(logits)`` as ``[batch]`` (checked at trace time).

  ``clean`` (``[clean rows, seq, vocabulary]`` logits of the clean run,
  taken without gradient) is passed to metrics that need a reference;
  ``logits`` row ``i`` compares with clean row ``i mod clean rows``.
  """
  batch = logits.named_shape["batch"]
  if getattr(metric, "needs_reference", False):
    ref = jax.lax.stop_gradient(clean)
    ref = jnp.tile(ref, (batch // ref.shape[0], 1, 1))
    return _rows(metric(logits, reference=ref), batch)
  return _rows(metric(logits), batch)


def tap(model: Any, site_layers: Sequence[tuple[str, Any]]) -> Any:
  """``model`` with a fresh zero `GradientTap` at every ``(site, layers)``.

  A pure rewrite. ``layers`` is None for all layers (and must be None at
  global sites).
  """
  for site, layers in site_layers:
    make = functools.partial(GradientTap.fresh, site)
    model = sites.insert(model, site, layers, make)
  return model


def _taps(model: Any) -> list[GradientTap]:
  return list(pz.select(model).at_instances_of(GradientTap).get_sequence())


def with_deltas(model: Any, deltas: Sequence[Any]) -> Any:
  """The tapped ``model`` with its taps' ``delta`` set, in tap order."""
  it = iter(deltas)
  return (
    pz.select(model)
    .at_instances_of(GradientTap)
    .apply(lambda t: dataclasses.replace(t, delta=next(it)))
  )


def _run(
  metric: Metric, clean_rows: int, unbound: Any, state: list, deltas: list, tokens
):
  """``(metric sum, ([batch] values, state out))`` of the tapped model."""
  variables = [v.unfreeze_as_copy() for v in state]
  model = with_deltas(pz.bind_variables(unbound, variables), deltas)
  logits = model(tokens)
  values = apply_metric(metric, logits, clean_rows)
  return values.sum(), (values, [v.freeze() for v in variables])


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward_backward(
  metric: Metric, clean_rows: int, unbound: Any, state: list, deltas: list, tokens
) -> tuple[Any, list, list]:
  """One jitted forward and backward: ``(values, state out, grads)``."""
  grad = jax.value_and_grad(_run, argnums=4, has_aux=True)
  (_, (values, new_state)), grads = grad(
    metric, clean_rows, unbound, state, deltas, tokens
  )
  return values, [v.value for v in new_state], grads


class Prepared:
  """A tapped model ready to differentiate (frozen parameters, zero deltas).

  Attributes:
    model: The tapped model.
    keys: ``(site, layer)`` of each tap, in tap order.
    shapes: Named shapes of each tap's activation (user-facing axes).
  """

  def __init__(
    self,
    model: Any,
    site_layers: Sequence[tuple[str, Any]],
    tokens,
    rewrite: Callable[[Any], Any] | None = None,
  ):
    self.model = tap(model, site_layers)
    if rewrite is not None:  # a pure rewrite applied after the taps
      self.model = rewrite(self.model)
    taps = _taps(self.model)
    self.keys: list[Key] = [(t.site, t.layer) for t in taps]
    unbound, self.variables = pz.unbind_state_vars(self.model)
    self.unbound = pz.freeze_params(unbound)
    write_only = pz.select(self.model).at_instances_of(CaptureLayer).get_sequence()
    ids = {id(s.saved) for s in write_only}
    self.state = [
      pz.StateVariableValue(value=None if id(v) in ids else v.value, label=v.label)
      for v in self.variables
    ]
    self._slot = {id(t.saved): i for i, t in enumerate(taps)}
    self._index = [
      next(j for j, v in enumerate(self.variables) if v is t.saved) for t in taps
    ]
    self._tokens = tokens

  @functools.cached_property
  def shapes(self) -> list[Any]:
    """Shapes of the taps' activations (one trace of the model, on demand)."""

    def shapes(tokens):
      variables = [v.unfreeze_as_copy() for v in self.state]
      pz.bind_variables(self.unbound, variables)(tokens)
      return [variables[j].value for j in self._index]

    return jax.eval_shape(shapes, self._tokens)

  def zeros(self, batch: int | None = None) -> list[pz.nx.NamedArray]:
    """Zero deltas (``batch`` overrides the batch size)."""
    out = []
    for s in self.shapes:
      shape = dict(s.named_shape)
      if batch is not None:
        shape["batch"] = batch
      out.append(pz.nx.zeros(shape, s.dtype))
    return out

  def run(
    self, metric: Metric, clean_rows: int, deltas: list, tokens, unbound: Any = None
  ) -> tuple:
    """``(values [batch], activations by tap, gradients by tap)``.

    ``unbound`` replaces `unbound` (the same structure with other array
    leaves, e.g. gradient gates switched: no recompilation).
    """
    values, state, grads = forward_backward(
      metric,
      clean_rows,
      self.unbound if unbound is None else unbound,
      self.state,
      deltas,
      tokens,
    )
    return values, [state[j] for j in self._index], grads


@dataclasses.dataclass
class SiteGradients:
  """Activations and metric gradients at sites, on the clean and corrupted run.

  Every value is a NamedArray with the site's user-facing axes plus
  ``batch``/``seq`` (``{batch, seq, embedding}`` at residual sites, ``{batch,
  seq, heads, kv_seq}`` at ``attn.pattern``...), keyed ``(site, layer)``
  (``layer`` None at global sites).

  Attributes:
    clean: Activations of the clean run.
    corrupted: Activations of the corrupted run (empty without one).
    grad_clean: d metric / d activation on the clean run.
    grad_corrupted: The same on the corrupted run.
    metric_clean: ``[batch]`` metric of the clean run.
    metric_corrupted: ``[batch]`` metric of the corrupted run (or None).
  """

  clean: dict[Key, pz.nx.NamedArray]
  corrupted: dict[Key, pz.nx.NamedArray]
  grad_clean: dict[Key, pz.nx.NamedArray]
  grad_corrupted: dict[Key, pz.nx.NamedArray]
  metric_clean: np.ndarray
  metric_corrupted: np.ndarray | None


def prompt_pair(
  model: Any, clean: Any, corrupted: Any, tokenizer: Any = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """``([batch, seq] clean ids, same-shaped corrupted ids or None)``."""
  clean_ids = token_batch(model, clean, tokenizer)
  if corrupted is None:
    return clean_ids, None
  bad_ids = token_batch(model, corrupted, tokenizer)
  if clean_ids.shape != bad_ids.shape:
    raise errors.InputError(
      f"Clean and corrupted prompts must have the same shape; got"
      f" {clean_ids.shape} and {bad_ids.shape}."
    )
  return clean_ids, bad_ids


def site_list(model: Any, names: str | Iterable[str], layers: Any) -> list:
  """``[(site, layers)]`` with layers validated (None at global sites)."""
  names = [names] if isinstance(names, str) else list(names)
  if not names or len(set(names)) != len(names):
    raise errors.SiteError(f"Sites {names}: name each site once, at least one.")
  out = []
  for name in names:
    per_layer = sites.site_info(name).per_layer
    out.append((name, sites.layer_indices(model, layers) if per_layer else None))
  return out


def _split(arr: pz.nx.NamedArray, rows: int, part: int) -> pz.nx.NamedArray:
  return arr[{"batch": pz.slice[part * rows : (part + 1) * rows]}]


def site_gradients(
  model: Any,
  clean: Any,
  corrupted: Any,
  metric: Metric,
  site_names: str | Iterable[str] = "resid_pre",
  layers: Any = None,
  *,
  tokenizer: Any = None,
) -> SiteGradients:
  """Activations and gradients of ``metric`` at sites, in one jitted call.

  Args:
    model: A Penzai transformer LM (not modified).
    clean: Clean prompts (``[batch, seq]`` ids, one prompt, strings with a
      tokenizer).
    corrupted: Corrupted prompts of the same shape, or None.
    metric: ``logits {batch, seq, vocabulary} -> [batch]``: e.g.
      `logit_difference`, `log_prob`, `kl_to_clean`, or a function (hashable:
      pass the same object again to reuse the compilation).
    site_names: Site(s) to differentiate at.
    layers: Layers of the per-layer sites (None: all).
    tokenizer: Needed for string prompts.

  Returns:
    A `SiteGradients`.

  Raises:
    SiteError: Unknown sites or bad layers.
    InputError: Prompts of different shapes; a metric that doesn't return one
      value per row or reads outside the vocabulary/prompt.
  """
  clean_ids, bad_ids = prompt_pair(model, clean, corrupted, tokenizer)
  rows = clean_ids.shape[0]
  ids = clean_ids if bad_ids is None else np.concatenate([clean_ids, bad_ids])
  tokens = named_tokens(ids)
  prepared = Prepared(model, site_list(model, site_names, layers), tokens)
  values, acts, grads = prepared.run(metric, rows, prepared.zeros(), tokens)
  values = np.asarray(values)
  parts = 1 if bad_ids is None else 2
  out: list[dict] = [{} for _ in range(4)]
  for key, act, grad in zip(prepared.keys, acts, grads, strict=True):
    out[0][key], out[2][key] = _split(act, rows, 0), _split(grad, rows, 0)
    if parts == 2:
      out[1][key], out[3][key] = _split(act, rows, 1), _split(grad, rows, 1)
  return SiteGradients(
    clean=out[0],
    corrupted=out[1],
    grad_clean=out[2],
    grad_corrupted=out[3],
    metric_clean=values[:rows],
    metric_corrupted=None if parts == 1 else values[rows:],
  )
