"""Per-row edits: one model whose row ``i`` carries edit ``i``.

    models = [gs.steer(model, "resid_post", 3, v, s) for s in (-8.0, 0.0, 8.0)]
    batched = gs.surgery.stack_rows(models)   # vector/scale leaves get {batch: 3}
    gs.generate(batched, [prompt] * 3, max_new_tokens=16)   # row i == models[i]

Every surgery layer combines its array fields with the activation by named
axes, so an edit parameter with a ``batch`` axis (a ``{batch, embedding}``
steering vector, a ``{batch}`` scale, ``{batch, heads}`` ablation masks,
``{batch, latents}`` SAE feature clamps, ``{batch, neurons}`` neuron factors)
applies row ``i``'s slice to row ``i`` of the activation. `stack_rows` builds
such a model from N edited copies of one model: leaves that are the same
object in all N (the model's parameters, an SAE's weights, a vector shared by
every copy) stay shared; every other array leaf of a surgery layer is stacked
along a new leading ``batch`` axis. The stacked leaves are ordinary array
leaves: a model stacked from other values of the same edits has the same
structure, so the fused generation loop does not recompile.

Only what differs is visited: subtrees shared by every model (the same
object: rewrites copy just the path to what they insert) are kept as they
are, so stacking N steered copies costs little more than N short paths.

Row independence: a layer that mixes rows (mean ablation over ``batch``)
would make row ``i`` depend on the others and is refused, as are capture
layers (insert captures after stacking: one capture then records every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.core import tree_util as pz_tree_util

from gemma_surgery import errors
from gemma_surgery.surgery.layers.ablate import Ablate

__all__ = ["stack_rows"]


def _is_leaf(x: Any) -> bool:
  return isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView | pz.AbstractVariable)


def _is_ablate(x: Any) -> bool:
  return isinstance(x, Ablate)


def stack_rows(models: Sequence[Any]) -> Any:
  """One model applying ``models[i]``'s edits to batch row ``i``.

  Args:
    models: N >= 1 rewrites of the same model with the same surgery
      structure (same layers at the same sites with the same static
      settings; only array values differ), e.g. ``[gs.steer(m, site, layer,
      v, s) for s in scales]``. Not modified.

  Returns:
    A model whose differing surgery leaves have a leading ``batch`` axis of
    size N (shared leaves stay as they are). Run it on exactly N rows.

  Raises:
    SurgeryError: No models, differing structures, differing parameters or
      state variables (e.g. captures inserted before stacking), a differing
      leaf that already has a ``batch`` axis of size > 1 or a positional
      axis, or a layer that mixes rows (mean ablation over ``batch``).
  """
  models = list(models)
  if not models:
    raise errors.SurgeryError("stack_rows needs at least one model.")
  # A plain flatten stopping at Ablate layers: a pz.select over the whole
  # model costs several times more (it rebuilds the tree).
  layers = jax.tree_util.tree_leaves(models[0], is_leaf=_is_ablate)
  for layer in layers:
    if not _is_ablate(layer):
      continue
    if layer.mode == "mean" and "batch" in layer.mean_axes:
      raise errors.SurgeryError(
        f"stack_rows: the mean ablation at {layer.site!r} averages over batch,"
        " so each row would depend on the others. Use mean_axes=('seq',) or a"
        " mean computed beforehand (mode='value')."
      )
  return _merge(models, len(models))


def _merge(nodes: list[Any], n: int) -> Any:
  """One subtree position across the N models (see `stack_rows`).

  A subtree that is the same object in every model (all of the model that
  the edits did not touch, since rewrites copy only the paths to what they
  insert) is kept without looking inside; elsewhere the models are compared
  one level at a time and their leaves merged by `_stack`.
  """
  first = nodes[0]
  if all(node is first for node in nodes):
    return first
  flats = [
    None if _is_leaf(node) else pz_tree_util.tree_flatten_exactly_one_level(node)
    for node in nodes
  ]
  if all(flat is None for flat in flats):
    return _stack(tuple(nodes), n)
  treedef = None if flats[0] is None else flats[0][1]
  for i, flat in enumerate(flats[1:], start=1):
    if flat is None or treedef is None or flat[1] != treedef:
      raise errors.SurgeryError(
        f"stack_rows: model {i} has another structure than model 0 (other"
        " layers, sites or static settings such as positions=/relative=);"
        " per-row edits may differ only in array values."
      )
  columns = zip(*([child for _, child in flat[0]] for flat in flats), strict=True)
  return treedef.unflatten([_merge(list(column), n) for column in columns])


def _stack(column: tuple[Any, ...], n: int) -> Any:
  """One leaf position across the N models: shared, or stacked over batch."""
  first = column[0]
  if all(leaf is first for leaf in column):
    return first
  if isinstance(first, pz.AbstractVariable):
    raise errors.SurgeryError(
      f"stack_rows: the models hold different variables ({first.label!r}…):"
      " they must be rewrites of one model, and captures (state variables)"
      " must be inserted after stacking."
    )
  if isinstance(first, pz.nx.NamedArray | pz.nx.NamedArrayView):
    shapes = {(tuple(a.named_shape.items()), a.positional_shape) for a in column}
    if len(shapes) != 1 or first.positional_shape:
      raise errors.SurgeryError(
        f"stack_rows: an edit array has differing or positional shapes across"
        f" the models ({sorted(str(s) for s in shapes)})."
      )
    batch = first.named_shape.get("batch")
    if batch is not None and batch != 1:
      raise errors.SurgeryError(
        f"stack_rows: an edit array already has batch={batch}; per-row"
        " stacking gives it batch=N. Give each model a batch-free (or"
        " batch=1) value."
      )
    column = tuple(a[{"batch": 0}] if batch is not None else a for a in column)
    return pz.nx.stack(column, "batch")
  arrays = [
    np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf for leaf in column
  ]
  if any(np.ndim(a) for a in arrays):
    raise errors.SurgeryError(
      "stack_rows: an edit leaf is a positional array; use NamedArrays (or"
      " scalars) for per-row values."
    )
  return pz.nx.wrap(jnp.stack([jnp.asarray(a) for a in arrays])).tag("batch")
