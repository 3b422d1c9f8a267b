"""The fused decode loop: one ``jax.jit`` over prefill and every decoding step.

`Prepared` converts a (possibly patched) model to Penzai's
``KVCachingTransformerLM`` once, unbinds *all* variables (parameters and
state) and flattens the result into a static tree structure plus a list of
array leaves. `decode` passes only those leaves to its jitted body; the
structure is a static argument with a precomputed hash (`Structure`). So

* parameters are frozen values, not mutable ``Parameter`` objects threaded
  through each call (they are re-read from the model's ``Parameter`` objects
  on every call, by identity, so in-place updates are seen);
* steering vectors, scales and masks are ordinary leaves: changing them never
  recompiles, while a structural change (another layer, another site) gives a
  new structure and a new compile;
* a repeated call on the same model costs a cache lookup and a dispatch with
  a flat list of arrays, not a walk over the model's pytree.

Inside `decode` the prompt runs through the model with its `SaveIntermediate`
layers, their values become fixed ``{batch, seq: cache_len, ...}`` buffers
(`gemma_surgery.surgery.layers.buffer`), and a ``lax.while_loop`` feeds back
one token per step through the same model with `CaptureBuffer` layers until
every row has emitted EOS or ``max_new_tokens`` tokens exist. Every call
receives the side input ``generation_prompt_end`` (``{batch}`` int: the number
of non-pad prompt tokens), so layers know which positions are generated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from gemma_surgery.generation import sampling, state
from gemma_surgery.generation.inputs import PAD_MARK
from gemma_surgery.model import caching
from gemma_surgery.parallel import sharding
from gemma_surgery.surgery.layers import base, buffer
from gemma_surgery.surgery.layers.capture import CaptureLayer, SaveIntermediate

# Label prefix of the state variables the conversion creates (KV caches,
# written tokens, cache index).
_PREFIX = "gemma_surgery.generate"
_TRACES = 0


def trace_count() -> int:
  """How many times the decode loop has been traced (= compiled) so far."""
  return _TRACES


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
  """

  def __init__(
    self,
    model: Any,
    batch: int,
    cache_len: int,
    mesh: Mesh | None = None,
    rules: Any = None,
  ):
    self.model_ref = weakref.ref(model)
    self.batch, self.cache_len, self.mesh = batch, cache_len, mesh
    self.rules = None if rules is None else tuple(rules)
    cached = caching.kv_caching_lm(
      model,
      cache_len=cache_len,
      batch_axes={"batch": batch},
      pad_id=PAD_MARK,
      variable_name_prefix=_PREFIX,
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


_CACHE: collections.OrderedDict[tuple, Prepared] = collections.OrderedDict()
_CACHE_SIZE = 4


def prepare(
  model: Any, batch: int, cache_len: int, mesh: Mesh | None, rules: Any
) -> tuple[Prepared, list[Any]]:
  """A cached `Prepared` for ``model`` and its current leaves.

  Entries are keyed by the model object (weakly: an entry goes when its model
  does), batch size, cache length and mesh; at most `_CACHE_SIZE` are kept.
  With a mesh, parameters not already placed by axis name are copied onto it
  once per entry: load with ``mesh=`` (or ``shard_model``) to avoid copies.
  """
  key = (id(model), batch, cache_len, mesh, None if rules is None else tuple(rules))
  entry = _CACHE.get(key)
  if entry is not None and entry.model_ref() is model:
    leaves = entry.current_leaves()
    if leaves is not None:
      _CACHE.move_to_end(key)
      return entry, leaves
  entry = Prepared(model, batch, cache_len, mesh, rules)
  _CACHE[key] = entry
  # Drop the entry (and its arrays) as soon as the model is garbage.
  weakref.finalize(model, _forget, key, entry)
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return entry, entry.leaves


def _forget(key: tuple, entry: Prepared) -> None:
  if _CACHE.get(key) is entry:
    del _CACHE[key]


def _constrain(array: pz.nx.NamedArray, structure: Structure) -> pz.nx.NamedArray:
  if structure.mesh is None:
    return array
  spec = sharding.named_sharding(array, structure.mesh, structure.rules)
  return jax.tree_util.tree_map(
    lambda x: jax.lax.with_sharding_constraint(x, spec), array
  )


@functools.partial(
  jax.jit, static_argnames=("structure", "max_new_tokens", "mode", "return_logits")
)
def decode(
  structure: Structure,
  leaves: list[Any],
  prompt: jax.Array,
  prompt_end: jax.Array,
  controls: dict[str, jax.Array],
  rng: jax.Array,
  *,
  max_new_tokens: int,
  mode: sampling.SamplingMode,
  return_logits: bool = False,
) -> dict[str, Any]:
  """Prefill plus a ``while_loop`` of decoding steps (see module docstring).

  Args:
    structure: Static structure of the prepared model.
    leaves: Its array leaves (`Prepared.current_leaves`).
    prompt: ``[batch, seq]`` int32, left padding marked `PAD_MARK`.
    prompt_end: ``[batch]`` int32 non-pad prompt tokens per row.
    controls: Scalars ``eos`` (−1: none), ``pad``, ``temperature``,
      ``top_k``, ``top_p``.
    rng: PRNG key (split per step as in `sampling`).
    max_new_tokens: Tokens to emit per row (static).
    mode: Greedy or sampling (static).
    return_logits: Also return the logits each new token was chosen from.

  Returns:
    ``tokens`` ``[batch, max_new_tokens]``, ``lengths`` ``[batch]`` (tokens
    up to and including EOS), ``cache_end`` (filled cache slots), ``captures``
    (buffers in `Structure.saver_keys` order), ``user_state`` (final values),
    ``prefill_state`` (values after the prompt of state whose shape settles
    only after a step, by position in ``user_state``) and ``stepped``
    (whether a step ran after the prompt), ``logits`` (``[batch,
    max_new_tokens, vocabulary]`` or None).

  Raises:
    SurgeryError: (when traced) state of the model that changes shape at every
      decoding step.
  """
  global _TRACES
  _TRACES += 1
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  values = list(values)
  batch, n_new = prompt.shape[0], max_new_tokens
  side = {"generation_prompt_end": pz.nx.wrap(prompt_end).tag("batch")}
  pad, eos = controls["pad"], controls["eos"]

  def run(tree, values, tokens):
    bound = [
      v.unfreeze_as_copy() if isinstance(v, pz.StateVariableValue) else v
      for v in values
    ]
    logits = pz.bind_variables(tree, bound)(
      pz.nx.wrap(tokens).tag("batch", "seq"), **side
    )
    return logits, [v.freeze() if isinstance(v, pz.StateVariable) else v for v in bound]

  def choose(logits, rng):
    token, rng = sampling.choose_tokens(
      logits,
      rng,
      mode,
      temperature=controls["temperature"],
      top_k=controls["top_k"],
      top_p=controls["top_p"],
      batch_axes={"batch": batch},
    )
    return token.unwrap("batch"), rng

  logits, values = run(unbound, values, prompt)
  for i in structure.saver_index:
    buf = buffer.new_buffers(values[i].value, unbound.cache_len)
    buf = jax.tree_util.tree_map(
      lambda b: _constrain(b, structure), buf, is_leaf=buffer.is_named
    )
    values[i] = dataclasses.replace(values[i], value=buf)
  decoding = buffer.to_buffers(unbound)

  last_logits = logits[{"seq": -1}]
  first, rng = choose(last_logits, rng)
  out = jnp.full((batch, n_new), pad, jnp.int32).at[:, 0].set(first)
  done = first == eos
  lengths = jnp.where(done, 1, n_new).astype(jnp.int32)
  kept = None
  if return_logits:
    step = last_logits.unwrap("batch", "vocabulary")
    kept = jnp.zeros((batch, n_new, step.shape[-1]), step.dtype).at[:, 0].set(step)

  def cond(carry):
    return (carry[0] < n_new) & ~jnp.all(carry[4])

  def body(carry):
    i, values, prev, out, done, lengths, rng, kept = carry
    logits, values = run(decoding, values, prev[:, None])
    step = logits[{"seq": 0}]
    token, rng = choose(step, rng)
    token = jnp.where(done, pad, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (jnp.zeros_like(i), i))
    if kept is not None:
      update = step.unwrap("batch", "vocabulary")[:, None].astype(kept.dtype)
      zero = jnp.zeros_like(i)
      kept = jax.lax.dynamic_update_slice(kept, update, (zero, i, zero))
    newly = ~done & (token == eos)
    lengths = jnp.where(newly, i + 1, lengths)
    return i + 1, values, token, out, done | newly, lengths, rng, kept

  carry = (jnp.int32(1), values, first, out, done, lengths, rng, kept)
  prefill_state, stepped = {}, jnp.bool_(True)
  if n_new > 1:
    carry, prefill_state, stepped = state.settle(
      structure.user_state_index, structure.user_state_names, cond, body, carry
    )
    carry = jax.lax.while_loop(cond, body, carry)
  _, values, last, out, _, lengths, _, kept = carry
  if structure.saver_index:
    # Run the last token too, so captures cover every emitted token.
    values = state.one_more_step(
      lambda v: run(decoding, v, last[:, None])[1], values, prefill_state, stepped
    )
    prefill_state, stepped = {}, jnp.bool_(True)
  return {
    "tokens": out,
    "lengths": lengths,
    "cache_end": values[structure.end_index].value,
    "captures": [values[i].value for i in structure.saver_index],
    "user_state": [values[i] for i in structure.user_state_index],
    "prefill_state": {
      structure.user_state_index.index(i): v for i, v in prefill_state.items()
    },
    "stepped": stepped,
    "logits": kept,
  }
