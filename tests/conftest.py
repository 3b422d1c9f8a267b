"""Shared test setup: 8 fake CPU devices for mesh tests, fixture paths."""

from __future__ import annotations

import os
import pathlib

# Must happen before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"
HF_VARIANTS = ("gemma1_mha", "gemma1_mqa", "gemma2", "gemma3")


@pytest.fixture(scope="session")
def hf_fixture_dir():
  return HF_FIXTURES
