"""Train the tiny SentencePiece model used by the tokenizer tests.

Writes `tests/fixtures/tokenizer/tiny.model` (a few tens of KB). It needs no
download: the training text is the source of a fixed list of CPython standard
library modules, read from `sysconfig.get_paths()['stdlib']`.

Recipe (kept in sync with the code below):

* Text: the files in `_STDLIB_FILES`, in that order, split into lines; blank
  lines dropped; at most `_MAX_CHARS` characters in total. The text (and so
  the model) depends on the CPython version; the committed model was built
  with CPython 3.11.
* Model: BPE, `vocab_size=512`, `byte_fallback=True` (the 256 `<0xNN>` byte
  pieces need room, so a 256-piece vocabulary is impossible with byte
  fallback), Gemma-like normalisation: identity rule, no dummy prefix, extra
  whitespace kept, digits split, whitespace-only pieces allowed.
* Special ids as in Gemma: pad=0 `<pad>`, eos=1 `<eos>`, bos=2 `<bos>`,
  unk=3 `<unk>`; user-defined symbols `<start_of_turn>` (id 4) and
  `<end_of_turn>` (id 5); byte pieces follow at ids 6..261.
* Determinism: fixed input order, `num_threads=1`, no input sampling or
  shuffling. Running the script twice on one machine gives identical bytes.

Usage:
  python scripts/make_test_tokenizer.py [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import sysconfig
from collections.abc import Iterator

import sentencepiece as spm

_STDLIB_FILES = (
  "textwrap.py",
  "string.py",
  "bisect.py",
  "heapq.py",
  "fnmatch.py",
  "shlex.py",
  "colorsys.py",
  "keyword.py",
)
_MAX_CHARS = 200_000
_VOCAB_SIZE = 512
_DEFAULT_OUT = (
  pathlib.Path(__file__).resolve().parent.parent
  / "tests"
  / "fixtures"
  / "tokenizer"
  / "tiny.model"
)


def training_lines() -> Iterator[str]:
  """Yields the training sentences (one source line each), deterministically."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  budget = _MAX_CHARS
  for name in _STDLIB_FILES:
    text = (stdlib / name).read_text(encoding="utf-8")
    for line in text.splitlines():
      if not line.strip():
        continue
      if len(line) > budget:
        return
      budget -= len(line)
      yield line


def train() -> bytes:
  """Trains the model and returns its serialized proto."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=training_lines(),
    model_writer=writer,
    model_type="bpe",
    vocab_size=_VOCAB_SIZE,
    character_coverage=1.0,
    byte_fallback=True,
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
  )
  return writer.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  proto = train()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_bytes(proto)
  digest = hashlib.sha256(proto).hexdigest()[:16]
  print(f"wrote {args.out} ({len(proto)} bytes, sha256 {digest}...)")


if __name__ == "__main__":
  main()
