"""Penzai's remaining named-axis layers, computed on the data arrays.

The companions of `gemma_surgery.model.positional` (which says why): the
attention softmax, masks and einsums, the residual sum, the GeGLU product,
constant rescales, soft caps and elementwise activations. Each subclasses the
Penzai layer it replaces (same fields, same results; selections on the Penzai
type still match) and falls back to it for inputs with positional axes.
`with_penzai_layers` turns a model's layers of both modules back into
Penzai's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.model import positional
from gemma_surgery.model.positional import (
  data_layout,
  data_order,
  elementwise,
  from_data,
  index_map,
)


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalElementwise(pz.nn.Elementwise):
  """``pz.nn.Elementwise`` applied to the data array directly."""

  def __call__(self, value: Any, **side_inputs) -> Any:
    out = elementwise(self.fn, value)
    return super().__call__(value, **side_inputs) if out is None else out


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalTanhSoftCap(pz.nn.TanhSoftCap):
  """``pz.nn.TanhSoftCap``: ``tanh(x / cap) * cap`` on the data array.

  A cap that is not a scalar takes Penzai's path (its axes are positional).
  """

  def __call__(self, value: Any, **side_inputs) -> Any:
    cap = self.soft_cap
    out = None
    if jnp.ndim(cap) == 0:
      out = elementwise(lambda x: jnp.tanh(x / cap) * cap, value)
    return super().__call__(value, **side_inputs) if out is None else out


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalSoftmax(pz.nn.Softmax):
  """``pz.nn.Softmax`` over the data axes of ``axes``."""

  def __call__(self, inputs: pz.nx.NamedArrayBase, **side_inputs) -> Any:
    layout = data_layout(inputs)
    axes = (self.axes,) if isinstance(self.axes, str) else tuple(self.axes)
    if layout is None or not all(n in layout[1] for n in axes):
      return super().__call__(inputs, **side_inputs)
    x, axis_of = layout
    out = jax.nn.softmax(x, axis=tuple(axis_of[n] for n in axes))
    return from_data(out, data_order(axis_of))


def _mask(layer: Any, x: pz.nx.NamedArrayBase, side_inputs: dict, window: Any) -> Any:
  """``x`` where a causal (windowed if ``window``) mask allows, else masked out."""
  queries = side_inputs[layer.query_positions_input_name]
  keys = side_inputs[layer.kv_positions_input_name].untag(layer.seq_axis)
  keys = keys.tag(layer.kv_seq_axis)

  def apply(q, k, value):
    allowed = (q >= k) & (k >= 0)
    if window is not None:
      allowed = allowed & (q - k < window)
    return jnp.where(allowed, value, layer.masked_out_value)

  return elementwise(apply, queries, keys, x)


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalCausalMask(pz.nn.ApplyCausalAttentionMask):
  """``pz.nn.ApplyCausalAttentionMask`` as one broadcast ``where``."""

  def __call__(self, x: pz.nx.NamedArrayBase, **side_inputs) -> Any:
    out = _mask(self, x, side_inputs, None)
    return super().__call__(x, **side_inputs) if out is None else out


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalSlidingWindowMask(pz.nn.ApplyCausalSlidingWindowAttentionMask):
  """``pz.nn.ApplyCausalSlidingWindowAttentionMask`` as one broadcast ``where``."""

  def __call__(self, x: pz.nx.NamedArrayBase, **side_inputs) -> Any:
    out = _mask(self, x, side_inputs, self.sliding_window_size)
    return super().__call__(x, **side_inputs) if out is None else out


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalNamedEinsum(pz.nn.NamedEinsum):
  """``pz.nn.NamedEinsum`` as one ``jnp.einsum`` on the data arrays.

  Axes the specs don't mention are batch axes, as in Penzai: they must appear
  in every input, and lead the output.
  """

  def _layouts(self, arrays) -> tuple[list, list[str]] | None:
    """Per input ``(data, {index: data axis})``, and the batch axis names."""
    layouts = [data_layout(a) for a in arrays]
    if len(arrays) != len(self.input_axes) or any(x is None for x in layouts):
      return None
    specs = [index_map(s) for s in self.input_axes]
    free = [
      set(axis_of) - set(spec)
      for (_, axis_of), spec in zip(layouts, specs, strict=True)
    ]
    if any(f != free[0] for f in free) or not all(
      set(spec) <= set(axis_of)
      for (_, axis_of), spec in zip(layouts, specs, strict=True)
    ):
      return None  # Penzai's shape check raises the error
    batch = sorted(free[0], key=layouts[0][1].__getitem__)
    indexed = [
      (
        x,
        {
          **{spec[n]: i for n, i in axis_of.items() if n in spec},
          **{f"batch:{n}": axis_of[n] for n in batch},
        },
      )
      for (x, axis_of), spec in zip(layouts, specs, strict=True)
    ]
    return indexed, batch

  def __call__(self, arrays: tuple, **side_inputs) -> Any:
    found = self._layouts(arrays)
    if found is None:
      return super().__call__(arrays, **side_inputs)
    indexed, batch = found
    out = index_map(self.output_axes)
    letters: dict[str, str] = {}

    def subscript(index_of: dict[str, int]) -> str:
      order = sorted(index_of, key=index_of.__getitem__)
      return "".join(letters.setdefault(i, chr(ord("a") + len(letters))) for i in order)

    inputs = ",".join(subscript(index_of) for _, index_of in indexed)
    out_indices = [f"batch:{n}" for n in batch] + list(out.values())
    result = jnp.einsum(
      f"{inputs}->{''.join(letters[i] for i in out_indices)}",
      *(x for x, _ in indexed),
    )
    return from_data(result, batch + list(out))


def _add(a: Any, b: Any) -> Any:
  out = elementwise(jnp.add, a, b)
  return a + b if out is None else out


def _multiply(a: Any, b: Any) -> Any:
  out = elementwise(jnp.multiply, a, b)
  return a * b if out is None else out


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalResidual(pz.nn.Residual):
  """``pz.nn.Residual``: ``delta(x) + x``, added on the data arrays."""

  def __call__(self, value: Any, **side_inputs) -> Any:
    return _add(self.delta(value, **side_inputs), value)


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalBranchAndMultiplyTogether(pz.nn.BranchAndMultiplyTogether):
  """``pz.nn.BranchAndMultiplyTogether``, multiplied on the data arrays."""

  def __call__(self, arg: Any, **side_inputs) -> Any:
    if not self.branches:
      return super().__call__(arg, **side_inputs)  # Penzai's error
    product = self.branches[0](arg, **side_inputs)
    for branch in self.branches[1:]:
      product = _multiply(product, branch(arg, **side_inputs))
    return product


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalConstantRescale(pz.nn.ConstantRescale):
  """``pz.nn.ConstantRescale`` on the data array.

  A factor that is not a scalar takes Penzai's path (its axes are positional).
  """

  def __call__(self, value: Any, **side_inputs) -> Any:
    out = None
    if jnp.ndim(self.by) == 0:
      out = elementwise(lambda x: x * self.by, value)
    return super().__call__(value, **side_inputs) if out is None else out


POSITIONAL_LAYERS = (
  positional.PositionalLinear,
  positional.PositionalRMSStandardize,
  PositionalElementwise,
  PositionalTanhSoftCap,
  PositionalSoftmax,
  PositionalCausalMask,
  PositionalSlidingWindowMask,
  PositionalNamedEinsum,
  PositionalResidual,
  PositionalBranchAndMultiplyTogether,
  PositionalConstantRescale,
)


def with_penzai_layers(model: Any) -> Any:
  """``model`` with each layer of this module replaced by its Penzai parent.

  The same parameters and the same computation, traced through ``pz.nmap``:
  for comparisons (`bench/trace_time.py`) and to rule these layers out when
  debugging. Subclasses of them defined elsewhere are left alone.
  """

  def parent(layer: Any) -> Any:
    base = type(layer).__mro__[1]
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
    return base(**with_penzai_layers(fields))  # layers nested inside too

  return (
    pz.select(model)
    .at_instances_of(POSITIONAL_LAYERS)
    .where(lambda x: type(x) in POSITIONAL_LAYERS)
    .apply(parent)
  )
