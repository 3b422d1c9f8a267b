"""`gs.generate` on models holding a user's own Penzai layers with state.

The Penzai tutorials' ``SaveIntermediate`` (a layer writing ``self.saved.value
= x`` into a None-initialised ``pz.StateVariable``) and a tutorial-style
steering layer, written here by hand, run through the fused loop as they do
through a Python loop over Penzai's KV-cached model: same tokens, and the
variable ends holding the last step's value. State that grows at every step
cannot be carried and is refused with a `SurgeryError` naming its layer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz
from penzai.models.transformer import sampling_mode

import gemma_surgery as gs
from gemma_surgery import errors

PROMPT = [[2, 17, 4, 9, 250], [2, 311, 45, 7, 8]]
NEW = 5


@pz.pytree_dataclass
class SaveIntermediate(pz.nn.Layer):
  """The Penzai tutorials' capture layer."""

  saved: pz.StateVariable

  def __call__(self, x, **unused_side_inputs):
    self.saved.value = x
    return x


@pz.pytree_dataclass
class SteerIntermediate(pz.nn.Layer):
  """A tutorial-style steering layer: adds a fixed vector."""

  vector: pz.nx.NamedArray

  def __call__(self, x, **unused_side_inputs):
    return x + self.vector


@pz.pytree_dataclass
class History(pz.nn.Layer):
  """Keeps every activation it saw: grows along seq at every step."""

  saved: pz.StateVariable

  def __call__(self, x, **unused_side_inputs):
    old = self.saved.value
    self.saved.value = x if old is None else pz.nx.concatenate([old, x], "seq")
    return x


@pytest.fixture(scope="module")
def base():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


def _user_patched(base):
  """Tutorial steering after block 1 and a tutorial capture after it."""
  vector = np.random.default_rng(0).standard_normal(64).astype(np.float32)
  saved = pz.StateVariable(None, label="tutorial/saved")
  blocks = pz.select(base).at_instances_of(pz.nn.Residual)
  model = blocks.pick_nth_selected(3).insert_after(
    pz.nn.Sequential(
      [
        SteerIntermediate(pz.nx.wrap(jnp.asarray(3 * vector)).tag("embedding")),
        SaveIntermediate(saved),
      ]
    )
  )
  return model, saved


def _python_loop(model, prompt, steps: int):
  """Greedy decoding in a Python loop over Penzai's KV-cached model.

  Returns ``(tokens [batch, steps], logits of the last model call)``.
  """
  tokens = np.asarray(prompt, np.int32)
  cached = sampling_mode.KVCachingTransformerLM.from_uncached(
    model, cache_len=tokens.shape[1] + steps, batch_axes={"batch": len(tokens)}
  )
  logits = cached(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"))
  out = []
  for step in range(steps):
    last = np.asarray(logits[{"seq": -1}].unwrap("batch", "vocabulary"))
    out.append(last.argmax(-1).astype(np.int32))
    if step + 1 < steps:
      logits = cached(pz.nx.wrap(jnp.asarray(out[-1][:, None])).tag("batch", "seq"))
  return np.stack(out, axis=1)


def _value(variable) -> np.ndarray:
  return np.asarray(variable.value.unwrap("batch", "seq", "embedding"))


def test_tutorial_layers_run_through_generate_like_a_python_loop(base):
  model, saved = _user_patched(base)
  result = gs.generate(model, PROMPT, max_new_tokens=NEW)
  reference, reference_saved = _user_patched(base)
  tokens = _python_loop(reference, PROMPT, NEW)
  np.testing.assert_array_equal(result.tokens, tokens)
  # The variable holds the last model call's value: one decoding step.
  assert dict(saved.value.named_shape) == {"batch": 2, "seq": 1, "embedding": 64}
  np.testing.assert_allclose(_value(saved), _value(reference_saved), atol=1e-4)
  # The steering really acted: an unpatched model continues differently.
  assert not np.array_equal(
    gs.generate(base, PROMPT, max_new_tokens=NEW).tokens, tokens
  )
  # A second call (state no longer None) works the same.
  again = gs.generate(model, PROMPT, max_new_tokens=NEW)
  np.testing.assert_array_equal(again.tokens, tokens)


@pytest.mark.parametrize("with_captures", [False, True])
def test_state_when_every_row_stops_at_once(base, with_captures):
  """No decoding step runs: the variable keeps the prompt's value.

  With captures the last token is run too (one step), as in a Python loop
  that runs it.
  """
  model, saved = _user_patched(base)
  if with_captures:
    model, _ = gs.capture(model, "resid_post", 0)
  rows = [PROMPT[0], PROMPT[0]]  # equal rows: both stop at the first token
  first = gs.generate(model, rows, max_new_tokens=1).tokens[0, 0]
  result = gs.generate(model, rows, max_new_tokens=NEW, eos_id=int(first))
  np.testing.assert_array_equal(result.lengths, [1, 1])
  reference, reference_saved = _user_patched(base)
  _python_loop(reference, rows, 2 if with_captures else 1)
  assert saved.value.named_shape == reference_saved.value.named_shape
  np.testing.assert_allclose(_value(saved), _value(reference_saved), atol=1e-4)


def test_one_new_token_keeps_the_prompt_value(base):
  model, saved = _user_patched(base)
  gs.generate(model, PROMPT, max_new_tokens=1)
  assert dict(saved.value.named_shape) == {"batch": 2, "seq": 5, "embedding": 64}


def test_growing_state_is_refused_naming_the_layer(base):
  layer = History(pz.StateVariable(None, label="my/history"))
  model = pz.select(base).at_instances_of(pz.nn.Residual).pick_nth_selected(1)
  model = model.insert_after(layer)
  with pytest.raises(errors.SurgeryError) as info:
    gs.generate(model, PROMPT, max_new_tokens=3)
  message = str(info.value)
  assert "History" in message and "my/history" in message
  assert "temperature_sample_pyloop" in message
