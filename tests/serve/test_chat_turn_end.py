"""Chat answers end at the model's end of turn (`<end_of_turn>`), completions
don't: checked on an in-process server whose model is pushed (a logit steer)
to emit `<end_of_turn>` after a few tokens."""

from __future__ import annotations

import threading
import time

import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from helpers.processes import free_port
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import serve
from gemma_surgery.serve.protocol import chat_template
from gemma_surgery.serve.streaming import TextStream, cut_at_end

NEW = 8
MESSAGES = [{"role": "user", "content": "Tell me about cats"}]


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def ending(lm):
  """The model steered at its logits towards `<end_of_turn>`, and that id."""
  end_id = lm.tokenizer.encode("<end_of_turn>", add_bos=False)[0]
  onehot = np.zeros(lm.tokenizer.vocab_size, np.float32)
  onehot[end_id] = 1.0
  named = pz.nx.wrap(jnp.asarray(onehot)).tag("vocabulary")
  return gs.steer(lm.model, "logits", None, named, 1e3), end_id


@pytest.fixture(scope="module")
def client(lm, ending):
  engine = serve.Engine(
    ending[0], lm.tokenizer, eos_id=1, limits=serve.Limits(64, 32), stream_chunk=2
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
  yield openai.OpenAI(
    base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300
  )
  server.should_exit = True
  thread.join(30)


def test_the_steered_model_emits_end_of_turn(lm, ending):
  model, end_id = ending
  prompt = [chat_template(MESSAGES)]
  out = gs.generate(model, prompt, max_new_tokens=NEW, tokenizer=lm.tokenizer)
  assert [int(t) for t in out.tokens[0]] == [end_id] * NEW


def test_chat_stops_at_the_end_of_turn_and_completion_runs_on(client):
  reply = client.chat.completions.create(
    model="tiny", messages=MESSAGES, max_tokens=NEW
  )
  assert reply.choices[0].message.content == ""
  assert reply.choices[0].finish_reason == "stop"
  assert reply.usage.completion_tokens == 0
  chunks = list(
    client.chat.completions.create(
      model="tiny", messages=MESSAGES, max_tokens=NEW, stream=True
    )
  )
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
  assert chunks[-1].choices[0].finish_reason == "stop"
  # Negative control: a completion is not a turn; it runs to max_tokens.
  plain = client.completions.create(
    model="tiny", prompt=chat_template(MESSAGES), max_tokens=NEW
  )
  assert plain.choices[0].finish_reason == "length"
  assert plain.usage.completion_tokens == NEW


def test_cut_at_the_first_end_id():
  assert cut_at_end([7, 5, 9, 1], (1, 5)) == ([7], True)
  assert cut_at_end([7, 9], (1, 5)) == ([7, 9], False)
  assert cut_at_end([7, 9], ()) == ([7, 9], False)


def test_text_stream_ends_at_any_end_id(lm):
  ids = lm.tokenizer.encode("Hello there", add_bos=False)
  stream = TextStream(lm.tokenizer, (1, 5), limit=16, stop=())
  text = stream.feed(list(ids) + [5, *ids])
  assert stream.reason == "stop"
  assert text == lm.tokenizer.decode(list(ids))
