"""Streamed answers: a row's text as its tokens are decoded.

`TextStream` turns the chunks of one row (`Batcher` listener pieces) into
new text: it decodes the tokens so far (up to EOS and the request's
``max_new_tokens``), cuts the text at the first stop string, and hands out
only text that can't change any more: a trailing U+FFFD (an incomplete
UTF-8 byte sequence) and the last ``len(longest stop) - 1`` characters (the
start of a stop string) wait for the next chunk. So the pieces concatenate
to the non-streamed answer, and a row's stream ends as soon as the row is
done, while the rest of its batch may still be generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream", "cut_at_end"]


def cut_at_end(tokens: list[int], end_ids: Sequence[int]) -> tuple[list[int], bool]:
  """``tokens`` before the first of ``end_ids``, and whether one occurred."""
  ends = [tokens.index(e) for e in end_ids if e in tokens]
  return (tokens[: min(ends)], True) if ends else (tokens, False)


class TextStream:
  """Incremental text of one streamed row.

  Args:
    tokenizer: Decodes token ids.
    end_ids: Ids that end the row (EOS; a chat's end of turn).
    limit: The request's ``max_new_tokens``.
    stop: Stop strings (the text ends before the first).
  """

  def __init__(
    self, tokenizer: Any, end_ids: Sequence[int], limit: int, stop: Sequence[str]
  ):
    self.tokenizer, self.end_ids, self.limit = tokenizer, tuple(end_ids), limit
    self.stop = tuple(stop)
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.tokens: list[int] = []
    self.sent = ""
    self.reason: str | None = None  # set once the row is done

  def feed(self, tokens: Sequence[int]) -> str:
    """New text after ``tokens`` (the row's next decoded tokens)."""
    if self.reason is not None:
      return ""
    self.tokens += [int(t) for t in tokens]
    self.tokens, ended = cut_at_end(self.tokens, self.end_ids)
    if ended:
      self.reason = "stop"
    elif len(self.tokens) >= self.limit:
      self.tokens = self.tokens[: self.limit]
      self.reason = "length"
    text = self.tokenizer.decode(self.tokens) if self.tokens else ""
    cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
    if cuts:
      text, self.reason = text[: min(cuts)], "stop"
    if self.reason is None:
      text = text.rstrip("\ufffd")
      text = text[: len(text) - self.hold] if self.hold else text
    return self._send(text)

  def finish(self, text: str, reason: str) -> str:
    """The rest of the final ``text`` (the non-streamed answer), if any."""
    self.reason = self.reason or reason
    return self._send(text)

  def _send(self, text: str) -> str:
    if not text.startswith(self.sent) or len(text) <= len(self.sent):
      return ""
    piece, self.sent = text[len(self.sent) :], text
    return piece
