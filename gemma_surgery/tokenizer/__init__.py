"""The tokenizer wing: Gemma's SentencePiece tokenizer, read without `gemma`.

* `gemma`: `GemmaTokenizer` (a ``tokenizer.model`` file) and `as_tokenizer`,
  which accepts ours, a raw ``SentencePieceProcessor`` or any object with the
  same methods.
* `base`: what every tokenizer here shares (display pieces, id checks).
* `adapter`: `DuckTokenizer`, the adapter behind `as_tokenizer`.
"""

from gemma_surgery.tokenizer.adapter import DuckTokenizer
from gemma_surgery.tokenizer.base import SPACE_MARKER, TokenizerBase, display_piece
from gemma_surgery.tokenizer.gemma import GemmaTokenizer, Tokenizer, as_tokenizer

__all__ = [
  "SPACE_MARKER",
  "DuckTokenizer",
  "GemmaTokenizer",
  "Tokenizer",
  "TokenizerBase",
  "as_tokenizer",
  "display_piece",
]
