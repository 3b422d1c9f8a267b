"""Bad inputs to `gs.generate` raise typed errors before anything compiles."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.generation import load, patched

import gemma_surgery as gs
from gemma_surgery import errors

OK = [[2, 5, 6], [2, 7]]


@pytest.fixture(scope="module")
def model():
  return load()


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"eos_id": 512}, "eos_id"),
    ({"eos_id": -1}, "eos_id"),
    ({"pad_id": 600}, "pad_id"),
    ({"seed": "x"}, "seed"),
    ({"cache_len": 5}, "cache_len"),
  ],
)
def test_bad_controls(model, kwargs, match):
  args = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(errors.InputError, match=match):
    gs.generate(model, OK, **args)


@pytest.mark.parametrize(
  "prompts,match",
  [
    ([], "non-empty"),
    ([[]], "non-empty"),
    ([[2, 3], []], "Prompt 1"),
    (np.zeros((2, 0), np.int32), "shape"),
    (np.zeros((2, 3, 4), np.int32), "shape"),
    ([[2, 600]], "vocabulary"),
    ([[2, -3]], "vocabulary"),
    (np.array([[2, 1e9]]), "integer"),
    ([[2.0, 3.5]], "integer"),
    (np.array([[0, 0, 0], [2, 5, 6]]), "only of padding"),
    (["text", [2, 3]], "mixes"),
    (["some text"], "tokenizer"),
    ("some text", "tokenizer"),
    (42, "non-empty list"),
  ],
)
def test_bad_prompts(model, prompts, match):
  with pytest.raises(errors.InputError, match=match):
    gs.generate(model, prompts, max_new_tokens=4)


def test_captures_of_another_model(model):
  _, foreign = patched(model)
  with pytest.raises(errors.SurgeryError, match="not in this model"):
    gs.generate(model, OK, max_new_tokens=4, captures=foreign)
  with pytest.raises(errors.SurgeryError, match="Captures"):
    gs.generate(model, OK, max_new_tokens=4, captures={"resid_post": 1})


def test_not_a_language_model():
  with pytest.raises(errors.InputError, match="TransformerLM"):
    gs.generate(object(), OK, max_new_tokens=4)


def test_errors_are_catchable_as_the_base_class(model):
  with pytest.raises(gs.GemmaSurgeryError):
    gs.generate(model, OK, max_new_tokens=0)
