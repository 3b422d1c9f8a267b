"""Paths of the repository, the tests and their fixtures."""

from __future__ import annotations

import pathlib

TESTS = pathlib.Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
HF_FIXTURES = FIXTURES / "hf"
HF_VARIANTS = ("gemma1_mha", "gemma1_mqa", "gemma2", "gemma3")
TOKENIZER_FIXTURE = FIXTURES / "tokenizer" / "tiny.model"
