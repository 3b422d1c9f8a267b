"""Fast insertion (`surgery.placing`) == Penzai's selection rewrite, at every site.

For every site of the embedded model (and of a model already patched there,
so anchors skip earlier surgery layers), `sites.insert` must build the same
tree as ``select(...).apply_and_inline`` (the reference: Penzai's own
selection machinery): equal tree structure and the very same leaf objects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.surgery import placing, sites
from gemma_surgery.surgery.layers.base import SurgeryLayer


@pz.pytree_dataclass
class Marker(SurgeryLayer):
  """A do-nothing layer tagged with the layer index it was made for."""

  tag: jax.Array

  def __call__(self, x, /, **_side):
    return x


def _reference(model, site, layers):
  indices = (
    [None]
    if not sites.site_info(site).per_layer
    else (sites.layer_indices(model, layers))
  )
  made = iter(
    [
      Marker(jnp.asarray(-1 if i is None else i))
      for i in sorted(indices, key=lambda i: (i is None, i))
    ]
  )
  return sites.select(model, site, layers).apply_and_inline(
    lambda node: [node, next(made)]
  )


def _same(a, b):
  leaves_a, def_a = jax.tree_util.tree_flatten(a)
  leaves_b, def_b = jax.tree_util.tree_flatten(b)
  assert def_a == def_b
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    if isinstance(x, jax.Array):
      assert x is y or (x.shape == () and int(x) == int(y))
    else:
      assert x is y or x == y


@pytest.fixture(scope="module")
def models():
  lm = gs.load("tiny", progress=False)
  vector = pz.nx.wrap(jnp.ones(256)).tag("embedding")
  patched = gs.steer(lm.model, "resid_post", None, vector, 1.0)
  patched = gs.steer(patched, "attn.out", [0, 3], vector, 2.0)
  return lm.model, patched


@pytest.mark.parametrize("site", list(sites.SITES))
def test_fast_insert_equals_penzai_selection(models, site):
  for model in models:
    layers = None if not sites.SITES[site].per_layer else [1, -1]
    fast = sites.insert(
      model, site, layers, lambda i: Marker(jnp.asarray(-1 if i is None else i))
    )
    _same(fast, _reference(model, site, layers))
    # Negative control: another layer choice is another tree.
    if layers is not None:
      other = sites.insert(model, site, [2], lambda i: Marker(jnp.asarray(i)))
      with pytest.raises(AssertionError):
        _same(other, fast)


def test_memo_is_per_model_object(models):
  model, patched = models
  assert sites.num_layers(model) == 6
  calls = []
  assert placing.memo(model, "probe", lambda: calls.append(1) or 7) == 7
  assert placing.memo(model, "probe", lambda: calls.append(1) or 8) == 7
  assert placing.memo(patched, "probe", lambda: calls.append(1) or 9) == 9
  assert len(calls) == 2


def test_unsupported_paths_are_refused():
  with pytest.raises(placing.Unsupported):
    placing.insert_after({"a": 1}, [(jax.tree_util.DictKey("a"),)], [2])
