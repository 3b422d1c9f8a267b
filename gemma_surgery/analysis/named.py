"""Named axes for analysis results: numpy fields, `NamedArray` views.

Analyses hand back numpy (easy to print, plot and index), and every result
also knows the axis names of its arrays, so the named-axis style of the rest
of the library carries through: ``result.named()`` is a dict of
``pz.nx.NamedArray`` s, one per array field (``result.axes()`` lists the
names), and functions that return a bare array take ``named=True`` (and
accept NamedArrays back). Names follow Penzai's where they exist (``batch``,
``seq``, ``kv_seq``, ``heads``); the analyses add:

* ``layer``: one entry per analysed layer (the result's ``layers`` say which);
* ``stage``: one entry per residual stage of the logit lens;
* ``top_k``: rank among the top-k (most likely tokens, most active neurons);
* ``kind``: a neuron's weight direction (``gate``, ``up``, ``down``).

The views hold JAX arrays, so float64 fields (``change``, masked patterns)
arrive in float32 unless ``jax_enable_x64`` is set.

`token_array` and `check_pattern` are the checks analyses run on arrays
handed back to them (tokens; an attention pattern with its tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from penzai import pz
from treescope import repr_lib

from gemma_surgery import errors, viz
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery.layers.topk import TOPK_AXIS

LAYER = "layer"
STAGE = "stage"
TOP_K = TOPK_AXIS
KIND = "kind"
TOKEN_AXES = ("batch", "seq")
PATTERN_AXES = (LAYER, "batch", "heads", "seq", "kv_seq")
SCORE_AXES = (LAYER, "heads")
_TOLERANCE = 1e-3  # float32 softmax round-off allowed on [0, 1] and row sums


def wrap(array: Any, axes: tuple[str, ...]) -> pz.nx.NamedArray:
  """``array`` as a NamedArray whose axes are ``axes``, in order."""
  array = np.asarray(array)
  if array.ndim != len(axes):
    raise errors.InputError(
      f"An array of shape {array.shape} can't carry the {len(axes)} axes {axes}."
    )
  return pz.nx.wrap(jnp.asarray(array)).tag(*axes)


def unwrap(array: Any, axes: tuple[str, ...], name: str) -> np.ndarray:
  """A numpy array with ``axes`` in order, from numpy or a NamedArray.

  Raises:
    InputError: A NamedArray whose axes are not exactly ``axes``.
  """
  if not hasattr(array, "named_shape"):
    return to_numpy(array)
  if array.positional_shape or set(array.named_shape) != set(axes):
    raise errors.InputError(
      f"{name}: expected a NamedArray with axes {axes}; got"
      f" {dict(array.named_shape)} (positional shape {array.positional_shape})."
    )
  return to_numpy(array.unwrap(*axes))


class NamedResult:
  """Mixin for result dataclasses: `named` views of the array fields.

  Subclasses list ``AXES``: ``{field: axis names}`` for every array field.
  """

  AXES: ClassVar[dict[str, tuple[str, ...]]] = {}

  def axes(self) -> dict[str, tuple[str, ...]]:
    """``{field: axis names}`` of this result's array fields."""
    return dict(self.AXES)

  def named(self) -> dict[str, pz.nx.NamedArray]:
    """``{field: NamedArray}``: each array field with its axis names."""
    return {field: wrap(getattr(self, field), ax) for field, ax in self.axes().items()}

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
    """Treescope shows the array fields as NamedArrays (axis names visible)."""
    attributes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    attributes.update(self.named())
    return repr_lib.render_object_constructor(
      type(self), attributes, path, subtree_renderer
    )

  def heatmap(self, field: str | None = None, **kwargs: Any) -> viz.Heatmap:
    """A `gemma_surgery.viz.heatmap` of a 2-D array field, titled with its
    axis names (rows labelled by ``layers`` where the result has them).

    Args:
      field: The field (default: the first 2-D one).
      **kwargs: Passed to `gemma_surgery.viz.heatmap` (overriding defaults).

    Raises:
      InputError: No such 2-D field.
    """
    axes = self.axes()
    flat = [f for f, ax in axes.items() if len(ax) == 2]
    field = field if field is not None else (flat[0] if flat else None)
    if field not in flat:
      raise errors.InputError(
        f"heatmap needs a 2-D array field; got {field!r}, valid: {flat}."
      )
    row, col = axes[field]
    defaults = {
      "row_title": row,
      "col_title": col,
      "value_label": field,
      "title": f"{type(self).__name__}.{field}",
    }
    if row == LAYER and hasattr(self, "layers"):
      defaults["row_labels"] = list(self.layers)
    return viz.heatmap(getattr(self, field), **{**defaults, **kwargs})


def token_array(tokens: Any) -> np.ndarray:
  """``[batch, seq]`` integer ids from numpy, JAX or a ``{batch, seq}`` NamedArray."""
  array = unwrap(tokens, TOKEN_AXES, "tokens")
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
    raise errors.InputError(
      f"tokens must be [batch, seq] integer ids; got shape {array.shape}, dtype"
      f" {array.dtype}."
    )
  return array


def check_pattern(pattern: Any, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
  """Checks that a pattern and its tokens belong together.

  Returns:
    ``(pattern [layer, batch, heads, seq, kv_seq], tokens [batch, seq])``.

  Raises:
    InputError: Wrong ranks, batch or sequence sizes that differ, or values
      that are not attention weights.
  """
  ids = token_array(tokens)
  p = unwrap(pattern, PATTERN_AXES, "pattern")
  if p.ndim != 5:
    raise errors.InputError(
      f"pattern must be [layer, batch, heads, query, key] (from"
      f" attention_patterns); got shape {p.shape}."
    )
  batch, seq = ids.shape
  if p.shape[1] != batch or p.shape[3:] != (seq, seq):
    raise errors.InputError(
      f"pattern and tokens don't belong together: the pattern has batch"
      f" {p.shape[1]}, {p.shape[3]} queries and {p.shape[4]} keys, the tokens"
      f" have batch {batch} and seq {seq} (pass the tokens the pattern was"
      " computed on)."
    )
  sums = p.sum(-1)
  if (
    not np.isfinite(p).all()
    or p.min(initial=0.0) < -_TOLERANCE
    or sums.max(initial=0.0) > 1 + _TOLERANCE
  ):
    raise errors.InputError(
      "pattern must hold attention weights: finite, each in [0, 1], each"
      f" query's weights summing to at most 1; got values in [{p.min():.4g},"
      f" {p.max():.4g}] and row sums up to {sums.max():.4g}."
    )
  return p, ids
