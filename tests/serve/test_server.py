"""`gemma-surgery serve` as a real process on loopback, with the embedded model.

Talks to it with the official `openai` client (completion, chat, streaming)
and `httpx` (Neuronpedia's steer shape, concurrency, errors); every steered
answer is compared with the library's `gs.generate` under the same edit.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from helpers.paths import ROOT
from helpers.processes import free_port, launch, wait_all
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.serve.protocol import chat_template

NEW = 8
FEATURE = 212
# Prompts of one token length: the library references share compilations.
PROMPTS = ["The cat sat on", "The dog ran to"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  port = free_port()
  log = tmp_path_factory.mktemp("serve") / "server.log"
  args = ["-m", "gemma_surgery", "serve", "--model", "tiny", "--sae", "tiny"]
  args += ["--port", str(port), "--max-prompt-tokens", "64", "--max-new-tokens", "32"]
  args += ["--window-ms", "50", "--stream-chunk", "2"]
  proc = launch(args, devices=1, log=log, extra_path=[ROOT])
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 180
  while True:
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      wait_all([proc], 0)
      pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
    time.sleep(0.5)
  yield url
  proc.terminate()
  wait_all([proc], 10)


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def sae():
  return gs.sae.load_sae("tiny")


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def library(lm, sae, prompt, strength=None, new=NEW):
  """The library's greedy continuation (EOS-stopped), steered or not."""
  model = lm.model
  if strength is not None:
    model = gs.sae.steer_with_feature(model, sae, FEATURE, strength)
  out = gs.generate(
    model, [prompt], max_new_tokens=new, tokenizer=lm.tokenizer, eos_id=1
  )
  return out.text[0]


def steering(strength):
  return {
    "steering": {
      "features": [{"source": "2-res", "index": FEATURE, "strength": strength}]
    }
  }


def test_openai_completion_plain_and_steered(client, lm, sae):
  plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW)
  assert plain.choices[0].text == library(lm, sae, PROMPTS[0])
  steered = client.completions.create(
    model="tiny", prompt=PROMPTS[0], max_tokens=NEW, extra_body=steering(40.0)
  )
  expected = library(lm, sae, PROMPTS[0], 40.0)
  assert steered.choices[0].text == expected
  assert expected != plain.choices[0].text  # the steering does something
  assert steered.usage.completion_tokens == NEW


def test_openai_chat_and_streaming(client, lm, sae):
  messages = [{"role": "user", "content": "Tell me about cats"}]
  reply = client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=NEW, extra_body=steering(20.0)
  )
  text = library(lm, sae, chat_template(messages), 20.0)
  assert reply.choices[0].message.content == text
  chunks = client.chat.completions.create(
    model="tiny",
    messages=messages,
    max_tokens=NEW,
    stream=True,
    extra_body=steering(20.0),
  )
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
  new = 16
  pieces = list(
    client.completions.create(
      model="tiny", prompt=PROMPTS[1], max_tokens=new, stream=True
    )
  )
  texts = [c.choices[0].text for c in pieces if c.choices[0].text]
  # Sent as decoded: the first token, then chunks of 2 (--stream-chunk 2).
  assert len(texts) > 3
  assert "".join(texts) == library(lm, sae, PROMPTS[1], new=new)
  assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def raw(vector, layer=1, strength=3.0, site="resid_post"):
  item = {"site": site, "layer": layer, "vector": vector, "strength": strength}
  return {"steering": {"vectors": [item]}}


def test_raw_steering_vector_equals_the_library(client, lm):
  vector = np.random.default_rng(7).standard_normal(256).astype(np.float32)
  named = pz.nx.wrap(jnp.asarray(vector)).tag("embedding")
  model = gs.steer(lm.model, "resid_post", 1, named, 3.0)
  out = gs.generate(
    model, [PROMPTS[0]], max_new_tokens=NEW, tokenizer=lm.tokenizer, eos_id=1
  )
  answer = client.completions.create(
    model="tiny",
    prompt=PROMPTS[0],
    max_tokens=NEW,
    extra_body=raw([float(v) for v in vector]),
  )
  assert answer.choices[0].text == out.text[0]
  plain = gs.generate(
    lm.model, [PROMPTS[0]], max_new_tokens=NEW, tokenizer=lm.tokenizer, eos_id=1
  )
  assert out.text[0] != plain.text[0]  # the vector does something


def test_neuronpedia_steer_shape(server, lm, sae):
  body = {
    "prompt": PROMPTS[1],
    "modelId": "tiny",
    "features": [
      {"modelId": "tiny", "layer": "2-res", "index": FEATURE, "strength": 10.0}
    ],
    "strength_multiplier": 4.0,
    "n_tokens": NEW,
    "temperature": 0,
    "freq_penalty": 0,
    "seed": 0,
  }
  answer = httpx.post(f"{server}/v1/steer", json=body, timeout=120).json()
  assert answer["STEERED"] == library(lm, sae, PROMPTS[1], 40.0)
  assert answer["DEFAULT"] == library(lm, sae, PROMPTS[1])
  assert answer["STEERED"] != answer["DEFAULT"]


def test_32_concurrent_requests_get_their_own_steering(server, lm, sae):
  strengths = [float(4 * i - 62) for i in range(32)]  # all different
  prompts = [PROMPTS[i % 2] for i in range(32)]

  async def ask(http, prompt, strength):
    body = {"prompt": prompt, "max_tokens": NEW, **steering(strength)}
    response = await http.post(f"{server}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]

  async def main():
    async with httpx.AsyncClient(timeout=300) as http:
      return await asyncio.gather(
        *(ask(http, p, s) for p, s in zip(prompts, strengths, strict=True))
      )

  before = len(httpx.get(f"{server}/health").json()["batches"])
  texts = asyncio.run(main())
  batches = httpx.get(f"{server}/health").json()["batches"][before:]
  assert sum(batches) == 32 and max(batches) > 1  # they were batched
  # The reference: the library's per-row sweep (== single runs, see
  # tests/generation/test_sweep.py) of every strength on both prompts.
  vector = gs.sae.feature_direction(sae, FEATURE)
  ref = gs.sweep(
    lm.model,
    lambda m, s: gs.steer(m, "resid_post", 2, vector, s),
    PROMPTS,
    grid={"s": strengths},
    max_new_tokens=NEW,
    tokenizer=lm.tokenizer,
    eos_id=1,
  )
  expected = [ref.text[i, i % 2] for i in range(32)]
  assert texts == expected
  assert len(set(texts)) > 3


@pytest.mark.parametrize(
  ("path", "body", "needle"),
  [
    ("completions", b"{not json", "Malformed JSON"),
    (
      "completions",
      b'{"prompt": "hi", "steering": {"features": [{"source": "9-res",'
      b' "index": 1, "strength": 1}]}}',
      "unknown SAE source/layer '9-res'",
    ),
    (
      "steer",
      b'{"prompt": "hi", "features": [{"layer": "2-res", "index": 5000,'
      b' "strength": 1}]}',
      "index 5000 is not a feature",
    ),
    (
      "steer",
      b'{"prompt": "hi", "features": [{"layer": "2-res", "index": 1,'
      b' "strength": NaN}]}',
      "not a finite number",
    ),
    ("completions", b'{"prompt": "' + b"word " * 100 + b'"}', "at most 64"),
    (
      "chat/completions",
      b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}',
      "max_tokens=33 is out of range",
    ),
    (
      "completions",
      json.dumps({"prompt": "hi", **raw([0.5] * 255)}).encode(),
      "list of 256 numbers (the model's width), got 255",
    ),
    (
      "completions",
      json.dumps({"prompt": "hi", **raw([0.5] * 255 + [float("nan")])}).encode(),
      "not finite",
    ),
    (
      "completions",
      json.dumps({"prompt": "hi", **raw([0.5] * 256, layer=6)}).encode(),
      "layer 6 is out of range; valid: 0..5",
    ),
    (
      "steer",
      json.dumps(
        {
          "prompt": "hi",
          "vectors": raw([0.5] * 256, site="attn.z")["steering"]["vectors"],
        }
      ).encode(),
      "site 'attn.z' can't be steered",
    ),
  ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, path, body, needle):
  response = httpx.post(f"{server}/v1/{path}", content=body, timeout=60)
  assert response.status_code == 400
  assert needle in response.json()["error"]["message"]
  ok = httpx.post(
    f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120
  )
  assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_sampled_stream_equals_the_non_streamed_answer(client, lm):
  """temperature > 0 with a seed: the same tokens streamed or not, and as
  `gs.generate` with that seed (each request runs alone: batch 1)."""
  args = dict(model="tiny", prompt=PROMPTS[0], max_tokens=NEW)
  sampling = {"temperature": 0.9, "seed": 11}
  whole = client.completions.create(**args, extra_body=sampling).choices[0].text
  events = client.completions.create(**args, extra_body=sampling, stream=True)
  pieces = [e.choices[0].text for e in events]
  out = gs.generate(
    lm.model,
    [PROMPTS[0]],
    max_new_tokens=NEW,
    tokenizer=lm.tokenizer,
    eos_id=1,
    **sampling,
  )
  assert whole == "".join(pieces) == out.text[0]
  assert sum(bool(p) for p in pieces) > 1
  # Negative control: another seed samples another continuation.
  other = client.completions.create(**args, extra_body={**sampling, "seed": 12})
  assert other.choices[0].text != whole
