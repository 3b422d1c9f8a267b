"""Small builders shared by `build` and `build_gemma4` (no model structure)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.model import positional


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (HF's ``gelu_pytorch_tanh``).

  A module-level function, not a ``functools.partial``: it is a static field
  of the model, and a fresh partial per build would make every model a new
  ``jit`` cache entry.
  """
  return jax.nn.gelu(x, approximate=True)


def dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def rms_norm(name, rng, axes, config) -> pz.nn.RMSLayerNorm:
  """Gemma's RMSNorm; its weight holds ``1 + w`` (Gemma 1-3) or ``w`` (Gemma 4)."""
  return positional.positional_norm(
    pz.nn.RMSLayerNorm.from_config(
      name=name,
      init_base_rng=rng,
      across_axes=axes,
      dtype=dtype(config.parameter_dtype),
      epsilon=config.rms_norm_eps,
    )
  )


def linear(name, rng, inputs, outputs, config) -> pz.nn.Linear:
  return positional.positional_linear(
    pz.nn.Linear.from_config(
      name=name,
      init_base_rng=rng,
      input_axes=inputs,
      output_axes=outputs,
      dtype=dtype(config.parameter_dtype),
    )
  )
