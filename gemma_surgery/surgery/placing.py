"""Fast structural rewrites: memoized site anchors, path-copy insertion.

Resolving a site (`gemma_surgery.surgery.sites.select`) walks the whole
model with Penzai selectors, and ``Selection.apply_and_inline`` rebuilds the
whole tree: tens of milliseconds per rewrite on the embedded model, paid by
every ``gs.steer`` of a sweep (one per grid point) and of a server batch.
Both depend only on the model's structure, so:

* `memo` remembers, per model object (weakly: an entry goes when its model
  does, and a reused ``id`` is detected), what was computed about it, e.g.
  the anchor keypaths of (site, layers) and the number of layers;
* `insert_after` inserts layers after list items given by keypaths,
  copying only the nodes on those paths (one level of flattening each, as
  Penzai's own selection does) and sharing every other subtree.

The result equals ``pz.select(root).at_keypaths(paths).apply_and_inline(
lambda node: [node, layer])`` (same tree structure, same leaf objects;
``tests/surgery/test_placing.py``).
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from penzai.core import tree_util as pz_tree_util

__all__ = ["Unsupported", "insert_after", "memo"]

_MEMO: collections.OrderedDict[tuple, tuple[weakref.ref, Any]] = (
  collections.OrderedDict()
)
_MEMO_SIZE = 512


class Unsupported(Exception):
  """A keypath `insert_after` can't follow (the caller uses Penzai's path)."""


def memo(model: Any, key: Hashable, compute: Callable[[], Any]) -> Any:
  """``compute()``, remembered for this model object and ``key``.

  Args:
    model: An immutable model (a Penzai layer tree).
    key: What is computed (e.g. ``("anchors", site, layers)``).
    compute: Computes it from ``model`` alone.
  """
  full = (id(model), key)
  hit = _MEMO.get(full)
  if hit is not None and hit[0]() is model:
    _MEMO.move_to_end(full)
    return hit[1]
  value = compute()
  try:
    ref = weakref.ref(model)
  except TypeError:
    return value
  _MEMO[full] = (ref, value)
  while len(_MEMO) > _MEMO_SIZE:
    _MEMO.popitem(last=False)
  return value


def insert_after(root: Any, paths: Sequence[tuple], layers: Sequence[Any]) -> Any:
  """``root`` with ``layers[i]`` inserted right after the item at ``paths[i]``.

  Args:
    root: A pytree (not modified).
    paths: Keypaths of list items, in tree order (as a selection lists them).
    layers: One layer per path.

  Raises:
    Unsupported: A path through a node this function can't rebuild.
  """
  for path, layer in reversed(list(zip(paths, layers, strict=True))):
    root = _inserted(root, tuple(path), layer)
  return root


def _inserted(node: Any, path: tuple, layer: Any) -> Any:
  if not path:
    raise Unsupported("empty keypath")
  key = path[0]
  if len(path) == 1:
    if type(node) not in (list, tuple) or not hasattr(key, "idx"):
      raise Unsupported("the anchor is not an item of a list")
    items = list(node)
    items.insert(key.idx % len(items) + 1, layer)
    return items if type(node) is list else tuple(items)
  flat = pz_tree_util.tree_flatten_exactly_one_level(node)
  if flat is None:
    raise Unsupported("a keypath through a leaf")
  children, treedef = flat
  keys = [k for k, _ in children]
  if keys.count(key) != 1:
    raise Unsupported(f"no unique child {key!r}")
  at = keys.index(key)
  values = [child for _, child in children]
  values[at] = _inserted(values[at], path[1:], layer)
  return treedef.unflatten(values)
