"""A small Gemma-like ``tokenizer.json`` built with `tokenizers` for the tests.

Laid out as Gemma's Hugging Face tokenizers are (transformers'
``GemmaTokenizer``): a BPE model with byte fallback, spaces normalized to
``▁``, a decoder that undoes both, and ``<bos> $A`` post-processing. Ids:
``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, Gemma 4's
turn markers ``<|turn>`` 5 and ``<turn|>`` 6 (or Gemma 3's
``<start_of_turn>``/``<end_of_turn>``), the 256 byte pieces ``<0x00>`` ..
``<0xFF>``, then pieces and merges learned by `tokenizers`' BPE trainer on a
few lines of text.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import (
  AddedToken,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA4_TURNS = ["<|turn>", "<turn|>"]
GEMMA3_TURNS = ["<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]

CORPUS = [
  "def add(a, b):\n    return a + b\n",
  "The default value is zero. The value of x is the default.",
  "Once upon a time there was a model that returned the sum of two values.",
  "for i in range(10):\n    print(i, value)\n",
  "x = value; y = x; x = value; y = x",
] * 4


def _gemma_like(vocab: dict[str, int], merges: list) -> Tokenizer:
  tok = Tokenizer(
    models.BPE(
      vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
  )
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
  tok.decoder = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  )
  return tok


def build(turns: list[str] = GEMMA4_TURNS, vocab_size: int = 400) -> Tokenizer:
  """The tokenizer, with ``turns`` as its chat markers (ids 5 and 6)."""
  trainer_tok = _gemma_like({}, [])
  # Learn SentencePiece-like pieces ("▁value", not "e▁") by training on words.
  trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
  fixed = SPECIALS + turns + BYTES
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=fixed, show_progress=False
  )
  trainer_tok.train_from_iterator(CORPUS, trainer)
  model = json.loads(trainer_tok.to_str())["model"]
  vocab = model["vocab"]
  assert [vocab[t] for t in fixed] == list(range(len(fixed)))
  merges = [
    tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]
  ]
  tok = _gemma_like(vocab, merges)
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t in SPECIALS + turns]
  )
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
  )
  return tok


def write(directory: pathlib.Path, turns: list[str] = GEMMA4_TURNS) -> pathlib.Path:
  """Writes ``directory/tokenizer.json``; returns its path."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / "tokenizer.json"
  build(turns).save(str(path))
  return path
