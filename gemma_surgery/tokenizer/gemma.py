"""Gemma tokenizer: a thin SentencePiece wrapper plus a duck-typing adapter.

`GemmaTokenizer` wraps a `sentencepiece.SentencePieceProcessor` loaded from a
Gemma `tokenizer.model`. `as_tokenizer` turns other tokenizer objects (a raw
`SentencePieceProcessor`, the `gemma` package's `gm.text.Gemma3Tokenizer`, or
anything with `encode(str) -> list[int]` and `decode(list[int]) -> str`) into
an object with the same interface (the `Tokenizer` protocol).

Display pieces (`piece`, `pieces`) are meant for visualizations: the
SentencePiece space `▁` becomes `SPACE_MARKER` (`␣`), byte-fallback pieces
such as `<0x0A>` become their character (`\\n` escaped as backslash-n), and
other control characters are escaped. Backslashes themselves are not escaped,
so display pieces are for humans, not for round-tripping.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm
import tokenizers

from gemma_surgery.errors import TokenizerError
from gemma_surgery.tokenizer.adapter import DuckTokenizer
from gemma_surgery.tokenizer.base import (
  SPACE_MARKER,
  TokenizerBase,
  display_piece,
)
from gemma_surgery.tokenizer.chat import ChatFormat
from gemma_surgery.tokenizer.json_file import JsonTokenizer, is_json_path

__all__ = [
  "SPACE_MARKER",
  "GemmaTokenizer",
  "Tokenizer",
  "as_tokenizer",
  "display_piece",
]


@runtime_checkable
class Tokenizer(Protocol):
  """Interface shared by `GemmaTokenizer` and the `as_tokenizer` adapter."""

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int | None: ...

  @property
  def pad_id(self) -> int | None: ...

  @property
  def unk_id(self) -> int | None: ...

  @property
  def vocab_size(self) -> int: ...

  def encode(
    self, text: str | Sequence[str], add_bos: bool = True
  ) -> list[int] | list[list[int]]: ...

  def decode(self, ids: Any) -> str | list[str]: ...

  def piece(self, token_id: int) -> str: ...

  def pieces(self, ids: Any) -> list[str]: ...

  def ordinary_ids(self) -> Any: ...

  @property
  def chat_format(self) -> ChatFormat: ...


class GemmaTokenizer(TokenizerBase):
  """SentencePiece tokenizer for Gemma models.

  Attributes:
    sp: The wrapped `sentencepiece.SentencePieceProcessor`.
    path: The file it was loaded from, if any.
  """

  def __init__(
    self,
    sp: spm.SentencePieceProcessor,
    path: pathlib.Path | None = None,
  ) -> None:
    self.sp = sp
    self.path = path
    self._vocab_size = int(sp.get_piece_size())
    if self._vocab_size <= 0:
      raise TokenizerError(f"tokenizer {path or sp!r} has an empty vocabulary")
    self._bos = int(sp.bos_id())
    if self._bos < 0:
      raise TokenizerError(f"tokenizer {path or sp!r} defines no BOS piece")
    self._eos, self._pad, self._unk = (
      int(i) if i >= 0 else None for i in (sp.eos_id(), sp.pad_id(), sp.unk_id())
    )

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> GemmaTokenizer:
    """Loads a SentencePiece `tokenizer.model` file.

    Raises:
      TokenizerError: If the file is missing, unreadable, or not a valid
        SentencePiece model (the message names the path).
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
      what = "is a directory, not a file" if p.is_dir() else "does not exist"
      raise TokenizerError(f"tokenizer file {str(p)!r} {what}")
    try:
      proto = p.read_bytes()
      sp = spm.SentencePieceProcessor()
      sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
      raise TokenizerError(
        f"{str(p)!r} is not a valid SentencePiece tokenizer model: {e}"
      ) from e
    return cls(sp, p)

  def __repr__(self) -> str:
    src = str(self.path) if self.path else "<in-memory>"
    return f"GemmaTokenizer({src!r}, vocab_size={self._vocab_size})"

  def _encode_one(self, text: str) -> list[int]:
    return self.sp.encode(text, out_type=int)

  def _decode_list(self, ids: list[int]) -> str:
    return self.sp.decode(ids)

  def _raw_piece(self, token_id: int) -> str:
    return self.sp.id_to_piece(token_id)

  def _processor(self) -> spm.SentencePieceProcessor:
    return self.sp

  def piece_to_id(self, piece: str) -> int:
    """Id of a raw vocabulary piece (e.g. `'<start_of_turn>'`, `'▁the'`).

    Raises:
      TokenizerError: If the piece is not in the vocabulary.
    """
    if not self.has_piece(piece):
      raise TokenizerError(f"piece {piece!r} is not in the vocabulary")
    return int(self.sp.piece_to_id(piece))

  def has_piece(self, piece: str) -> bool:
    token_id = int(self.sp.piece_to_id(piece))
    return self.sp.id_to_piece(token_id) == piece


def as_tokenizer(obj: Any) -> Tokenizer:
  """Adapts a tokenizer-like object to the `Tokenizer` interface.

  Args:
    obj: A `GemmaTokenizer` or `JsonTokenizer` (returned as is); a path to a
      ``tokenizer.model`` or a ``tokenizer.json`` (a path ending in
      ``.json``); a `sentencepiece.SentencePieceProcessor`; a
      `tokenizers.Tokenizer`; or any object with
      `encode(str) -> list[int]` and `decode(list[int]) -> str`, such as the
      `gemma` package's `gm.text.Gemma3Tokenizer` (its BOS id is found via
      `bos_id`, `special_tokens.BOS`, an inner SentencePiece processor, or
      `bos_token_id`).

  Returns:
    An object with `encode`, `decode`, `piece`, `pieces`, `ordinary_ids`,
    `bos_id`, `eos_id`, `pad_id`, `unk_id` and `vocab_size`.

  Raises:
    TokenizerError: If `obj` is none of the above, or its BOS id or
      vocabulary size cannot be determined.
  """
  if isinstance(obj, TokenizerBase):
    return obj
  if is_json_path(obj):
    return JsonTokenizer.from_file(obj)
  if isinstance(obj, (str, os.PathLike)):
    return GemmaTokenizer.from_file(obj)
  if isinstance(obj, spm.SentencePieceProcessor):
    return GemmaTokenizer(obj)
  if isinstance(obj, tokenizers.Tokenizer):
    return JsonTokenizer(obj)
  if callable(getattr(obj, "encode", None)) and callable(getattr(obj, "decode", None)):
    return DuckTokenizer(obj)
  raise TokenizerError(
    f"cannot use a {type(obj).__qualname__} as a tokenizer: expected a "
    "GemmaTokenizer, a path to a tokenizer.model or tokenizer.json, a "
    "sentencepiece.SentencePieceProcessor, a tokenizers.Tokenizer, or an "
    "object with "
    "encode(str) -> list[int] and decode(list[int]) -> str"
  )
