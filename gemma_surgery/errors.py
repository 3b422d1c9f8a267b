"""Typed errors raised by gemma_surgery.

Every error the library raises on bad input derives from `GemmaSurgeryError`, so
callers can catch the whole family with one clause, or a precise subclass when
they want to react to one kind of problem. Messages name what was wrong and what
would have been valid. `ReplicationWarning` is the one warning class: a
result that is correct but costs more memory than the user likely expects.
"""

from __future__ import annotations


class GemmaSurgeryError(Exception):
  """Base class of every error raised deliberately by gemma_surgery."""


class ConfigError(GemmaSurgeryError, ValueError):
  """An architecture configuration is invalid, unknown or inconsistent."""


class CheckpointError(GemmaSurgeryError, ValueError):
  """A checkpoint is missing, corrupt, truncated or does not fit the config."""


class HubError(GemmaSurgeryError, OSError):
  """A download from Kaggle or Hugging Face failed (network, credentials)."""


class TokenizerError(GemmaSurgeryError, ValueError):
  """A tokenizer file is missing or invalid."""


class InputError(GemmaSurgeryError, ValueError):
  """Model inputs are invalid (e.g. token ids outside the vocabulary)."""


class ShardingError(GemmaSurgeryError, ValueError):
  """A mesh or sharding rule does not fit the model or the devices."""


class SiteError(GemmaSurgeryError, ValueError):
  """An unknown site, a layer index out of range, or a site the model lacks."""


class SurgeryError(GemmaSurgeryError, ValueError):
  """A surgery layer got values that don't fit its site (axes, sizes, NaNs)."""


class SAEError(GemmaSurgeryError, ValueError):
  """An SAE file, its metadata, or its use doesn't fit (keys, shapes, sizes)."""


class DistributedError(GemmaSurgeryError, RuntimeError):
  """Several processes can't form one run (coordinator, process counts, ids)."""


class ReplicationWarning(UserWarning):
  """A mesh leaves parameters replicated that the sharding rules would split.

  The model runs, but each such parameter is copied on every device of the
  mesh axis it couldn't be split over (e.g. 2 kv heads on ``model=4``).
  """
