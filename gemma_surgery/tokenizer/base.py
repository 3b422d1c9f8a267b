"""Shared implementation of the tokenizer interface (see `tokenizer`).

`TokenizerBase` holds batching, id validation, padding removal and display
logic; subclasses only provide encoding/decoding of single sequences and raw
vocabulary pieces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError, TokenizerError
from gemma_surgery.tokenizer.chat import GEMMA4_CHAT, GEMMA_CHAT, ChatFormat
from gemma_surgery.validation import check_token_ids, to_host_array

SPACE_MARKER = "␣"
_SP_SPACE = "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Markup pieces: turn markers, <unusedN>, <mask>, HTML tags, [@BOS@]...
_TAG_PIECE = re.compile(r"^(<[^<>]+>|\[@[^\]]*@\])$")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_controls(text: str) -> str:
  out = []
  for ch in text:
    if ch in _ESCAPES:
      out.append(_ESCAPES[ch])
    elif ord(ch) < 0x20 or ord(ch) == 0x7F:
      out.append(f"\\x{ord(ch):02x}")
    else:
      out.append(ch)
  return "".join(out)


def display_piece(raw: str, *, space_marker: str = SPACE_MARKER) -> str:
  """Renders one raw SentencePiece piece for display.

  Args:
    raw: The piece as stored in the vocabulary (e.g. `'▁the'`, `'<0x0A>'`,
      `'<bos>'`).
    space_marker: What `▁` and literal spaces become.

  Returns:
    `'▁the'` -> `'␣the'`; `'<0x0A>'` -> `'\\n'` (backslash, n); `'<0x41>'` ->
    `'A'`; bytes >= 0x80 (parts of a UTF-8 sequence) stay `'<0xE2>'`; other
    pieces keep their text with control characters escaped.
  """
  m = _BYTE_PIECE.match(raw)
  if m:
    value = int(m.group(1), 16)
    if value >= 0x80:
      return raw
    raw = chr(value)
  text = raw.replace(_SP_SPACE, space_marker).replace(" ", space_marker)
  return _escape_controls(text)


class TokenizerBase:
  """Shared batching, id normalization and display logic.

  Subclasses implement `_encode_one` (text to ids, without BOS),
  `_decode_list` (valid ids without padding to text) and `_raw_piece`, and set
  `_bos`, `_eos`, `_pad`, `_unk` and `_vocab_size`.
  """

  _bos: int
  _eos: int | None
  _pad: int | None
  _unk: int | None
  _vocab_size: int
  _ordinary: np.ndarray | None = None

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int | None:
    return self._eos

  @property
  def pad_id(self) -> int | None:
    return self._pad

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def has_piece(self, piece: str) -> bool:
    """Whether ``piece`` is one vocabulary entry (e.g. ``'<|turn>'``)."""
    ids = self._encode_one(piece)
    return len(ids) == 1 and self._raw_piece(int(ids[0])) == piece

  @property
  def chat_format(self) -> ChatFormat:
    """The chat-turn markers of this vocabulary (`tokenizer.chat`).

    `GEMMA4_CHAT` (``<|turn>``/``<turn|>``) when the vocabulary holds both of
    its markers, else `GEMMA_CHAT` (``<start_of_turn>``/``<end_of_turn>``).
    """
    if all(self.has_piece(p) for p in (GEMMA4_CHAT.start, GEMMA4_CHAT.end)):
      return GEMMA4_CHAT
    return GEMMA_CHAT

  def _encode_one(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_list(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _raw_piece(self, token_id: int) -> str:
    """Vocabulary piece (or decoded text) of one valid id."""
    raise NotImplementedError

  def _processor(self) -> Any:
    """The SentencePiece processor behind this tokenizer, or None."""
    return None

  def _is_ordinary(self, token_id: int) -> bool:
    if token_id in (self._bos, self._eos, self._pad, self._unk):
      return False
    sp = self._processor()
    if sp is not None:
      kinds = (sp.is_control, sp.is_unknown, sp.is_unused, sp.is_byte)
      if any(kind(token_id) for kind in kinds):
        return False
    text = self._raw_piece(token_id)
    return bool(text) and "\ufffd" not in text and not _TAG_PIECE.match(text)

  def ordinary_ids(self) -> np.ndarray:
    """``[n]`` ascending ids of ordinary text pieces (computed once).

    Excluded: the special ids (BOS, EOS, PAD, UNK); with a SentencePiece
    processor, control, unknown, unused and byte-fallback pieces; and pieces
    that are markup tags (``<start_of_turn>``, ``<unused0>``, ``<mask>``,
    ``<h1>``, ``[@BOS@]``), empty, or not valid text (``U+FFFD``).
    Random-token analyses draw from these, so their scores don't depend on
    how the model treats control or byte pieces.
    """
    if self._ordinary is None:
      ids = [i for i in range(self._vocab_size) if self._is_ordinary(i)]
      self._ordinary = np.array(ids, np.int32)
    return self._ordinary

  def encode(
    self,
    text: str | Sequence[str],
    add_bos: bool = True,
    *,
    add_eos: bool = False,
  ) -> list[int] | list[list[int]]:
    """Encodes text into token ids.

    Args:
      text: One string, or a sequence of strings (encoded independently).
      add_bos: Prepend `bos_id` (Gemma models expect it at position 0).
      add_eos: Append `eos_id`.

    Returns:
      `list[int]` for a string, `list[list[int]]` for a sequence of strings.

    Raises:
      InputError: If `text` is not a string or a sequence of strings.
      TokenizerError: If `add_eos` is set but the tokenizer has no EOS id.
    """
    if isinstance(text, str):
      return self._finish(self._encode_one(text), add_bos, add_eos)
    if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
      return [self._finish(self._encode_one(t), add_bos, add_eos) for t in text]
    raise InputError(
      f"encode expects a str or a sequence of str, got {type(text).__name__}"
    )

  def _finish(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    ids = [int(i) for i in ids]
    if add_bos:
      ids = [self._bos, *ids]
    if add_eos:
      if self._eos is None:
        raise TokenizerError("add_eos=True but this tokenizer has no EOS id")
      ids.append(self._eos)
    return ids

  def decode(self, ids: Any) -> str | list[str]:
    """Decodes token ids into text.

    Padding ids are dropped; EOS does not stop decoding (ids after it are
    decoded too). Other special pieces (BOS, EOS) are rendered however the
    underlying tokenizer renders them (SentencePiece: as nothing).

    Args:
      ids: An int, or ids with axis `seq` (list, NumPy/JAX array, 1-D Penzai
        `NamedArray`), or a batch with axes `batch, seq` (list of lists, 2-D
        array) which gives one string per row.

    Returns:
      A string, or a list of strings for batched input.

    Raises:
      InputError: If ids are not integers, are out of `[0, vocab_size)`, or
        have more than two axes (or more than one for named arrays: unwrap
        them in an explicit order first, e.g. `ids.unwrap('batch', 'seq')`).
    """
    if isinstance(ids, (list, tuple)) and ids and not _is_scalar(ids[0]):
      return [self._decode_row(row) for row in ids]
    arr, labels = to_host_array(ids)
    if labels is not None and arr.ndim > 1:
      raise InputError(
        f"decode got a named array with axes {labels}; unwrap it in an "
        "explicit order first, e.g. ids.unwrap('batch', 'seq')"
      )
    if arr.ndim == 2:
      return [self._decode_row(row) for row in arr]
    if arr.ndim > 2:
      raise InputError(f"decode expects 0-2 axes, got shape {arr.shape}")
    return self._decode_row(arr.reshape(-1) if arr.ndim == 0 else arr)

  def _decode_row(self, row: Any) -> str:
    arr = np.asarray(row)
    if arr.size == 0:
      return ""
    check_token_ids(arr, self._vocab_size)
    return self._decode_list(
      [int(i) for i in arr.reshape(-1) if self._pad is None or i != self._pad]
    )

  def piece(self, token_id: int, *, space_marker: str = SPACE_MARKER) -> str:
    """Display text of one token id (see `display_piece`).

    Raises:
      InputError: If `token_id` is not in `[0, vocab_size)`.
    """
    check_token_ids(np.asarray(token_id), self._vocab_size)
    return display_piece(self._raw_piece(int(token_id)), space_marker=space_marker)

  def pieces(self, ids: Any, *, space_marker: str = SPACE_MARKER) -> list[str]:
    """Display texts of ids with one axis `seq` (list or array)."""
    arr, _ = to_host_array(ids)
    if arr.ndim > 1:
      raise InputError(f"pieces expects one axis, got shape {arr.shape}")
    arr = arr.reshape(-1)
    check_token_ids(arr, self._vocab_size)
    return [
      display_piece(self._raw_piece(int(i)), space_marker=space_marker) for i in arr
    ]


def _is_scalar(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) or np.ndim(x) == 0
