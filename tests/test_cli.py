"""The `gemma-surgery` command end to end on a fixture checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import FIXTURES, HF_FIXTURES

import gemma_surgery
from gemma_surgery import cli

TOKENIZER = FIXTURES / "tokenizer" / "tiny.model"


def test_generate_prints_the_greedy_continuation(capsys):
  source = HF_FIXTURES / "gemma3"
  prompt = "def f"
  assert (
    cli.main(
      [
        "generate",
        str(source),
        "--dtype",
        "float32",
        "--tokenizer",
        str(TOKENIZER),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out.rstrip("\n")
  # Independent path: the library API with the same tokenizer and model.
  lm = gemma_surgery.load(source, dtype="float32", tokenizer=TOKENIZER, progress=False)
  ids = lm.tokenizer.encode(prompt, add_bos=True)
  new = gemma_surgery.greedy_generate(lm.model, np.array([ids]), max_new_tokens=12)[0]
  new = [int(t) for t in new]
  if lm.config.eos_id in new:
    new = new[: new.index(lm.config.eos_id)]
  assert printed == prompt + lm.tokenizer.decode(new)


def test_info_prints_the_config(capsys):
  assert cli.main(["info", str(HF_FIXTURES / "gemma2"), "--dtype", "float32"]) == 0
  out = capsys.readouterr().out
  assert "num_layers: 4" in out and "sliding_window: 8" in out


def test_errors_exit_2_with_a_message(capsys, tmp_path):
  assert cli.main(["info", str(tmp_path / "missing" / "a" / "b")]) == 2
  assert "not an existing path" in capsys.readouterr().err


def test_generate_without_tokenizer_is_a_clear_error(capsys):
  code = cli.main(["generate", str(HF_FIXTURES / "gemma2"), "--prompt", "x"])
  assert code == 2
  assert "--tokenizer" in capsys.readouterr().err


def test_module_entry_point_help():
  out = subprocess.run(
    [sys.executable, "-m", "gemma_surgery", "--help"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "generate" in out and "info" in out
