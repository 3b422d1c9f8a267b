"""Gemma's chat-turn markers, which changed with Gemma 4.

Gemma 1-3 instruction-tuned models write a turn as
``<start_of_turn>user\\n...<end_of_turn>\\n`` and have no system role (a
system prompt goes at the top of the first user turn). Gemma 4 writes
``<|turn>user\\n...<turn|>\\n`` (ids 105 and 106 in its vocabulary) and has a
``system`` turn (Google's "Gemma 4 prompt formatting" page; the ``gemma``
package's ``Gemma4Tokenizer``). Both end with the generation prompt
``<start>model\\n``. A tokenizer's `TokenizerBase.chat_format` picks the one
whose markers its vocabulary holds.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """How one Gemma generation marks chat turns.

  Attributes:
    start: The piece opening a turn (``<start_of_turn>`` or ``<|turn>``).
    end: The piece closing it (``<end_of_turn>`` or ``<turn|>``).
    system_turn: Whether the format has a ``system`` turn (Gemma 4); without
      one a system prompt is put at the top of the first user turn.
  """

  start: str
  end: str
  system_turn: bool

  def turn(self, role: str, content: str) -> str:
    """One finished turn: ``start + role + '\\n' + content + end + '\\n'``."""
    return f"{self.start}{role}\n{content}{self.end}\n"

  @property
  def generation_prompt(self) -> str:
    """What asks the model for its turn: ``start + 'model\\n'``."""
    return f"{self.start}model\n"


GEMMA_CHAT = ChatFormat("<start_of_turn>", "<end_of_turn>", system_turn=False)
GEMMA4_CHAT = ChatFormat("<|turn>", "<turn|>", system_turn=True)
