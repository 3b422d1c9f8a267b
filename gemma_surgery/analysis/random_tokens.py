"""Random token sequences for head analyses: which ids, and repeats of them.

Random-token analyses (induction on repeated sequences) should draw ordinary
text pieces: a model treats control and byte-fallback pieces differently from
text, so scores would depend on how many of them landed in the sample (about
one draw in eight for ids drawn uniformly above 3 from the embedded model's
vocabulary). `token_pool` chooses the ids:

* with a tokenizer: its ordinary pieces (`Tokenizer.ordinary_ids`: no
  special, control, unused, byte-fallback or markup-tag pieces), below the
  model's vocabulary size;
* with ``id_range=(low, high)``: the ids ``low .. high − 1``;
* with neither: ``DEFAULT_LOW .. vocab_size − 1`` — only pad, EOS, BOS and
  UNK (ids 0–3 in every Gemma vocabulary) are skipped; any control or byte
  pieces above them are drawn too. Pass a tokenizer to avoid them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_surgery import errors
from gemma_surgery.tokenizer import as_tokenizer
from gemma_surgery.validation import check_token_ids

DEFAULT_LOW = 4


def _int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise errors.InputError(f"{name}={value!r} must be an int >= {low}.")
  if value < low:
    raise errors.InputError(f"{name}={value} must be >= {low}.")
  return int(value)


def token_pool(
  vocab_size: int, *, tokenizer: Any = None, id_range: Any = None
) -> np.ndarray:
  """``[n]`` the ids random-token analyses draw from (see the module doc).

  Args:
    vocab_size: The model's vocabulary size.
    tokenizer: Draw its ordinary pieces (ids below ``vocab_size``).
    id_range: ``(low, high)``: draw ``low .. high − 1`` instead.

  Raises:
    InputError: Both ``tokenizer`` and ``id_range``; a range that is not
      two ints with ``0 <= low``, ``low + 2 <= high <= vocab_size``; fewer
      than two ids to draw from.
  """
  vocab_size = _int("vocab_size", vocab_size, 1)
  if tokenizer is not None and id_range is not None:
    raise errors.InputError(
      "Pass either tokenizer= (draw its ordinary pieces) or id_range=(low,"
      " high), not both."
    )
  if id_range is not None:
    if not isinstance(id_range, tuple | list) or len(id_range) != 2:
      raise errors.InputError(f"id_range={id_range!r} must be a (low, high) pair.")
    low, high = (_int(n, v, 0) for n, v in zip(("low", "high"), id_range, strict=True))
    if not low + 2 <= high <= vocab_size:
      raise errors.InputError(
        f"id_range=({low}, {high}) must satisfy low + 2 <= high <="
        f" vocab_size={vocab_size} (ids low..high − 1, at least two of them)."
      )
    return np.arange(low, high, dtype=np.int32)
  if tokenizer is not None:
    ids = as_tokenizer(tokenizer).ordinary_ids()
    ids = ids[ids < vocab_size]
    if ids.size < 2:
      raise errors.InputError(
        f"The tokenizer has {ids.size} ordinary piece(s) below vocab_size="
        f"{vocab_size}; pass id_range=(low, high) instead."
      )
    return ids.astype(np.int32)
  if vocab_size < DEFAULT_LOW + 2:
    raise errors.InputError(
      f"vocab_size={vocab_size} leaves fewer than two ids above the special ids"
      f" 0..{DEFAULT_LOW - 1}; pass id_range=(low, high)."
    )
  return np.arange(DEFAULT_LOW, vocab_size, dtype=np.int32)


def repeated_tokens(
  vocab_size: int,
  length: int,
  *,
  batch: int = 4,
  seed: int = 0,
  bos_id: int = 2,
  low: int = DEFAULT_LOW,
  pool: Any = None,
) -> np.ndarray:
  """``[batch, 1 + 2·length]``: BOS, ``length`` random tokens, the same again.

  Args:
    vocab_size: The model's vocabulary size (bounds every id).
    length: Tokens in one repeat (>= 2).
    batch: Rows.
    seed: Seed of the draw.
    bos_id: The first token of every row.
    low: Without ``pool``, tokens are drawn uniformly from ``low ..
      vocab_size − 1``.
    pool: Ids to draw from uniformly instead (e.g. `token_pool`).

  Raises:
    InputError: ``length`` < 2, ``batch`` < 1, ``low`` outside
      ``0..vocab_size − 2``, or a pool or BOS id outside the vocabulary.
  """
  length = _int("length", length, 2)
  batch = _int("batch", batch, 1)
  if pool is None:
    if not isinstance(low, int | np.integer) or not 0 <= low < vocab_size - 1:
      raise errors.InputError(f"low={low!r} must be an int in 0..{vocab_size - 2}.")
    pool = np.arange(low, vocab_size)
  pool = np.asarray(pool)
  if pool.ndim != 1 or pool.size < 2:
    raise errors.InputError(
      f"pool must be a 1-D array of at least two ids; got shape {pool.shape}."
    )
  check_token_ids(pool, vocab_size)
  check_token_ids(np.asarray([bos_id]), vocab_size)
  rng = np.random.default_rng(seed)
  half = pool[rng.integers(0, pool.size, (batch, length))]
  bos = np.full((batch, 1), bos_id)
  return np.concatenate([bos, half, half], axis=1).astype(np.int32)
