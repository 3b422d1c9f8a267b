"""Host-side checks of model inputs.

These run on concrete values (lists, NumPy arrays, JAX arrays, Penzai
`NamedArray`s), never inside `jax.jit`: they convert to NumPy and so need the
values on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.host import to_numpy

_MAX_SHOWN = 5


def _is_named_array(x: Any) -> bool:
  """True for Penzai `NamedArray`/`NamedArrayView` (duck-typed, no import)."""
  return (
    hasattr(x, "named_shape")
    and hasattr(x, "positional_shape")
    and hasattr(x, "with_positional_prefix")
  )


def _is_tracer(x: Any) -> bool:
  return any("Tracer" in cls.__name__ for cls in type(x).__mro__)


def to_host_array(x: Any) -> tuple[np.ndarray, tuple[str, ...] | None]:
  """Converts token ids to a NumPy array on the host.

  Args:
    x: A Python int or (nested) list, NumPy array, JAX array, or Penzai
      `NamedArray`/`NamedArrayView`.

  Returns:
    `(array, axis_labels)`. For named arrays, `array` holds the positional axes
    first, then the named axes, and `axis_labels` names every axis of it
    (positional axes as `'<pos0>'`, ...). Otherwise `axis_labels` is None.

  Raises:
    InputError: If `x` is a JAX tracer (abstract value inside `jit`/`vmap`),
      which cannot be inspected on the host.
  """
  data = x.data_array if _is_named_array(x) else x
  if _is_tracer(x) or _is_tracer(data):
    raise InputError(
      "cannot check token ids inside jax.jit/vmap (got a tracer); check the "
      "concrete ids before entering the transformed function"
    )
  if not _is_named_array(x):
    return to_numpy(x), None
  prefixed = x.with_positional_prefix()
  n_pos = len(prefixed.positional_shape)
  labels = tuple(f"<pos{i}>" for i in range(n_pos))
  labels += tuple(str(name) for name in prefixed.named_axes)
  return to_numpy(prefixed.data_array), labels


def _format_position(index: tuple[int, ...], labels: tuple[str, ...] | None) -> str:
  if labels is not None:
    inner = ", ".join(f"{k}={int(v)}" for k, v in zip(labels, index, strict=True))
    return "{" + inner + "}"
  if len(index) == 1:
    return str(int(index[0]))
  return "(" + ", ".join(str(int(v)) for v in index) + ")"


def check_token_ids(ids: Any, vocab_size: int) -> None:
  """Checks that every token id is an integer in `[0, vocab_size)`.

  Args:
    ids: Token ids of any shape (e.g. axes `batch`, `seq`): a Python int or
      (nested) list, NumPy array, JAX array, or Penzai `NamedArray`. Must be
      concrete (not traced).
    vocab_size: Number of rows of the embedding table; valid ids are
      `0 .. vocab_size - 1`.

  Raises:
    InputError: If `vocab_size` is not a positive integer, if `ids` has a
      non-integer dtype (floats, bools, objects), or if any id is out of
      range. The message names the first few offending ids, their positions
      and the valid range.
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
    raise InputError(f"vocab_size must be a positive int, got {vocab_size!r}")
  if vocab_size <= 0:
    raise InputError(f"vocab_size must be positive, got {vocab_size}")
  try:
    arr, labels = to_host_array(ids)
  except InputError:
    raise
  except (TypeError, ValueError) as e:
    raise InputError(
      f"token ids must be an integer array, could not convert {type(ids).__name__}: {e}"
    ) from e
  if arr.size == 0:
    return
  if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
    raise InputError(
      f"token ids must have an integer dtype, got {arr.dtype} (shape "
      f"{arr.shape}); cast with .astype(np.int32) if the values are whole "
      "numbers"
    )
  bad = (arr < 0) | (arr >= vocab_size)
  n_bad = int(np.count_nonzero(bad))
  if n_bad == 0:
    return
  where = np.argwhere(bad)[:_MAX_SHOWN]
  shown = ", ".join(
    f"id {int(arr[tuple(idx)])} at position {_format_position(tuple(idx), labels)}"
    for idx in where
  )
  more = f" (showing the first {len(where)})" if n_bad > len(where) else ""
  raise InputError(
    f"{n_bad} token id(s) outside the vocabulary range [0, {vocab_size}){more}: {shown}"
  )
