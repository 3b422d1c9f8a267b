"""The server's chat template in Gemma 1-3's and Gemma 4's turn markers.

Expected prompts are written from Google's prompt-formatting pages: Gemma 3
("<start_of_turn>user ... <end_of_turn>", a system prompt at the top of the
first user turn) and Gemma 4 ("<|turn>system\\nYou are a helpful
assistant.<turn|>\\n<|turn>user\\nHello.<turn|>\\n").
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from gemma_surgery.serve import protocol  # noqa: E402
from gemma_surgery.tokenizer import GEMMA4_CHAT, GEMMA_CHAT  # noqa: E402

MESSAGES = [
  {"role": "system", "content": "You are a helpful assistant."},
  {"role": "user", "content": "Hello."},
  {"role": "assistant", "content": "Hi!"},
  {"role": "user", "content": "Bye."},
]


def test_gemma4_turns_have_a_system_turn():
  assert protocol.chat_template(MESSAGES, GEMMA4_CHAT) == (
    "<|turn>system\nYou are a helpful assistant.<turn|>\n"
    "<|turn>user\nHello.<turn|>\n"
    "<|turn>model\nHi!<turn|>\n"
    "<|turn>user\nBye.<turn|>\n"
    "<|turn>model\n"
  )


def test_gemma3_turns_put_the_system_prompt_in_the_first_user_turn():
  expected = (
    "<start_of_turn>user\nYou are a helpful assistant.\n\nHello.<end_of_turn>\n"
    "<start_of_turn>model\nHi!<end_of_turn>\n"
    "<start_of_turn>user\nBye.<end_of_turn>\n"
    "<start_of_turn>model\n"
  )
  assert protocol.chat_template(MESSAGES) == expected
  assert protocol.chat_template(MESSAGES, GEMMA_CHAT) == expected


def test_chat_job_uses_the_given_markers():
  body = {"messages": MESSAGES[1:2], "max_tokens": 4}
  limits, space = protocol.Limits(), protocol.Steerable({}, 8, 2)
  job = protocol.chat_job(body, limits, space, GEMMA4_CHAT)
  assert job.prompt == "<|turn>user\nHello.<turn|>\n<|turn>model\n"
  assert protocol.chat_job(body, limits, space).prompt.startswith("<start_of_turn>")
