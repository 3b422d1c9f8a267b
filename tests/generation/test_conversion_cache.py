"""A new steering value on a new model object costs no KV-cache conversion.

``gs.steer(model, ..., scale)`` returns a new model each time; `generate`
reuses the conversion of the last model of the same structure
(`decoding.Prepared.rebind`), substituting the changed leaves, so the first
call with a new scale neither converts, nor traces, nor compiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.compiles import count_compiles
from helpers.generation import load
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding, prepared

ROWS = [[2, 17, 4, 250], [2, 311, 45, 7]]


def _steer(base, scale, seed=0):
  vector = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
  return gs.steer(
    base, "resid_post", 1, pz.nx.wrap(jnp.asarray(vector)).tag("embedding"), scale
  )


def _counts():
  return decoding.conversion_count(), decoding.trace_count()


@pytest.fixture(scope="module")
def base():
  return load()


def test_new_scale_reuses_the_conversion(base):
  first = gs.generate(_steer(base, 3.0), ROWS, max_new_tokens=8)
  before = _counts()
  with count_compiles() as counts:
    model = _steer(base, -6.0, seed=1)  # new object, new vector and scale
    other = gs.generate(model, ROWS, max_new_tokens=8)
  assert _counts() == before  # no conversion, no trace
  assert counts["compiles"] == 0
  assert (other.tokens != first.tokens).any()  # the new values took effect
  # The same model converted from scratch gives the same tokens.
  prepared._CACHE.clear()
  prepared._BY_STRUCTURE.clear()
  fresh = gs.generate(model, ROWS, max_new_tokens=8)
  assert decoding.conversion_count() == before[0] + 1
  np.testing.assert_array_equal(fresh.tokens, other.tokens)


def test_other_variables_are_converted(base):
  """A model of the same structure with other parameters is not reused."""
  gs.generate(_steer(base, 3.0), ROWS, max_new_tokens=8)
  before = decoding.conversion_count()
  reloaded = load()
  steered = _steer(reloaded, 3.0)
  gs.generate(steered, ROWS, max_new_tokens=8)
  assert decoding.conversion_count() == before + 1
  # ...and a changed structure (another site) is converted too.
  other_site = gs.steer(
    reloaded, "mlp.out", 0, pz.nx.wrap(jnp.ones(64)).tag("embedding"), 1.0
  )
  gs.generate(other_site, ROWS, max_new_tokens=8)
  assert decoding.conversion_count() == before + 2
