"""One attribution pass: a clean forward, a corrupted forward and backward.

AtP needs the clean activations, the corrupted activations and the metric's
gradient on the corrupted run only. `run_pass` does exactly that, for every
tapped site at once, in one jitted call:

1. the clean prompts forward (no backward): the clean activations, the clean
   metric and, for reference metrics (`gradients.KLToClean`), the clean
   logits;
2. the corrupted prompts forward and backward through the zero taps: the
   corrupted activations and ``dM/da``;
3. on device, ``(a_clean − a_corrupt) · dM/da`` summed to the requested
   axes, and whether the piece's activation changed at all.

The work is one forward plus one forward-and-backward of one run — about 2
forwards of the clean and corrupted prompts together — and only the small
effect tables need to reach the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery.analysis import gradients
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery.layers.tap import GradientTap


def sum_keep(x: pz.nx.NamedArray, keep: tuple[str, ...]) -> Any:
  """``x`` summed over every axis but ``keep``, as an array in ``keep`` order."""
  drop = [a for a in x.named_shape if a not in keep]
  return pz.nx.nmap(jnp.sum)(x.untag(*drop)).unwrap(*keep)


def changed_keep(delta: pz.nx.NamedArray, keep: tuple[str, ...]) -> Any:
  """Whether ``delta`` is non-zero anywhere in each ``keep`` piece (bool)."""
  drop = [a for a in delta.named_shape if a not in keep]
  return pz.nx.nmap(jnp.any)((delta != 0).untag(*drop)).unwrap(*keep)


def coarsen(
  x: np.ndarray, reduce: Any, keep: tuple[str, ...], to: tuple[str, ...]
) -> np.ndarray:
  """``x`` over ``keep`` axes reduced (``np.sum``, ``np.any``) to ``to``'s
  axes, a subset of ``keep`` in the same order."""
  drop = tuple(i for i, a in enumerate(keep) if a not in to)
  return reduce(x, axis=drop) if drop else x


@dataclasses.dataclass
class Pass:
  """The result of `run_pass` (lists in the taps' order, `Prepared.keys`).

  Attributes:
    clean_values: ``[rows]`` metric of the clean run.
    corrupted_values: ``[rows]`` metric of the corrupted run.
    effects: Per tap, ``(a_clean − a_corrupt) · dM/da`` summed to ``keep``
      (mean over the batch rows).
    changed: Per tap, whether the piece's activation differs between the
      runs (False: patching it is a no-op, its exact effect is 0).
    clean: Per tap, the clean activation (on device).
    corrupted: Per tap, the corrupted activation.
    grads: Per tap, dM/da on the corrupted run.
  """

  clean_values: np.ndarray
  corrupted_values: np.ndarray
  effects: list[np.ndarray]
  changed: list[np.ndarray]
  clean: list[pz.nx.NamedArray]
  corrupted: list[pz.nx.NamedArray]
  grads: list[pz.nx.NamedArray]


def _tap_values(model: Any) -> list[pz.nx.NamedArray]:
  taps = pz.select(model).at_instances_of(GradientTap).get_sequence()
  return [t.saved.value for t in taps]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pass(metric, keep, unbound, state, clean_tokens, bad_tokens):
  variables = [v.unfreeze_as_copy() for v in state]
  model = pz.bind_variables(unbound, variables)
  clean_logits = model(clean_tokens)
  reference = clean_logits.unwrap("batch", "seq", "vocabulary")
  clean_values = gradients.metric_values(metric, clean_logits, reference)
  clean_acts = _tap_values(model)
  zeros = [pz.nx.zeros(dict(a.named_shape), a.dtype) for a in clean_acts]

  def corrupted(deltas):
    variables = [v.unfreeze_as_copy() for v in state]
    model = gradients.with_deltas(pz.bind_variables(unbound, variables), deltas)
    values = gradients.metric_values(metric, model(bad_tokens), reference)
    return values.sum(), (values, _tap_values(model))

  grad = jax.value_and_grad(corrupted, has_aux=True)
  (_, (bad_values, bad_acts)), grads = grad(zeros)
  rows = clean_tokens.named_shape["batch"]
  effects, changed = [], []
  for a, b, g in zip(clean_acts, bad_acts, grads, strict=True):
    delta = a - b
    product = delta.astype(jnp.promote_types(delta.dtype, jnp.float32)) * g
    effects.append(sum_keep(product, keep) / rows)
    changed.append(changed_keep(delta, keep))
  return clean_values, bad_values, effects, changed, clean_acts, bad_acts, grads


def run_pass(
  prepared: gradients.Prepared,
  metric: gradients.Metric,
  keep: tuple[str, ...],
  clean_tokens: pz.nx.NamedArray,
  bad_tokens: pz.nx.NamedArray,
) -> Pass:
  """AtP products of every tap of ``prepared`` (module doc), in one call.

  Args:
    prepared: The tapped model (`gradients.Prepared`).
    metric: ``logits -> [batch]``.
    keep: Axes the effects keep (e.g. ``("seq",)``, ``("heads",)``).
    clean_tokens: ``{batch, seq}`` clean prompts.
    bad_tokens: Corrupted prompts of the same shape.

  Returns:
    A `Pass`.
  """
  out = _pass(metric, keep, prepared.unbound, prepared.state, clean_tokens, bad_tokens)
  values, bad, effects, changed, clean_acts, bad_acts, grads = out
  return Pass(
    clean_values=to_numpy(values),
    corrupted_values=to_numpy(bad),
    effects=[to_numpy(e) for e in effects],
    changed=[to_numpy(c) for c in changed],
    clean=clean_acts,
    corrupted=bad_acts,
    grads=grads,
  )
