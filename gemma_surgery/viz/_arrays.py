"""Input normalization: numpy arrays, JAX arrays and Penzai NamedArrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.host import to_numpy as host_numpy


def to_numpy(x: Any, axes: Sequence[str], what: str) -> np.ndarray:
  """Converts `x` to a float or string numpy array with the documented axes.

  A Penzai `NamedArray` (or view) is unwrapped in the order `axes`; a `batch`
  axis of size 1 that `axes` does not name is dropped. Plain arrays must have
  `len(axes)` dimensions already in that order.

  Args:
    x: The input.
    axes: Axis names, in the order the renderer wants them.
    what: The argument's name, for error messages.

  Returns:
    A numpy array with `len(axes)` dimensions.

  Raises:
    InputError: On a wrong number of dimensions or mismatched axis names.
  """
  if hasattr(x, "named_shape") and hasattr(x, "unwrap"):
    shape = dict(x.named_shape)
    if "batch" in shape and "batch" not in axes:
      if shape["batch"] != 1:
        raise InputError(
          f"{what}: has a batch axis of size {shape['batch']}; select one "
          f"example first, e.g. x[{{'batch': 0}}]"
        )
      x = x[{"batch": 0}]
      shape.pop("batch")
    if set(shape) != set(axes) or x.positional_shape:
      raise InputError(
        f"{what}: expected named axes {tuple(axes)}, got {shape} "
        f"with positional shape {x.positional_shape}"
      )
    x = x.unwrap(*axes)
  arr = host_numpy(x)
  if arr.dtype.kind not in "UO":
    arr = arr.astype(np.float64)
  if arr.ndim != len(axes):
    raise InputError(
      f"{what}: expected {len(axes)} dimensions {tuple(axes)}, got shape {arr.shape}"
    )
  return arr


def check_len(items: Sequence[Any], n: int, what: str, axis: str) -> list[Any]:
  """Checks that `items` has `n` entries (the size of `axis`)."""
  items = list(items)
  if len(items) != n:
    raise InputError(
      f"{what}: expected {n} entries (the {axis} axis), got {len(items)}"
    )
  return items


def finite_range(values: np.ndarray) -> tuple[float, float]:
  """(min, max) over finite entries; (0, 1) when there are none."""
  v = np.asarray(values, dtype=np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return 0.0, 1.0
  return float(v.min()), float(v.max())
