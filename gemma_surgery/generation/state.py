"""The model's own mutable state under the fused decode loop.

A user's Penzai layer may write a ``pz.StateVariable`` (the Penzai tutorials'
``SaveIntermediate``: ``self.saved.value = x``). The fused loop carries every
variable through ``lax.while_loop``, whose carry must keep one structure. A
variable written with the activation changes shape between the prompt
(``seq = prompt length``) and the decoding steps (``seq = 1``), and a
None-initialised one changes structure at its first write; both settle after
one decoding step.

`reshaping` finds such variables abstractly (``jax.eval_shape`` of one step,
no computation), `check_settles` refuses state that keeps changing (e.g. a
growing history) with a `SurgeryError` naming its layer, and `placeholders`
gives the step-shaped zeros the carry starts from when no step runs. The loop
(`gemma_surgery.generation.decoding.decode`) runs its first step before the
``while_loop`` so the carry already has the settled structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors


def owner_names(model: Any, variables: Sequence[pz.StateVariable]) -> list[str]:
  """``"LayerClass (label)"`` of the layer holding each variable.

  Args:
    model: The bound model the variables were unbound from.
    variables: Its variables.
  """
  selection = pz.select(model).at_instances_of(pz.StateVariable)
  owners = {}
  for path, var in selection.selected_by_path.items():
    parent = pz.select(model).at_keypaths([path[:-1]]).get() if path else model
    owners.setdefault(id(var), type(parent).__name__)
  return [f"{owners.get(id(v), 'a layer')} (variable {v.label!r})" for v in variables]


def _signature(value: Any) -> tuple:
  leaves, treedef = jax.tree_util.tree_flatten(value)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def reshaping(
  before: Sequence[Any], after: Sequence[Any], index: Sequence[int]
) -> tuple[int, ...]:
  """Positions in ``index`` whose value's structure or shapes differ.

  Args:
    before: Variable values (arrays or shape structs) before a step.
    after: The same after it (e.g. from ``jax.eval_shape``).
    index: Positions of the model's own state variables.
  """
  return tuple(i for i in index if _signature(before[i]) != _signature(after[i]))


def check_settles(
  first: Sequence[Any],
  second: Sequence[Any],
  index: Sequence[int],
  names: dict[int, str],
) -> None:
  """Raises `SurgeryError` if state keeps changing shape after a step.

  Args:
    first: Variable values after one decoding step (shape structs).
    second: After a second step.
    index: Positions of the reshaping variables.
    names: Owner description of each position.
  """
  for i in index:
    if _signature(first[i]) != _signature(second[i]):
      raise errors.SurgeryError(
        f"{names[i]} holds state whose shape changes at every decoding step"
        f" ({_describe(first[i])} then {_describe(second[i])}); gs.generate's"
        " fused loop carries only state that keeps one shape once decoding"
        " has started. Store fixed-shape values (e.g. the last position,"
        " x[{'seq': -1}]), capture with gs.capture (fixed buffers over the"
        " whole run), or decode with penzai's Python loop"
        " (simple_decoding_loop.temperature_sample_pyloop)."
      )


def _describe(value: Any) -> str:
  value = getattr(value, "value", value)
  shapes = [
    dict(x.named_shape) if isinstance(x, pz.nx.NamedArray) else tuple(x.shape)
    for x in jax.tree_util.tree_leaves(
      value, is_leaf=lambda x: isinstance(x, pz.nx.NamedArray)
    )
  ]
  return str(shapes[0] if len(shapes) == 1 else shapes)


def placeholders(shapes: Any) -> Any:
  """Zeros with the structure, shapes and dtypes of ``shapes``."""
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def settle(
  index: Sequence[int], names: Sequence[str], cond: Any, body: Any, carry: tuple
) -> tuple:
  """Runs the first decoding step before the loop if the model's state needs it.

  Args:
    index: Positions of the model's own state in ``carry[1]`` (the
      variable values).
    names: The layer holding each (for messages).
    cond: The loop's condition.
    body: The loop's body (one decoding step).
    carry: The loop's initial carry (``carry[1]`` holds the values).

  Returns ``(carry, prefill_state, stepped)``: the loop's initial carry, the
  prompt-time values of state that takes its decoding shape only in the
  first step (by position in ``values``; empty if none), and whether that
  step ran (it runs iff the loop would run it). When it does not run, such
  state holds zeros of its decoding shape and its prompt-time value is the
  final one.

  Raises:
    SurgeryError: State that keeps changing shape (see `check_settles`).
  """
  if not index:
    return carry, {}, jnp.bool_(True)
  values = carry[1]
  stepped_shapes = jax.eval_shape(body, carry)
  changed = reshaping(values, stepped_shapes[1], index)
  if not changed:
    return carry, {}, jnp.bool_(True)
  owners = dict(zip(index, names, strict=True))
  again = jax.eval_shape(body, stepped_shapes)
  check_settles(stepped_shapes[1], again[1], changed, owners)
  blank = placeholders([stepped_shapes[1][i] for i in changed])

  def skip(carry):
    values = list(carry[1])
    for i, value in zip(changed, blank, strict=True):
      values[i] = value
    return (carry[0], values, *carry[2:])

  stepped = cond(carry)
  carry = jax.lax.cond(stepped, body, skip, carry)
  return carry, {i: values[i] for i in changed}, stepped


def one_more_step(step: Any, values: list, prefill_state: dict, stepped: Any) -> list:
  """``step(values)``, from the prompt-time state where no step ran.

  Args:
    step: Runs the model once on variable values and returns the new ones.
    values: The values after the loop.
    prefill_state: `settle`'s prompt-time values (empty: nothing reshapes).
    stepped: `settle`'s flag: whether the first step ran.
  """
  if not prefill_state:
    return step(values)

  def from_prefill(values):
    values = list(values)
    for i, value in prefill_state.items():
      values[i] = value
    return step(values)

  return jax.lax.cond(stepped, step, from_prefill, values)
