"""`JsonTokenizer`: a Hugging Face ``tokenizer.json`` (fast-tokenizer format).

Gemma 4's Hugging Face repositories ship their tokenizer as ``tokenizer.json``
(a BPE model with byte fallback, spaces written ``▁``). This reads it with
the `tokenizers` package (Rust, no network, no transformers) behind the same
interface as `GemmaTokenizer`, so the ids are the ones ``transformers``'
``PreTrainedTokenizerFast(tokenizer_file=...)`` gives for the same file.

Special tokens: BOS, EOS, PAD and UNK are named by a ``tokenizer_config.json``
beside the file (``bos_token`` ...) when there is one, else Gemma's
``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``. Text is encoded as Hugging Face
does with ``add_special_tokens=False``: the special tokens written in the text
(``<|turn>``, ``<start_of_turn>``, ``<bos>``) become their ids. Decoding
renders special tokens as their text (``decode([2])`` is ``'<bos>'``), as
``PreTrainedTokenizerFast.decode`` does by default; padding is dropped.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import tokenizers

from gemma_surgery.errors import TokenizerError
from gemma_surgery.tokenizer.base import TokenizerBase

_DEFAULTS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}


def _token_names(config: pathlib.Path | None) -> dict[str, str | None]:
  """Special-token texts from a ``tokenizer_config.json`` (Gemma's if absent)."""
  names: dict[str, str | None] = dict(_DEFAULTS)
  if config is None or not config.is_file():
    return names
  try:
    data = json.loads(config.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise TokenizerError(f"{str(config)!r} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise TokenizerError(f"{str(config)!r} holds no JSON object")
  for key in names:
    value = data.get(f"{key}_token", names[key])
    if isinstance(value, dict):  # {"content": "<bos>", "lstrip": ...}
      value = value.get("content")
    if value is not None and not isinstance(value, str):
      raise TokenizerError(f"{str(config)!r}: {key}_token is {value!r}, not text")
    names[key] = value or None
  return names


class JsonTokenizer(TokenizerBase):
  """A ``tokenizer.json`` tokenizer with `GemmaTokenizer`'s interface.

  Attributes:
    tokenizer: The wrapped `tokenizers.Tokenizer`.
    path: The file it was loaded from, if any.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    path: pathlib.Path | None = None,
    *,
    special_tokens: dict[str, str | None] | None = None,
  ) -> None:
    """Wraps a `tokenizers.Tokenizer`.

    Args:
      tokenizer: The tokenizer.
      path: Where it was read from (for messages).
      special_tokens: Texts of the ``bos``, ``eos``, ``pad`` and ``unk``
        tokens (default Gemma's ``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``;
        None: the tokenizer has none).

    Raises:
      TokenizerError: Empty vocabulary, or no BOS token in it.
    """
    self.tokenizer = tokenizer
    self.path = path
    where = str(path) if path else "the tokenizer"
    self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    if self._vocab_size <= 0:
      raise TokenizerError(f"{where} has an empty vocabulary")
    names = dict(_DEFAULTS, **(special_tokens or {}))
    ids = {k: None if v is None else tokenizer.token_to_id(v) for k, v in names.items()}
    if ids["bos"] is None:
      raise TokenizerError(
        f"{where} has no BOS token {names['bos']!r} in its vocabulary; name it"
        " with bos_token in a tokenizer_config.json beside tokenizer.json"
      )
    self._bos = int(ids["bos"])
    self._eos, self._pad, self._unk = (
      None if ids[k] is None else int(ids[k]) for k in ("eos", "pad", "unk")
    )
    self._special = {
      int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
    }

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> JsonTokenizer:
    """Loads a ``tokenizer.json`` (and a ``tokenizer_config.json`` beside it).

    Raises:
      TokenizerError: If the file is missing or is not a ``tokenizers`` JSON
        file (the message names the path), or names no BOS token.
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
      what = "is a directory, not a file" if p.is_dir() else "does not exist"
      raise TokenizerError(f"tokenizer file {str(p)!r} {what}")
    try:
      tok = tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception.
      raise TokenizerError(
        f"{str(p)!r} is not a valid Hugging Face tokenizer.json: {e}"
      ) from e
    names = _token_names(p.with_name("tokenizer_config.json"))
    return cls(tok, p, special_tokens=names)

  def __repr__(self) -> str:
    src = str(self.path) if self.path else "<in-memory>"
    return f"JsonTokenizer({src!r}, vocab_size={self._vocab_size})"

  def _encode_one(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def _decode_list(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=False)

  def _raw_piece(self, token_id: int) -> str:
    piece = self.tokenizer.id_to_token(token_id)
    return f"<id {token_id}>" if piece is None else piece

  def _is_ordinary(self, token_id: int) -> bool:
    if token_id in self._special or self.tokenizer.id_to_token(token_id) is None:
      return False
    return super()._is_ordinary(token_id)

  def piece_to_id(self, piece: str) -> int:
    """Id of a raw vocabulary piece (e.g. ``'<|turn>'``, ``'▁the'``).

    Raises:
      TokenizerError: If the piece is not in the vocabulary.
    """
    token_id = self.tokenizer.token_to_id(piece)
    if token_id is None:
      raise TokenizerError(f"piece {piece!r} is not in the vocabulary")
    return int(token_id)

  def has_piece(self, piece: str) -> bool:
    return self.tokenizer.token_to_id(piece) is not None


def is_json_path(path: Any) -> bool:
  """Whether ``path`` names a ``.json`` file (a ``tokenizer.json``)."""
  return isinstance(path, (str, os.PathLike)) and str(path).endswith(".json")
