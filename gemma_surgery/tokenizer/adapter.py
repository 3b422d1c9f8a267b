"""Adapter giving duck-typed tokenizers the `Tokenizer` interface.

Used by `tokenizer.as_tokenizer` for objects that are neither our
`GemmaTokenizer` nor a raw SentencePiece processor, e.g. the `gemma` package's
`gm.text.Gemma3Tokenizer` (which we do not depend on). That class has
`encode(text, *, add_bos=False, add_eos=False)`, `decode(ids)`, a
`special_tokens` enum (`BOS`, `EOS`, `PAD`, `UNK`), `vocab_size`, and its
SentencePiece processor as `_sp`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import sentencepiece as spm

from gemma_surgery.errors import TokenizerError
from gemma_surgery.tokenizer.base import TokenizerBase

_INNER_SP_ATTRS = ("sp", "_sp", "sp_model", "spm", "tokenizer", "_tokenizer")


def _safe_getattr(obj: Any, name: str) -> Any:
  """getattr that treats any error (e.g. a lazy property failing) as absent."""
  try:
    return getattr(obj, name, None)
  except Exception:  # noqa: BLE001 - foreign lazy properties may raise anything.
    return None


def _as_id(value: Any) -> int | None:
  """Non-negative int from an int-like, a zero-arg callable, or None."""
  if callable(value) and not isinstance(value, (int, np.integer)):
    try:
      value = value()
    except Exception:  # noqa: BLE001
      return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    return None
  return int(value) if value >= 0 else None


def _find_inner_sp(obj: Any) -> spm.SentencePieceProcessor | None:
  for name in _INNER_SP_ATTRS:
    candidate = _safe_getattr(obj, name)
    if isinstance(candidate, spm.SentencePieceProcessor):
      return candidate
  return None


def _find_id(
  obj: Any,
  sp: spm.SentencePieceProcessor | None,
  attr: str,
  special: str,
  hf_attr: str,
) -> int | None:
  """Looks up a special id: `obj.<attr>`, `special_tokens.<special>`, sp, HF."""
  candidates: list[Callable[[], Any]] = [
    lambda: _safe_getattr(obj, attr),
    lambda: _safe_getattr(_safe_getattr(obj, "special_tokens"), special),
    lambda: getattr(sp, attr) if sp is not None else None,
    lambda: _safe_getattr(obj, hf_attr),
  ]
  for get in candidates:
    found = _as_id(get())
    if found is not None:
      return found
  return None


def _accepts_add_bos(encode: Callable[..., Any]) -> bool:
  try:
    params = inspect.signature(encode).parameters
  except (TypeError, ValueError):
    return False
  return "add_bos" in params


class DuckTokenizer(TokenizerBase):
  """Wraps an object with `encode(str)` and `decode(list[int])`.

  BOS handling: if the wrapped `encode` takes `add_bos`, it is called with
  `add_bos=False`; otherwise it is called with the text alone and a leading
  BOS it may add is removed. `encode(..., add_bos=True)` then prepends BOS
  exactly once. Sequences of strings are encoded one string at a time (the
  `gemma` package treats a list passed to its `encode` as a list of pieces).

  Attributes:
    wrapped: The adapted object.
  """

  def __init__(self, obj: Any) -> None:
    self.wrapped = obj
    self._sp = _find_inner_sp(obj)
    bos = _find_id(obj, self._sp, "bos_id", "BOS", "bos_token_id")
    if bos is None:
      raise TokenizerError(
        f"cannot find the BOS id of {type(obj).__qualname__}: looked for "
        "attributes bos_id, special_tokens.BOS, a SentencePiece processor "
        f"({', '.join(_INNER_SP_ATTRS)}) and bos_token_id"
      )
    self._bos = bos
    self._eos = _find_id(obj, self._sp, "eos_id", "EOS", "eos_token_id")
    self._pad = _find_id(obj, self._sp, "pad_id", "PAD", "pad_token_id")
    self._unk = _find_id(obj, self._sp, "unk_id", "UNK", "unk_token_id")
    vocab_size = _as_id(_safe_getattr(obj, "vocab_size"))
    if vocab_size is None and self._sp is not None:
      vocab_size = int(self._sp.get_piece_size())
    if vocab_size is None and hasattr(type(obj), "__len__"):
      vocab_size = len(obj)
    if not vocab_size:
      raise TokenizerError(
        f"cannot find the vocabulary size of {type(obj).__qualname__}: looked "
        "for vocab_size, a SentencePiece processor and len()"
      )
    self._vocab_size = vocab_size
    self._takes_add_bos = _accepts_add_bos(obj.encode)

  def __repr__(self) -> str:
    return (
      f"DuckTokenizer({type(self.wrapped).__qualname__}, "
      f"vocab_size={self._vocab_size}, bos_id={self._bos})"
    )

  def _encode_one(self, text: str) -> list[int]:
    if self._takes_add_bos:
      ids = self.wrapped.encode(text, add_bos=False)
    else:
      ids = self.wrapped.encode(text)
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not self._takes_add_bos and ids and ids[0] == self._bos:
      ids = ids[1:]
    return ids

  def _decode_list(self, ids: list[int]) -> str:
    return str(self.wrapped.decode(ids))

  def _processor(self) -> spm.SentencePieceProcessor | None:
    return self._sp

  def _raw_piece(self, token_id: int) -> str:
    if self._sp is not None:
      return self._sp.id_to_piece(token_id)
    text = self._decode_list([token_id])
    return text if text else f"<id {token_id}>"
