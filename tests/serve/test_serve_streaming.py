"""Streaming is real: the first text reaches the official `openai` client
while the generation is still running.

The server runs in this process (uvicorn in a thread) on an `Engine` whose
generation is held right after the first chunk that carries text, until the
client has received that text (or 60 s pass). If text were only sent once
the generation had finished, the client could not receive it during the hold
and the hold would time out. The streamed text equals `gs.generate`'s.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn
from helpers.processes import free_port

import gemma_surgery as gs
from gemma_surgery import serve

PROMPT = "Once upon a time there"
NEW = 16


class HeldEngine(serve.Engine):
  """Holds a streamed generation after its first chunk with text."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.release = threading.Event()
    self.held: bool | None = None  # True: released in time; False: timed out
    self.after = 0  # chunks decoded after the hold

  def run(self, rows, progress=None):
    if progress is None:
      return super().run(rows)
    tokens: list[int] = []

    def hold(chunk):
      progress(chunk)
      if self.held is not None:
        self.after += 1
        return
      tokens.extend(int(t) for t in chunk.tokens[0])
      if self.tokenizer.decode(tokens).rstrip("\ufffd"):
        self.held = self.release.wait(60)

    return super().run(rows, hold)


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def server(lm):
  engine = HeldEngine(
    lm.model, lm.tokenizer, eos_id=None, limits=serve.Limits(64, 32), stream_chunk=2
  )
  port = free_port()
  config = uvicorn.Config(
    serve.make_app(engine, name="tiny"),
    host="127.0.0.1",
    port=port,
    log_level="warning",
  )
  server = uvicorn.Server(config)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
    time.sleep(0.1)
  yield engine, f"http://127.0.0.1:{port}/v1"
  server.should_exit = True
  thread.join(30)


def test_first_text_arrives_while_the_generation_is_held(server, lm):
  engine, url = server
  client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
  stream = client.completions.create(
    model="tiny", prompt=PROMPT, max_tokens=NEW, stream=True
  )
  texts = []
  for event in stream:
    if event.choices[0].text:
      texts.append(event.choices[0].text)
      if len(texts) == 1:
        # Received while the generation waits for us: nothing decoded since.
        assert engine.held is None and engine.after == 0
        engine.release.set()
  assert engine.held is True  # released by the client, not timed out
  assert engine.after >= 3  # the rest was decoded afterwards
  assert len(texts) > 2
  expected = gs.generate(lm.model, [PROMPT], max_new_tokens=NEW, tokenizer=lm.tokenizer)
  assert "".join(texts) == expected.text[0]
