"""Sharding SAEs over a device mesh, along ``latents``."""

from __future__ import annotations

from jax.sharding import Mesh

from gemma_surgery.parallel import sharding
from gemma_surgery.sae.autoencoders import AutoEncoder
from gemma_surgery.sae.clt import Dictionary


def shard_sae(
  sae: AutoEncoder | Dictionary,
  mesh: Mesh,
  rules: sharding.Rules | None = None,
  *,
  strict: bool = False,
) -> AutoEncoder | Dictionary:
  """A copy of ``sae`` with its parameters placed on ``mesh``; pure.

  ``sae`` may also be a `CrossLayerTranscoder` or `TranscoderSet`.
  By default the ``latents`` axis of ``w_enc``, ``b_enc``, ``w_dec`` and θ
  follows `gemma_surgery.parallel.sharding.SAE_RULES` (the ``model`` mesh axis) and
  everything else is replicated; pass e.g. ``[("latents", "data")]`` to
  choose another mesh axis. The mesh may span several processes. A width that doesn't
  divide stays replicated (``strict=True`` raises `ShardingError`).
  """
  if rules is None:
    rules = sharding.SAE_RULES
  return sharding.shard_model(sae, mesh, rules, strict=strict)
