"""Sweeps: many edits x prompts in one fused generation call.

    def edit(model, scale):
      return gs.steer(model, "resid_post", 2, vector, scale)

    out = gs.sweep(model, edit, ["The cat", "A dog"],
                   grid={"scale": [-8.0, -4.0, 0.0, 4.0, 8.0]},
                   max_new_tokens=16, tokenizer=tok)
    out.text[2, 1]                       # scale=0.0 on "A dog" (axes: scale, prompt)
    out.get(scale=8.0, prompt=0).tokens  # one row's GenerationResult-like view

The grid's cartesian product times the prompts becomes one batch: row ``(c,
p)`` is prompt ``p`` under the edit ``edit(model, **c)``. The N edited models
are merged by `gemma_surgery.surgery.rows.stack_rows` (their differing edit
arrays gain a ``batch`` axis), so the sweep runs as ONE jitted generation, and
a sweep over other values of the same grid shape reuses its compilation.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation.api import GenerationResult, generate
from gemma_surgery.surgery.rows import stack_rows

__all__ = ["SweepResult", "sweep", "sweep_model"]


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """What `sweep` returns: the batch's result, indexed by sweep coordinates.

  Attributes:
    axes: Coordinate names in order: the grid's names, then ``"prompt"``.
    coords: The values along each axis (``prompt``: the prompts given).
    result: The `GenerationResult` of the whole batch (rows in C order over
      ``axes``: the last axis varies fastest).
  """

  axes: tuple[str, ...]
  coords: dict[str, list[Any]]
  result: GenerationResult

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(len(self.coords[a]) for a in self.axes)

  @property
  def tokens(self) -> np.ndarray:
    """``[*shape, max_new_tokens]`` new tokens."""
    return self.result.tokens.reshape(*self.shape, -1)

  @property
  def lengths(self) -> np.ndarray:
    """``[*shape]`` new tokens per row, EOS included."""
    return self.result.lengths.reshape(self.shape)

  @property
  def text(self) -> np.ndarray | None:
    """``[*shape]`` object array of decoded text (None without a tokenizer)."""
    if self.result.text is None:
      return None
    out = np.empty(len(self.result.text), object)
    out[:] = self.result.text
    return out.reshape(self.shape)

  @property
  def logits(self) -> pz.nx.NamedArray | None:
    """With ``return_logits=True``: ``{*axes, seq, vocabulary}``."""
    logits = self.result.logits
    if logits is None:
      return None
    split = pz.nx.nmap(lambda a: a.reshape(self.shape))(logits.untag("batch"))
    return split.tag(*self.axes)

  def row(self, **coords: Any) -> int:
    """The batch row of one point, e.g. ``row(scale=4.0, prompt=1)``.

    ``prompt`` is the prompt's index; other axes take a value of the grid.

    Raises:
      InputError: A missing or unknown axis, or a value not on it.
    """
    if set(coords) != set(self.axes):
      raise errors.InputError(
        f"Give one value per sweep axis {list(self.axes)}, got {sorted(coords)}."
      )
    index = []
    for axis in self.axes:
      values = self.coords[axis]
      if axis == "prompt":
        i = coords[axis]
        if not isinstance(i, int) or not 0 <= i < len(values):
          raise errors.InputError(
            f"prompt= is a prompt index in 0..{len(values) - 1}, got {i!r}."
          )
      else:
        matches = [j for j, v in enumerate(values) if v == coords[axis]]
        if not matches:
          raise errors.InputError(f"{axis}={coords[axis]!r} is not in {values}.")
        i = matches[0]
      index.append(i)
    return int(np.ravel_multi_index(index, self.shape))

  def get(self, **coords: Any) -> dict[str, Any]:
    """One point's ``tokens`` (its new tokens), ``text`` and ``row``."""
    row = self.row(**coords)
    n = int(self.result.lengths[row])
    return {
      "row": row,
      "tokens": self.result.tokens[row, :n],
      "text": None if self.result.text is None else self.result.text[row],
    }


def _grid(grid: Mapping[str, Sequence[Any]]) -> tuple[list[str], list[list[Any]]]:
  if not isinstance(grid, Mapping) or not grid:
    raise errors.InputError(
      "grid= maps each swept argument of edit to its values, e.g."
      " {'scale': [-8.0, 0.0, 8.0]}."
    )
  names, values = [], []
  for name, axis in grid.items():
    if name == "prompt" or not isinstance(name, str) or not name.isidentifier():
      raise errors.InputError(
        f"Sweep axis {name!r}: names are keyword names of edit (not 'prompt')."
      )
    if isinstance(axis, str) or not isinstance(axis, Sequence) or not axis:
      raise errors.InputError(f"Sweep axis {name!r} needs a non-empty list of values.")
    names.append(name)
    values.append(list(axis))
  return names, values


def sweep_model(
  model: Any,
  edit: Callable[..., Any],
  grid: Mapping[str, Sequence[Any]],
  repeat: int = 1,
) -> Any:
  """The per-row model of a sweep: ``edit(model, **point)`` for each grid point.

  Rows are the grid's points in C order, each repeated ``repeat`` times
  (once per prompt). See `sweep`.
  """
  names, values = _grid(grid)
  models = []
  for point in itertools.product(*values):
    edited = edit(model, **dict(zip(names, point, strict=True)))
    models.extend([edited] * repeat)
  return stack_rows(models)


def sweep(
  model: Any,
  edit: Callable[..., Any],
  prompts: Sequence[Any],
  *,
  grid: Mapping[str, Sequence[Any]],
  **generate_kwargs: Any,
) -> SweepResult:
  """Generates every grid point x prompt in one fused, compiled batch.

  Args:
    model: A Penzai transformer LM (not modified).
    edit: ``edit(model, **point) -> model``, a rewrite taking one value per
      grid axis as keywords, e.g. ``lambda m, scale: gs.steer(m, site, layer,
      v, scale)``; any surgery (steering, SAE feature edits, head or neuron
      ablation) whose structure does not depend on the values.
    prompts: Strings (with ``tokenizer=``) or token-id lists.
    grid: ``{name: values}``; the batch holds ``prod(len(values)) *
      len(prompts)`` rows.
    **generate_kwargs: Passed to `generate` (``max_new_tokens``,
      ``tokenizer``, ``temperature``, ``return_logits``…).

  Returns:
    A `SweepResult` with axes ``(*grid, "prompt")``.

  Raises:
    InputError: An empty grid or prompt list, a bad axis name.
    SurgeryError: Edits whose structure depends on the value (see
      `stack_rows`).
  """
  if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
    raise errors.InputError("prompts= is a non-empty list of prompts.")
  if "captures" in generate_kwargs:
    raise errors.InputError(
      "sweep takes no captures=: capture on sweep_model(...)'s model instead."
    )
  names, values = _grid(grid)
  stacked = sweep_model(model, edit, grid, repeat=len(prompts))
  rows = list(prompts) * int(np.prod([len(v) for v in values]))
  result = generate(stacked, rows, **generate_kwargs)
  coords = dict(zip(names, values, strict=True))
  coords["prompt"] = list(prompts)
  return SweepResult(axes=(*names, "prompt"), coords=coords, result=result)
