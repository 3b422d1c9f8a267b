"""`JsonTokenizer` (a Hugging Face ``tokenizer.json``) against transformers.

The reference is ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``
on the same file: ids, decoded text and the special ids must be its own. The
file is a small Gemma-like BPE with byte fallback (`helpers.json_tokenizer`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import json_tokenizer as jt
from helpers.paths import TOKENIZER_FIXTURE

from gemma_surgery.errors import InputError, TokenizerError
from gemma_surgery.tokenizer import (
  GEMMA4_CHAT,
  GEMMA_CHAT,
  GemmaTokenizer,
  JsonTokenizer,
  Tokenizer,
  as_tokenizer,
  display_piece,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
  "def add(a, b):\n    return a + b",
  "The default value is",
  "  leading and  double  spaces ",
  "naïve café — 東京 🙂",
  "<|turn>user\nHello<turn|>\n<|turn>model\n",
  "<bos>x = value<eos>",
  "\t\r\n",
  "",
]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  return jt.write(tmp_path_factory.mktemp("json_tok"))


@pytest.fixture(scope="module")
def ours(path):
  return JsonTokenizer.from_file(path)


@pytest.fixture(scope="module")
def reference(path):
  return transformers.PreTrainedTokenizerFast(
    tokenizer_file=str(path),
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    unk_token="<unk>",
  )


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours, reference, text):
  ids = ours.encode(text, add_bos=True)
  assert ids == reference.encode(text)  # its post-processor adds <bos>
  assert ours.encode(text, add_bos=False) == reference.encode(
    text, add_special_tokens=False
  )
  assert ours.decode(ids) == reference.decode(ids)
  # Round trip of the text (after the leading <bos>, which decodes as itself).
  assert ours.decode(ids[1:]) == text


def test_specials_and_vocabulary_match_transformers(ours, reference):
  assert ours.bos_id == reference.bos_token_id == 2
  assert ours.eos_id == reference.eos_token_id == 1
  assert ours.pad_id == reference.pad_token_id == 0
  assert ours.unk_id == reference.unk_token_id == 3
  assert ours.vocab_size == len(reference)
  assert isinstance(ours, Tokenizer)
  # Turn markers and specials are single pieces, as in the reference.
  for marker in ("<|turn>", "<turn|>"):
    assert ours.encode(marker, add_bos=False) == [
      reference.convert_tokens_to_ids(marker)
    ]
  assert ours.piece_to_id("<|turn>") == 5
  with pytest.raises(TokenizerError, match="not in the vocabulary"):
    ours.piece_to_id("<start_of_turn>")


def test_pieces_and_ordinary_ids(ours, reference):
  ids = ours.encode("naïve value\n", add_bos=True)
  # The raw pieces are the reference's tokens (display_piece is tested on
  # SentencePiece pieces in test_tokenizer.py).
  raw = reference.convert_ids_to_tokens(ids)
  assert ours.pieces(ids) == [display_piece(p) for p in raw]
  assert "␣value" in ours.pieces(ids)
  ordinary = set(ours.ordinary_ids().tolist())
  specials = set(reference.all_special_ids) | {5, 6}
  assert not ordinary & specials
  assert not ordinary & {reference.convert_tokens_to_ids(b) for b in jt.BYTES}
  assert reference.convert_tokens_to_ids("▁value") in ordinary


def test_out_of_range_ids_are_refused(ours):
  n = ours.vocab_size
  for bad in ([n], [-1], np.array([[1, n + 5]])):
    with pytest.raises(InputError, match=f"0, {n}|{n}"):
      ours.decode(bad)
  with pytest.raises(InputError):
    ours.piece(n)
  with pytest.raises(InputError):
    ours.decode([1.5])
  # Control: the largest valid id decodes.
  assert isinstance(ours.decode([n - 1]), str)


def test_padding_is_dropped_and_batches_decode(ours, reference):
  a, b = ours.encode(["The value", "x = value; y"], add_bos=False)
  assert ours.decode([a + [0, 0], b]) == [reference.decode(a), reference.decode(b)]


def test_chat_format_follows_the_vocabulary(tmp_path, ours):
  assert ours.chat_format == GEMMA4_CHAT
  gemma3 = JsonTokenizer.from_file(jt.write(tmp_path / "g3", jt.GEMMA3_TURNS))
  assert gemma3.chat_format == GEMMA_CHAT
  # Control: without the markers in its vocabulary, <|turn> is several pieces.
  assert len(gemma3.encode("<|turn>", add_bos=False)) > 1
  assert GemmaTokenizer.from_file(TOKENIZER_FIXTURE).chat_format == GEMMA_CHAT
  assert GEMMA4_CHAT.turn("user", "Hi") == "<|turn>user\nHi<turn|>\n"
  assert GEMMA4_CHAT.generation_prompt == "<|turn>model\n"


def test_tokenizer_config_names_the_specials(tmp_path):
  path = jt.write(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": {"content": "<mask>"}, "eos_token": "<turn|>"})
  )
  tok = JsonTokenizer.from_file(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (4, 6, 0)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
  with pytest.raises(TokenizerError, match="no BOS token '<s>'"):
    JsonTokenizer.from_file(path)


def test_as_tokenizer_and_bad_files(tmp_path, path):
  assert isinstance(as_tokenizer(path), JsonTokenizer)
  assert isinstance(as_tokenizer(str(path)), JsonTokenizer)
  assert isinstance(as_tokenizer(jt.build()), JsonTokenizer)
  assert isinstance(as_tokenizer(TOKENIZER_FIXTURE), GemmaTokenizer)
  with pytest.raises(TokenizerError, match="does not exist"):
    JsonTokenizer.from_file(tmp_path / "missing.json")
  broken = tmp_path / "broken.json"
  broken.write_text('{"model": 1}')
  with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
    as_tokenizer(broken)
