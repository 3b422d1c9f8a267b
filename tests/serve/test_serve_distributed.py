"""`gemma-surgery serve` on 2 processes (2 x 4 CPU devices, gloo): process 0
serves, process 1 runs every generation with it; SIGTERM to process 0 ends both.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
from helpers.paths import ROOT
from helpers.processes import free_port, launch, wait_all

import gemma_surgery as gs

PROMPT = "The cat sat on"


def test_two_process_server_matches_the_library(tmp_path):
  port, address = free_port(), f"127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(2):
    args = ["-m", "gemma_surgery", "serve", "--model", "tiny", "--sae", "tiny"]
    args += ["--port", str(port), "--mesh", "data=4,model=2"]
    args += ["--coordinator", address, "--num-processes", "2", "--process-id", str(i)]
    logs.append(tmp_path / f"serve{i}.log")
    procs.append(launch(args, 4, logs[-1], extra_path=[ROOT]))
  url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
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
    feature = {"layer": "2-res", "index": 212, "strength": 40.0}
    body = {"prompt": PROMPT, "features": [feature], "n_tokens": 8}
    answer = httpx.post(f"{url}/v1/steer", json=body, timeout=240).json()

    async def many():
      async with httpx.AsyncClient(timeout=240) as http:
        bodies = [{"prompt": PROMPT, "max_tokens": 8} for _ in range(3)]
        got = await asyncio.gather(
          *(http.post(f"{url}/v1/completions", json=b) for b in bodies)
        )
        return [g.json()["choices"][0]["text"] for g in got]

    texts = asyncio.run(many())
  finally:
    procs[0].send_signal(signal.SIGTERM)
    codes = wait_all(procs, 60)
  lm, sae = gs.load("tiny", progress=False), gs.sae.load_sae("tiny")

  def library(model):
    out = gs.generate(
      model, [PROMPT], max_new_tokens=8, tokenizer=lm.tokenizer, eos_id=1
    )
    return out.text[0]

  assert answer["STEERED"] == library(
    gs.sae.steer_with_feature(lm.model, sae, 212, 40.0)
  )
  assert answer["DEFAULT"] == library(lm.model) == texts[0] == texts[2]
  # Process 0 re-raises the SIGTERM it handled (uvicorn); process 1 exits 0.
  assert codes == [-signal.SIGTERM, 0], "\n".join(
    log.read_text()[-2000:] for log in logs
  )
  assert "serving" in logs[0].read_text() and "serving" not in logs[1].read_text()
