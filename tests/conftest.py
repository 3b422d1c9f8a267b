"""Shared test setup: 8 fake CPU devices for mesh tests (paths: `helpers.paths`)."""

from __future__ import annotations

import os

# Must happen before JAX initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile from scratch (no persistent cache shared between runs);
# tests/model/test_jit_cache.py checks the cache in its own processes.
os.environ.setdefault("GEMMA_SURGERY_COMPILATION_CACHE", "0")

import pytest  # noqa: E402
from helpers.paths import HF_FIXTURES  # noqa: E402


@pytest.fixture(scope="session")
def hf_fixture_dir():
  return HF_FIXTURES
