"""`gemma-surgery serve` on 2 processes (2 x 4 CPU devices, gloo): process 0
serves, process 1 runs every generation with it; SIGTERM to process 0 ends both.

Streamed requests take the relay's chunked path (process 1 runs the same
chunked loop, consuming the same chunks): a streamed steered chat completion
and a streamed sampled completion (temperature > 0, seed) through the
official `openai` client equal the non-streamed answers and `gs.generate`
with the same edit and seed.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
from helpers.paths import ROOT
from helpers.processes import free_port, launch, wait_all

import gemma_surgery as gs
from gemma_surgery.serve.protocol import chat_template

PROMPT = "The cat sat on"
MESSAGES = [{"role": "user", "content": "Tell me about cats"}]
STEER = {
  "steering": {"features": [{"source": "2-res", "index": 212, "strength": 20.0}]}
}
SAMPLED = {"temperature": 0.9, "seed": 11}
NEW = 8


def _start(tmp_path):
  port, address = free_port(), f"127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(2):
    args = ["-m", "gemma_surgery", "serve", "--model", "tiny", "--sae", "tiny"]
    args += ["--port", str(port), "--mesh", "data=4,model=2", "--stream-chunk", "2"]
    args += ["--coordinator", address, "--num-processes", "2", "--process-id", str(i)]
    logs.append(tmp_path / f"serve{i}.log")
    procs.append(launch(args, 4, logs[-1], extra_path=[ROOT]))
  return procs, logs, f"http://127.0.0.1:{port}"


def _ask(url: str) -> dict:
  """Every request of the test, in order, against a running server."""
  feature = {"layer": "2-res", "index": 212, "strength": 40.0}
  body = {"prompt": PROMPT, "features": [feature], "n_tokens": NEW}
  got = {"steer": httpx.post(f"{url}/v1/steer", json=body, timeout=240).json()}

  async def many():
    async with httpx.AsyncClient(timeout=240) as http:
      bodies = [{"prompt": PROMPT, "max_tokens": NEW} for _ in range(3)]
      answers = await asyncio.gather(
        *(http.post(f"{url}/v1/completions", json=b) for b in bodies)
      )
      return [a.json()["choices"][0]["text"] for a in answers]

  got["texts"] = asyncio.run(many())
  client = openai.OpenAI(
    base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=240
  )
  chat = dict(model="tiny", messages=MESSAGES, max_tokens=NEW, extra_body=STEER)
  got["chat"] = client.chat.completions.create(**chat).choices[0].message.content
  events = list(client.chat.completions.create(**chat, stream=True))
  got["chat_pieces"] = [e.choices[0].delta.content or "" for e in events]
  got["chat_finish"] = events[-1].choices[0].finish_reason
  plain = dict(model="tiny", prompt=PROMPT, max_tokens=NEW, extra_body=SAMPLED)
  got["sampled"] = client.completions.create(**plain).choices[0].text
  events = list(client.completions.create(**plain, stream=True))
  got["sampled_pieces"] = [e.choices[0].text for e in events]
  return got


def test_two_process_server_matches_the_library(tmp_path):
  procs, logs, url = _start(tmp_path)
  deadline = time.monotonic() + 240
  try:
    while True:
      try:
        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      dead = [p.poll() for p in procs]
      assert time.monotonic() < deadline and dead == [None, None], "\n".join(
        log.read_text()[-2000:] for log in logs
      )
      time.sleep(0.5)
    got = _ask(url)
  finally:
    procs[0].send_signal(signal.SIGTERM)
    codes = wait_all(procs, 60)
  lm, sae = gs.load("tiny", progress=False), gs.sae.load_sae("tiny")

  def library(model, prompt=PROMPT, **sampling):
    out = gs.generate(
      model,
      [prompt],
      max_new_tokens=NEW,
      tokenizer=lm.tokenizer,
      eos_id=1,
      **sampling,
    )
    return out.text[0]

  steered = gs.sae.steer_with_feature(lm.model, sae, 212, 40.0)
  assert got["steer"]["STEERED"] == library(steered)
  texts = got["texts"]
  assert got["steer"]["DEFAULT"] == library(lm.model) == texts[0] == texts[2]

  # Streamed through the relay: the chunks arrive as several pieces and
  # concatenate to the non-streamed answer and the library's.
  chat = library(
    gs.sae.steer_with_feature(lm.model, sae, 212, 20.0), chat_template(MESSAGES)
  )
  assert got["chat"] == chat
  assert "".join(got["chat_pieces"]) == chat
  assert sum(bool(p) for p in got["chat_pieces"]) > 1
  assert got["chat_finish"] in ("stop", "length")
  assert chat != library(lm.model, chat_template(MESSAGES))  # the steering acts

  sampled = library(lm.model, **SAMPLED)
  assert got["sampled"] == sampled == "".join(got["sampled_pieces"])
  assert sum(bool(p) for p in got["sampled_pieces"]) > 1
  assert sampled != library(lm.model, temperature=0.9, seed=12)  # seed matters

  # Process 0 re-raises the SIGTERM it handled (uvicorn); process 1 exits 0.
  assert codes == [-signal.SIGTERM, 0], "\n".join(
    log.read_text()[-2000:] for log in logs
  )
  assert "serving" in logs[0].read_text() and "serving" not in logs[1].read_text()
