"""Converting a model for fused decoding, cached per model and per structure.

`Prepared` converts a (possibly patched) model to Penzai's
``KVCachingTransformerLM`` once, unbinds *all* variables (parameters and
state) and flattens the result into a static tree structure (`Structure`, a
hashable ``jit`` static argument) plus a list of array leaves, which
`gemma_surgery.generation.decoding.decode` receives. `prepare` caches the
conversion per model object, and per model structure: a new model that
differs only in leaves the conversion carried over (``gs.steer`` with another
scale or vector) reuses the last conversion with those leaves substituted
(`Prepared.rebind`) instead of converting again.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from gemma_surgery.generation import state
from gemma_surgery.generation.inputs import PAD_MARK
from gemma_surgery.model import caching
from gemma_surgery.parallel import sharding
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer, SaveIntermediate

# Label prefix of the state variables the conversion creates (KV caches,
# written tokens, cache index).
_PREFIX = "gemma_surgery.generate"
_CONVERSIONS = 0


def conversion_count() -> int:
  """How many models have been converted to KV-caching form so far."""
  return _CONVERSIONS


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
  """Static description of a prepared model (a hashable ``jit`` static arg).

  Attributes:
    treedef: Tree structure of ``(unbound_model, variable_values)``.
    saver_index: Positions in ``variable_values`` of capture variables.
    saver_keys: ``(site, layer)`` of each `SaveIntermediate` capture, in the
      same order (None for other capture layers, e.g. top-k).
    user_state_index: Positions of other (user) state variables.
    user_state_names: The layer holding each of them (for messages).
    end_index: Position of the cache-end-index variable.
    mesh: Device mesh, or None.
    rules: Sharding rules (with ``mesh``).
  """

  treedef: Any
  saver_index: tuple[int, ...]
  saver_keys: tuple[tuple[str, int | None] | None, ...]
  user_state_index: tuple[int, ...]
  user_state_names: tuple[str, ...]
  end_index: int
  mesh: Mesh | None = None
  rules: tuple | None = None

  def __post_init__(self):
    object.__setattr__(self, "_hash", hash(self._key()))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, Structure) or hash(self) != hash(other):
      return False
    return self._key() == other._key()

  def _key(self) -> tuple:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _result_key(layer: CaptureLayer) -> tuple[str, int | None] | None:
  """Key of a capture in `GenerationResult.captures` (None: not listed)."""
  return (layer.site, layer.layer) if isinstance(layer, SaveIntermediate) else None


def _replicate(leaf: Any, mesh: Mesh | None) -> Any:
  if mesh is None or not isinstance(leaf, jax.Array):
    return leaf
  return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))


class Prepared:
  """A model converted for fused decoding with one batch size and cache length.

  Args:
    model: A Penzai ``TransformerLM`` (patched or not).
    batch: Batch size.
    cache_len: KV-cache (and capture buffer) length.
    mesh: Optional mesh: parameters, KV caches, buffers and prompts are then
      sharded by axis name with ``rules``.
    rules: Sharding rules (default `sharding.DEFAULT_RULES`).
    flat: ``jax.tree_util.tree_flatten(model)`` if already computed.
    kv_cache_dtype: dtype of the key/value caches (None: the activations').
  """

  def __init__(
    self,
    model: Any,
    batch: int,
    cache_len: int,
    mesh: Mesh | None = None,
    rules: Any = None,
    flat: tuple[list[Any], Any] | None = None,
    kv_cache_dtype: Any = None,
  ):
    global _CONVERSIONS
    _CONVERSIONS += 1
    self.model_ref = weakref.ref(model)
    self.batch, self.cache_len, self.mesh = batch, cache_len, mesh
    self.rules = None if rules is None else tuple(rules)
    cached = caching.kv_caching_lm(
      model,
      cache_len=cache_len,
      batch_axes={"batch": batch},
      pad_id=PAD_MARK,
      variable_name_prefix=_PREFIX,
      cache_dtype=kv_cache_dtype,
    )
    unbound, self.variables = pz.unbind_variables(cached)
    savers = pz.select(model).at_instances_of(CaptureLayer).get_sequence()
    saver_of = {id(s.saved): s for s in savers}
    self.savers = savers
    values, refresh, saver_index, user_index = [], [], [], []
    for i, var in enumerate(self.variables):
      if isinstance(var, pz.Parameter):
        refresh.append(i)
        values.append(var.freeze())
      elif id(var) in saver_of:
        saver_index.append(i)
        values.append(pz.StateVariableValue(value=None, label=var.label))
      elif isinstance(var.label, str) and var.label.startswith(_PREFIX + "/"):
        values.append(var.freeze())
      else:
        refresh.append(i)
        user_index.append(i)
        values.append(var.freeze())
    if mesh is not None:
      values = [self._place(v) for v in values]
    unbound_leaves = jax.tree_util.tree_leaves(unbound)
    self.source_leaves, self.source_treedef = flat or jax.tree_util.tree_flatten(model)
    self._slots = _slots(self.source_leaves, unbound_leaves)
    leaves = [_replicate(x, mesh) for x in unbound_leaves]
    self._offsets, self._value_defs = [len(leaves)], []
    for value in values:
      value_leaves, value_def = jax.tree_util.tree_flatten(value)
      self._value_defs.append(value_def)
      leaves += value_leaves
      self._offsets.append(len(leaves))
    self.leaves = leaves
    labels = [v.label for v in self.variables]
    self.structure = Structure(
      treedef=jax.tree_util.tree_structure((unbound, tuple(values))),
      saver_index=tuple(saver_index),
      saver_keys=tuple(
        _result_key(saver_of[id(self.variables[i])]) for i in saver_index
      ),
      user_state_index=tuple(user_index),
      user_state_names=tuple(
        state.owner_names(model, [self.variables[i] for i in user_index])
      ),
      end_index=labels.index(f"{_PREFIX}/cache_end_index"),
      mesh=mesh,
      rules=self.rules,
    )
    self._refresh = refresh
    self._sources = {i: self.variables[i].value for i in refresh}

  def rebind(self, model: Any, flat: tuple[list[Any], Any]) -> Prepared | None:
    """This conversion for another model of the same structure, or None.

    ``model`` must flatten (``flat``) to this one's tree structure, hold the
    same variable objects (parameters, captures, state) and differ only in
    array or scalar leaves the conversion carried over unchanged (a steering
    vector or scale, a mask): those are substituted, nothing is converted.

    Args:
      model: The other model.
      flat: ``jax.tree_util.tree_flatten(model)``.
    """
    new_leaves, treedef = flat
    if treedef != self.source_treedef:
      return None
    leaves = None
    for p, (old, new) in enumerate(zip(self.source_leaves, new_leaves, strict=True)):
      if new is old:
        continue
      slot = self._slots.get(p)
      if slot is None or not _same_kind(old, new):
        return None
      if leaves is None:
        leaves = list(self.leaves)
      leaves[slot] = _replicate(new, self.mesh)
    clone = copy.copy(self)
    clone.model_ref = weakref.ref(model)
    clone.source_leaves = new_leaves
    clone.leaves = self.leaves if leaves is None else leaves
    clone._sources = dict(self._sources)
    return clone

  def _place(self, value: Any) -> Any:
    if self.mesh is None:
      return value
    return sharding.shard_tree(value, self.mesh, self.rules)

  def variable_leaves(self, i: int) -> list[Any]:
    """The placed array leaves of ``self.variables[i]`` as the loop gets them."""
    return self.leaves[self._offsets[i] : self._offsets[i + 1]]

  def current_leaves(self) -> list[Any] | None:
    """The leaves with current parameter/state values (None: must rebuild)."""
    leaves = None
    for i in self._refresh:
      var = self.variables[i]
      if var.value is self._sources[i]:
        continue
      frozen = self._place(var.freeze())
      new_leaves, new_def = jax.tree_util.tree_flatten(frozen)
      if new_def != self._value_defs[i]:
        return None
      if leaves is None:
        leaves = list(self.leaves)
      leaves[self._offsets[i] : self._offsets[i + 1]] = new_leaves
    if leaves is not None:
      self.leaves = leaves
      self._sources = {i: self.variables[i].value for i in self._refresh}
    return self.leaves

  def write_back(self, out: dict[str, Any]) -> None:
    """Stores final values of the model's own (non-capture) state variables.

    A variable whose shape settles only after a decoding step (see
    `gemma_surgery.generation.state`) keeps its prompt value when no step ran.
    """
    finals = list(out["user_state"])
    prefill = out["prefill_state"]
    if prefill and not bool(out["stepped"]):
      for position, value in prefill.items():
        finals[position] = value
    for i, value in zip(self.structure.user_state_index, finals, strict=True):
      base.store(self.variables[i], value.value)
      self._sources[i] = value.value


def _slots(source: list[Any], unbound: list[Any]) -> dict[int, int]:
  """Position in ``unbound`` of each leaf of ``source`` found there once.

  Leaves found by identity; a leaf object that occurs more than once on
  either side has no slot (it can't be substituted unambiguously).
  """
  where: dict[int, list[int]] = collections.defaultdict(list)
  for q, leaf in enumerate(unbound):
    where[id(leaf)].append(q)
  seen = collections.Counter(id(leaf) for leaf in source)
  slots = {}
  for p, leaf in enumerate(source):
    found = where.get(id(leaf), [])
    if len(found) == 1 and seen[id(leaf)] == 1:
      slots[p] = found[0]
  return slots


def _same_kind(old: Any, new: Any) -> bool:
  """Whether ``new`` can replace leaf ``old`` without another compile."""
  arrays = jax.Array | np.ndarray
  if isinstance(old, arrays) and isinstance(new, arrays):
    return old.shape == new.shape and old.dtype == new.dtype
  return type(old) is type(new) and isinstance(old, int | float | bool)


_CACHE: collections.OrderedDict[tuple, Prepared] = collections.OrderedDict()
_CACHE_SIZE = 4
# The latest conversion per model structure (outlives its model: a new
# gs.steer scale each call reuses it). Holds its KV-cache initial values.
_BY_STRUCTURE: collections.OrderedDict[tuple, Prepared] = collections.OrderedDict()
_BY_STRUCTURE_SIZE = 2


def prepare(
  model: Any,
  batch: int,
  cache_len: int,
  mesh: Mesh | None,
  rules: Any,
  kv_cache_dtype: Any = None,
) -> tuple[Prepared, list[Any]]:
  """A cached `Prepared` for ``model`` and its current leaves.

  Entries are keyed by the model object (weakly: an entry goes when its model
  does), batch size, cache length and mesh; at most `_CACHE_SIZE` are kept.
  A model not seen before but of the same structure as a recent one (e.g.
  ``gs.steer`` with another scale) reuses that conversion (`Prepared.rebind`).
  With a mesh, parameters not already placed by axis name are copied onto it
  once per entry: load with ``mesh=`` (or ``shard_model``) to avoid copies.
  """
  key = (
    id(model),
    batch,
    cache_len,
    mesh,
    None if rules is None else tuple(rules),
    None if kv_cache_dtype is None else jnp.dtype(kv_cache_dtype).name,
  )
  entry = _CACHE.get(key)
  if entry is not None and entry.model_ref() is model:
    leaves = entry.current_leaves()
    if leaves is not None:
      _CACHE.move_to_end(key)
      return entry, leaves
  flat = jax.tree_util.tree_flatten(model)
  shape_key = (flat[1], *key[1:])
  entry = None
  try:
    similar = _BY_STRUCTURE.get(shape_key)
  except TypeError:  # a static field that can't be hashed: no structure cache
    similar, shape_key = None, None
  if similar is not None:
    entry = similar.rebind(model, flat)
    if entry is not None and entry.current_leaves() is None:
      entry = None
  if entry is None:
    entry = Prepared(model, batch, cache_len, mesh, rules, flat, kv_cache_dtype)
  if shape_key is not None:
    _BY_STRUCTURE[shape_key] = entry
    _BY_STRUCTURE.move_to_end(shape_key)
    while len(_BY_STRUCTURE) > _BY_STRUCTURE_SIZE:
      _BY_STRUCTURE.popitem(last=False)
  _CACHE[key] = entry
  # Drop the entry (and its arrays) as soon as the model is garbage.
  weakref.finalize(model, _forget, key, entry)
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return entry, entry.leaves


def _forget(key: tuple, entry: Prepared) -> None:
  if _CACHE.get(key) is entry:
    del _CACHE[key]
