"""The tokenizer wing: Gemma's SentencePiece tokenizer, read without `gemma`.

* `gemma`: `GemmaTokenizer` (a ``tokenizer.model`` file) and `as_tokenizer`,
  which accepts ours, a raw ``SentencePieceProcessor`` or any object with the
  same methods.
* `base`: what every tokenizer here shares (display pieces, id checks).
* `adapter`: `DuckTokenizer`, the adapter behind `as_tokenizer`.
"""

from gemma_surgery.tokenizer.adapter import DuckTokenizer
from gemma_surgery.tokenizer.base import SPACE_MARKER, TokenizerBase, display_piece
from gemma_surgery.tokenizer.chat import GEMMA4_CHAT, GEMMA_CHAT, ChatFormat
from gemma_surgery.tokenizer.gemma import GemmaTokenizer, Tokenizer, as_tokenizer
from gemma_surgery.tokenizer.json_file import JsonTokenizer

__all__ = [
  "GEMMA4_CHAT",
  "GEMMA_CHAT",
  "SPACE_MARKER",
  "ChatFormat",
  "DuckTokenizer",
  "GemmaTokenizer",
  "JsonTokenizer",
  "Tokenizer",
  "TokenizerBase",
  "as_tokenizer",
  "display_piece",
]
