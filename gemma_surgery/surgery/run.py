"""A jitted forward pass for (patched) models, with parameters frozen once.

Penzai's ``Jitted`` / ``pz.variable_jit`` re-threads every mutable
``Parameter`` through each call, which costs noticeably on mid-size models.
`jit_forward` freezes the parameters once and passes only the state variables
(captures, caches) in and out; captured values are written back into the same
``StateVariable`` objects, so a `surgery.Captures` keeps working:

    patched, acts = gs.capture(model, "resid_post")
    forward = gs.jit_forward(patched)
    logits = forward(tokens)          # compiled once per input shape
    acts.stacked("resid_post")
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from penzai import pz

from gemma_surgery.model import build
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer


@jax.jit
def _call(unbound: Any, state: list, tokens: Any, side_inputs: dict) -> tuple:
  variables = [v.unfreeze_as_copy() for v in state]
  out = pz.bind_variables(unbound, variables)(tokens, **side_inputs)
  return out, [v.freeze() for v in variables]


class JittedForward:
  """A model compiled for repeated calls; see `jit_forward`."""

  def __init__(self, model: Any):
    unbound, self._variables = pz.unbind_state_vars(model)
    self._unbound = pz.freeze_params(unbound)
    self._vocab = model.metadata.vocab_size
    # Capture variables (SaveIntermediate, TopKCapture, SAE feature captures)
    # are write-only: feeding them in as None keeps the input structure
    # fixed, so the first and later calls share one compile.
    write_only = pz.select(model).at_instances_of(CaptureLayer).get_sequence()
    self._write_only = {id(s.saved) for s in write_only}

  def __call__(self, tokens: pz.nx.NamedArray, **side_inputs) -> Any:
    """Runs the model on ``{batch?, seq}`` token ids; updates captures."""
    build.check_concrete_token_ids(tokens, self._vocab)
    state = [
      pz.StateVariableValue(
        value=None if id(v) in self._write_only else v.value, label=v.label
      )
      for v in self._variables
    ]
    out, new_state = _call(self._unbound, state, tokens, side_inputs)
    for variable, value in zip(self._variables, new_state, strict=True):
      base.store(variable, value.value)
    return out


def jit_forward(model: Any) -> JittedForward:
  """Compiles ``model`` for fast repeated forward passes (see module doc)."""
  return JittedForward(model)


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn: Callable[[Any, Any], Any], frozen_model: Any, tokens: Any) -> Any:
  return fn(frozen_model, tokens)


def run_frozen(model: Any, fn: Callable[[Any, Any], Any], tokens: Any) -> Any:
  """``fn(model, tokens)`` jitted with the model's parameters frozen.

  ``fn`` must be hashable and stable across calls (a module-level function
  or a `functools.partial` of one with hashable arguments) so repeated calls
  with models of the same structure share one compilation; the model's
  arrays (parameters, patch values, masks) are ordinary jit arguments. The
  model must not hold state variables (captures): use `jit_forward` there.
  """
  return _apply(fn, pz.freeze_params(model), tokens)


def call_model(model: Any, tokens: Any) -> Any:
  """``model(tokens)``: the logits ``{batch, seq, vocabulary}``."""
  return model(tokens)
