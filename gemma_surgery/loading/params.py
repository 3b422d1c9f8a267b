"""Binding canonical Gemma parameters into a Penzai model.

Every loader produces the canonical flat dict described in
`gemma_surgery.model.parameters`; `bind_parameters` checks it against the
config and binds it, on one device or sliced over a mesh
(`gemma_surgery.loading.placement`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemma_surgery.config import GemmaConfig
from gemma_surgery.loading import placement
from gemma_surgery.model import build
from gemma_surgery.model.parameters import check_canonical, penzai_targets, to_penzai
from gemma_surgery.parallel import sharding


def bind_named(
  config: GemmaConfig, arrays: Mapping[str, pz.nx.NamedArray]
) -> build.GemmaTransformerLM:
  """Builds the model for ``config`` with already placed Penzai parameters.

  Args:
    config: The architecture.
    arrays: Penzai label (`penzai_targets`) -> NamedArray.
  """
  variables = [
    pz.Parameter(value=value, label=f"transformer/{label}")
    for label, value in arrays.items()
  ]
  model = pz.bind_variables(build.build_model(config, None), variables)
  pz.nn.assert_no_parameter_slots(model)
  return model


def bind_parameters(
  config: GemmaConfig,
  params: Mapping[str, Any],
  *,
  source: str = "checkpoint",
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: sharding.Rules | None = None,
  strict: bool = False,
  progress: bool = False,
) -> build.GemmaTransformerLM:
  """Builds the model for ``config`` and binds canonical parameters to it.

  Without a mesh, each array is converted to ``config.parameter_dtype`` on
  the host and placed on the default device once. With a ``mesh`` (which may
  span several processes), each parameter is built with
  ``jax.make_array_from_callback`` and a ``NamedSharding`` chosen from its
  axis names (see `gemma_surgery.parallel.sharding`): every process reads and
  converts only the slices its own devices hold (`loading.placement`), so no
  process materializes the whole model.

  Args:
    config: The architecture.
    params: Canonical parameters (see the module docstring): numpy arrays,
      or, with a mesh, `placement.LazyArray` s read slice by slice.
    source: Where the parameters came from, for error messages.
    mesh: Optional device mesh to shard the parameters over.
    sharding_rules: Axis-name rules for ``mesh`` (default:
      `sharding.DEFAULT_RULES`).
    strict: With ``mesh``: raise `ShardingError` when a rule's axis doesn't
      divide its mesh axis, instead of replicating that axis.
    progress: With ``mesh``: a progress bar over parameters.

  Returns:
    The bound model.

  Raises:
    CheckpointError: If names or shapes don't match the config.
    ShardingError: Rules naming axes the mesh lacks; ``strict`` divisibility.
  """
  check_canonical(config, params, source)
  dtype = jnp.dtype(config.parameter_dtype)
  if mesh is not None:
    targets = penzai_targets(config)
    with tqdm(
      total=len(targets), desc="Placing parameters", unit="array", disable=not progress
    ) as bar:
      arrays = placement.place_all(
        targets, params, mesh, dtype, sharding_rules, strict=strict, progress=bar.update
      )
    return bind_named(config, arrays)
  arrays = {}
  for label, (value, axes) in to_penzai(config, params).items():
    named = pz.nx.wrap(np.asarray(value).astype(dtype, copy=False)).tag(*axes)
    arrays[label] = jax.device_put(named)
  return bind_named(config, arrays)
