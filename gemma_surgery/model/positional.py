"""Penzai layers whose named-axis bookkeeping runs once, not once per axis.

Penzai's `Linear`, `RMSStandardize` and `ApplyRoPE` compute with ``pz.nmap``,
which wraps the positional function in one ``jax.vmap`` per named axis. The
compiled program is the same, but tracing a vmap per axis per layer is most of
the time it takes to trace a model (and so most of a first call). The layers
here are subclasses with the same fields, the same parameters and the same
results; their ``__call__`` reads where each named axis lies in the data array
and calls one ``lax.dot_general`` / ``jnp`` reduction on it. Inputs with
positional axes (which Penzai allows) fall back to the parent's code.

Being subclasses, they match ``pz.select(...).at_instances_of(pz.nn.Linear)``
and every other selection on the Penzai types, and they render the same way in
treescope. The helpers here (`data_layout`, `from_data`, `elementwise`…) also
serve `gemma_surgery.model.positional_layers`, which does the same for the
attention, residual and activation layers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

NamedArray = pz.nx.NamedArray


def data_layout(value: pz.nx.NamedArrayBase) -> tuple[jax.Array, dict[str, int]] | None:
  """The data array and the data axis of each name; None with positional axes."""
  if value.positional_shape:
    return None
  view = value.as_namedarrayview()
  return view.data_array, dict(view.data_axis_for_name)


def from_data(data: jax.Array, names: list[str]) -> NamedArray:
  """A NamedArray whose ``data``'s axes are ``names`` in order."""
  return NamedArray(
    named_axes=collections.OrderedDict(zip(names, data.shape, strict=True)),
    data_array=data,
  )


def data_order(axis_of: dict[str, int]) -> list[str]:
  """The names of ``axis_of`` (name -> data axis) in data-axis order."""
  return sorted(axis_of, key=axis_of.__getitem__)


def broadcastable(x: jax.Array, axis_of: dict[str, int], names: list[str]) -> jax.Array:
  """``x`` (axes ``axis_of``, a subset of ``names``) laid out in ``names``'
  order, with a size-1 axis for each name it lacks: ready to broadcast
  against data whose axes are ``names``."""
  mine = sorted(axis_of, key=names.index)
  x = jnp.transpose(x, [axis_of[n] for n in mine])
  return x.reshape([x.shape[mine.index(n)] if n in axis_of else 1 for n in names])


def _check_sizes(layer_label: str, value_axes: dict, weight_axes: dict, names) -> None:
  for name in names:
    if name not in value_axes:
      raise ValueError(
        f"({layer_label}) the input lacks the axis {name!r} this linear layer"
        f" reads; the input has {dict(value_axes)}."
      )
    if value_axes[name] != weight_axes[name]:
      raise ValueError(
        f"({layer_label}) axis {name!r} has size {value_axes[name]} in the input"
        f" but {weight_axes[name]} in the weights."
      )


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalLinear(pz.nn.Linear):
  """``pz.nn.Linear`` computed with one ``dot_general`` on the data arrays.

  Axes: contracts ``in_axis_names``; names the input and the weights share
  otherwise are parallel (batch) axes, as in Penzai; the output has the
  input's other axes, the parallel axes and the weights' output axes.
  """

  def __call__(self, in_array: pz.nx.NamedArrayBase, **side_inputs) -> NamedArray:
    weights = self.weights.value
    lhs, rhs = data_layout(in_array), data_layout(weights)
    outputs = set(self.out_axis_names)
    if (
      lhs is None
      or rhs is None
      or outputs & set(lhs[1])
      or not jnp.issubdtype(in_array.dtype, jnp.floating)
    ):
      return super().__call__(in_array, **side_inputs)
    (x, x_axis), (w, w_axis) = lhs, rhs
    label = getattr(self.weights, "label", "linear")
    needed = [n for n in data_order(w_axis) if n not in outputs]
    _check_sizes(label, in_array.named_shape, weights.named_shape, needed)
    contracted = tuple(self.in_axis_names)
    parallel = [n for n in needed if n not in contracted]
    x_free = [n for n in data_order(x_axis) if n not in w_axis]
    w_free = [n for n in data_order(w_axis) if n in outputs]
    common = jnp.promote_types(x.dtype, w.dtype)
    if not contracted and not w_free:  # a scale over some of the input's axes
      return elementwise(
        lambda a, b: a.astype(common) * b.astype(common), in_array, weights
      )
    x, w = x.astype(common), w.astype(common)
    out = jax.lax.dot_general(
      x,
      w,
      (
        ([x_axis[n] for n in contracted], [w_axis[n] for n in contracted]),
        ([x_axis[n] for n in parallel], [w_axis[n] for n in parallel]),
      ),
    )
    return from_data(out, parallel + x_free + w_free)


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class PositionalRMSStandardize(pz.nn.RMSStandardize):
  """``pz.nn.RMSStandardize`` as one reduction over the ``across`` data axes."""

  def __call__(self, value: pz.nx.NamedArrayBase, **side_inputs) -> NamedArray:
    layout = data_layout(value)
    across = (self.across,) if isinstance(self.across, str) else tuple(self.across)
    if layout is None or not all(n in layout[1] for n in across):
      return super().__call__(value, **side_inputs)
    x, axis_of = layout
    var = jnp.mean(jnp.square(x), axis=[axis_of[n] for n in across], keepdims=True)
    out = x * jax.lax.rsqrt(var + self.epsilon)
    return from_data(out, data_order(axis_of))


def positions_like(
  positions: pz.nx.NamedArrayBase, names: list[str], embedding_axis: str
) -> jax.Array | None:
  """``positions`` laid out to broadcast against data whose axes are ``names``.

  The embedding axis is kept as a size-1 axis. None when ``positions`` has
  positional axes or names the input lacks (the caller falls back to Penzai).
  """
  layout = data_layout(positions)
  if layout is None or embedding_axis in layout[1]:
    return None
  p, p_axis = layout
  if not all(n in names for n in p_axis):
    return None
  return broadcastable(p, p_axis, names)


def positional_norm(norm: pz.nn.RMSLayerNorm) -> pz.nn.RMSLayerNorm:
  """An ``RMSLayerNorm`` whose two sublayers are the positional ones."""
  standardize, scale = norm.sublayers
  return pz.nn.RMSLayerNorm(
    [
      PositionalRMSStandardize(across=standardize.across, epsilon=standardize.epsilon),
      positional_linear(scale),
    ]
  )


def positional_linear(linear: pz.nn.Layer) -> pz.nn.Layer:
  """The same linear layer (same weights, same axes) as a `PositionalLinear`.

  Anything but a plain ``pz.nn.Linear`` (e.g. Penzai's ``LinearInPlace``) is
  returned unchanged.
  """
  if type(linear) is not pz.nn.Linear:
    return linear
  return PositionalLinear(
    weights=linear.weights,
    in_axis_names=linear.in_axis_names,
    out_axis_names=linear.out_axis_names,
  )


def rotate(
  inputs: pz.nx.NamedArrayBase,
  positions: pz.nx.NamedArrayBase,
  embedding_axis: str,
  max_wavelength: float,
  scale_factor: float = 1.0,
  proportion: float = 1.0,
) -> NamedArray | None:
  """RoPE on the data arrays, or None where the layouts need Penzai's path.

  Args:
    inputs: Queries or keys with ``embedding_axis`` (the head dimension).
    positions: Integer positions (the ``token_positions`` side input) whose
      axes the inputs all have.
    embedding_axis: The rotated axis.
    max_wavelength: RoPE's base.
    scale_factor: Positions are divided by this first (linear RoPE scaling).
    proportion: Fraction of the frequencies that rotate (the rest keep angle 0).

  Returns:
    The rotated inputs, in their dtype, or None.
  """
  layout = data_layout(inputs)
  if layout is None or embedding_axis not in layout[1]:
    return None
  x, axis_of = layout
  names = data_order(axis_of)
  p = positions_like(positions, names, embedding_axis)
  if p is None:
    return None
  last = axis_of[embedding_axis]
  x, p = jnp.moveaxis(x, last, -1), jnp.moveaxis(p, last, -1)
  names.append(names.pop(last))
  head_dim = x.shape[-1]
  index = jnp.arange(head_dim // 2)
  angle = (p.astype(jnp.float32) / scale_factor) / max_wavelength ** (
    2 * index / head_dim
  )
  if proportion != 1.0:
    angle = jnp.where(index < int(proportion * head_dim // 2), angle, 0.0)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  first, second = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
  return from_data(out.astype(inputs.dtype), names)


def elementwise(fn: Callable[..., jax.Array], *args: Any) -> NamedArray | None:
  """``fn`` on the data arrays of ``args``, broadcast by axis name.

  ``args`` are NamedArrays (no positional axes) or scalars/0-d arrays. The
  result's axes are the first NamedArray's, in its data order, then any the
  others add. None where ``pz.nmap`` is needed instead: an argument with
  positional axes, a plain array that is not 0-d (``nmap`` would treat its
  axes as positional), or no NamedArray at all.
  """
  layouts = []
  names: list[str] = []
  for arg in args:
    if isinstance(arg, pz.nx.NamedArrayBase):
      layout = data_layout(arg)
      if layout is None:
        return None
      layouts.append(layout)
      names += [n for n in data_order(layout[1]) if n not in names]
    elif jnp.ndim(arg) == 0:
      layouts.append(None)
    else:
      return None
  if not names:
    return None
  data = [
    arg if layout is None else broadcastable(*layout, names)
    for arg, layout in zip(args, layouts, strict=True)
  ]
  out = fn(*data)
  if out.ndim != len(names):  # fn broadcast to fewer axes: impossible for ufuncs
    raise ValueError(f"{fn} changed the rank of its inputs")
  return from_data(out, names)


def index_map(spec: tuple[str, ...] | dict[str, str]) -> dict[str, str]:
  """A `pz.nn.NamedEinsum` axis spec as ``{axis name: index name}``."""
  return {ax: ax for ax in spec} if isinstance(spec, tuple) else dict(spec)


def reduce_sum(value: pz.nx.NamedArrayBase, names: list[str]) -> NamedArray:
  """``value`` summed over the axes ``names`` (no positional axes)."""
  x, axis_of = data_layout(value)
  out = jnp.sum(x, axis=tuple(axis_of[n] for n in names))
  return from_data(out, [n for n in data_order(axis_of) if n not in names])
