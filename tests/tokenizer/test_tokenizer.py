"""Tests of gemma_surgery.tokenizer and gemma_surgery.validation."""

from __future__ import annotations

import enum
import functools
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from helpers.paths import TOKENIZER_FIXTURE
from penzai import pz

from gemma_surgery.errors import GemmaSurgeryError, InputError, TokenizerError
from gemma_surgery.tokenizer import (
  SPACE_MARKER,
  GemmaTokenizer,
  Tokenizer,
  as_tokenizer,
  display_piece,
)
from gemma_surgery.validation import check_token_ids

TINY = TOKENIZER_FIXTURE

ROUNDTRIP_TEXTS = [
  "def foo(x):\n  return 42",
  "Hello, world!",
  "  leading and  double  spaces ",
  "line one\nline two\n\n\ttabbed\r\n",
  "héllo wörld — naïve café",
  "日本語のテキスト 🙂🚀",
  "<start_of_turn>user\nhi<end_of_turn>",
  "",
]


@pytest.fixture(scope="module")
def tok() -> GemmaTokenizer:
  return GemmaTokenizer.from_file(TINY)


def test_fixture_is_small_and_has_gemma_special_ids(tok):
  assert TINY.stat().st_size < 64_000
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 512
  assert tok.piece_to_id("<start_of_turn>") == 4
  assert tok.piece_to_id("<end_of_turn>") == 5
  assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS)
def test_roundtrip(tok, text):
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id
  assert all(isinstance(i, int) for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.decode(jnp.asarray(ids)) == text


def test_byte_fallback_used_for_unseen_characters(tok):
  ids = tok.encode("🙂", add_bos=False)
  assert [tok.sp.is_byte(i) for i in ids] == [True] * 4


def test_bos_handling(tok):
  with_bos = tok.encode("abc")
  without = tok.encode("abc", add_bos=False)
  assert with_bos == [tok.bos_id, *without]
  assert tok.bos_id not in without
  assert tok.encode("abc", add_eos=True)[-1] == tok.eos_id
  assert tok.encode("", add_bos=True) == [tok.bos_id]


def test_special_symbols_are_single_tokens(tok):
  ids = tok.encode("<start_of_turn>model\n", add_bos=False)
  assert ids[0] == 4
  assert tok.encode("<end_of_turn>", add_bos=False) == [5]


def test_batch_encode_and_decode(tok):
  texts = ["a b", "longer text here", ""]
  batch = tok.encode(texts)
  assert batch == [tok.encode(t) for t in texts]
  assert tok.decode(batch) == texts
  padded = np.zeros((2, 12), np.int32)
  for row, ids in enumerate(batch[:2]):
    padded[row, : len(ids)] = ids
  assert tok.decode(padded) == texts[:2]


def test_decode_skips_pad_but_does_not_stop_at_eos(tok):
  a, b = tok.encode("ab", add_bos=False), tok.encode("cd", add_bos=False)
  ids = [tok.pad_id, tok.bos_id, *a, tok.eos_id, tok.pad_id, *b, tok.pad_id]
  assert tok.decode(ids) == "abcd"
  assert tok.decode(tok.encode("x")[-1]) == "x"


def test_decode_accepts_named_array(tok):
  ids = tok.encode("named")
  assert tok.decode(pz.nx.wrap(jnp.asarray(ids)).tag("seq")) == "named"
  two_d = pz.nx.wrap(jnp.asarray([ids])).tag("batch", "seq")
  with pytest.raises(InputError, match="unwrap"):
    tok.decode(two_d)


def test_decode_rejects_bad_ids(tok):
  with pytest.raises(InputError, match=r"\[0, 512\)"):
    tok.decode([2, 512])
  with pytest.raises(InputError, match="integer dtype"):
    tok.decode(np.array([2.0, 5.0]))


def test_pieces_display(tok):
  ids = tok.encode("x = 1\n  y", add_bos=True)
  pieces = tok.pieces(ids)
  assert pieces[0] == "<bos>"
  assert "\\n" in pieces
  assert all("▁" not in p and "\n" not in p for p in pieces)
  assert any(p.startswith(SPACE_MARKER) for p in pieces)
  newline_id = tok.piece_to_id("<0x0A>")
  assert tok.piece(newline_id) == "\\n"
  assert tok.piece(newline_id, space_marker="_") == "\\n"
  assert tok.pieces(np.array([newline_id, tok.eos_id])) == ["\\n", "<eos>"]
  with pytest.raises(InputError):
    tok.piece(tok.vocab_size)


def test_display_piece_rules():
  assert display_piece("▁the") == "␣the"
  assert display_piece("▁▁") == "␣␣"
  assert display_piece("<0x0A>") == "\\n"
  assert display_piece("<0x09>") == "\\t"
  assert display_piece("<0x0D>") == "\\r"
  assert display_piece("<0x1B>") == "\\x1b"
  assert display_piece("<0x41>") == "A"
  assert display_piece("<0x20>") == SPACE_MARKER
  assert display_piece("<0xE2>") == "<0xE2>"
  assert display_piece("\n\n") == "\\n\\n"
  assert display_piece("<start_of_turn>") == "<start_of_turn>"
  assert display_piece("▁a", space_marker=" ") == " a"


def test_missing_file_raises_tokenizer_error(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.model"
  with pytest.raises(TokenizerError, match="nope") as info:
    GemmaTokenizer.from_file(missing)
  assert isinstance(info.value, GemmaSurgeryError)
  with pytest.raises(TokenizerError, match="directory"):
    GemmaTokenizer.from_file(tmp_path)


def test_garbage_file_raises_tokenizer_error(tmp_path):
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00\xffthis is not a sentencepiece model" * 10)
  with pytest.raises(TokenizerError, match="garbage.model") as info:
    GemmaTokenizer.from_file(garbage)
  assert info.value.__cause__ is not None
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  with pytest.raises(TokenizerError, match="empty.model"):
    GemmaTokenizer.from_file(empty)


def test_encode_rejects_non_text(tok):
  with pytest.raises(InputError):
    tok.encode(b"bytes")  # type: ignore[arg-type]
  with pytest.raises(InputError):
    tok.encode([1, 2])  # type: ignore[list-item]


# as_tokenizer ------------------------------------------------------------


def test_as_tokenizer_passthrough_and_path(tok):
  assert as_tokenizer(tok) is tok
  from_path = as_tokenizer(str(TINY))
  assert isinstance(from_path, GemmaTokenizer)
  assert from_path.encode("abc") == tok.encode("abc")


def test_as_tokenizer_raw_sentencepiece(tok):
  sp = spm.SentencePieceProcessor(model_file=str(TINY))
  adapted = as_tokenizer(sp)
  assert isinstance(adapted, GemmaTokenizer)
  assert adapted.encode("hello\nworld") == tok.encode("hello\nworld")
  assert adapted.bos_id == 2


class _FakeSpecialTokens(enum.IntEnum):
  PAD = 0
  EOS = 1
  BOS = 2
  UNK = 3
  START_OF_TURN = 4
  END_OF_TURN = 5


class FakeGemmaPackageTokenizer:
  """Mimics `gemma.gm.text.Gemma3Tokenizer`'s public surface."""

  special_tokens = _FakeSpecialTokens

  def __init__(self, path: pathlib.Path) -> None:
    self.path = path

  @functools.cached_property
  def _sp(self) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(self.path))

  @functools.cached_property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text, *, add_bos=False, add_eos=False):
    if not isinstance(text, str):  # The real one treats lists as pieces.
      raise TypeError("adapter must encode one string at a time")
    ids = self._sp.EncodeAsIds(text)
    if add_bos:
      ids.insert(0, self.special_tokens.BOS)
    if add_eos:
      ids.append(self.special_tokens.EOS)
    return ids

  def decode(self, ids):
    return self._sp.DecodeIds(list(ids))


def test_as_tokenizer_gemma_package_like(tok):
  adapted = as_tokenizer(FakeGemmaPackageTokenizer(TINY))
  assert isinstance(adapted, Tokenizer)
  assert (adapted.pad_id, adapted.eos_id, adapted.bos_id, adapted.unk_id) == (
    0,
    1,
    2,
    3,
  )
  assert adapted.vocab_size == 512
  for text in ROUNDTRIP_TEXTS:
    assert adapted.encode(text) == tok.encode(text)
    assert adapted.decode(adapted.encode(text)) == text
  assert adapted.encode(["a", "b"]) == tok.encode(["a", "b"])
  ids = tok.encode("x\n y")
  assert adapted.pieces(ids) == tok.pieces(ids)


class _HiddenSpTokenizer:
  """Tokenizer whose encode always adds BOS and exposes no SP processor."""

  bos_token_id = 2
  eos_token_id = 1

  def __init__(self, path: pathlib.Path) -> None:
    self._hidden = spm.SentencePieceProcessor(model_file=str(path))

  def __len__(self) -> int:
    return self._hidden.GetPieceSize()

  def encode(self, text):
    return np.array([2, *self._hidden.EncodeAsIds(text)])

  def decode(self, ids):
    return self._hidden.DecodeIds(list(ids))


def test_as_tokenizer_auto_bos_encoder_is_normalised(tok):
  adapted = as_tokenizer(_HiddenSpTokenizer(TINY))
  assert adapted.vocab_size == 512
  assert adapted.pad_id is None
  assert adapted.encode("abc") == tok.encode("abc")
  assert adapted.encode("abc", add_bos=False) == tok.encode("abc", add_bos=False)
  assert adapted.piece(tok.piece_to_id("▁the")) == "␣the"
  assert adapted.piece(tok.bos_id).startswith("<id")


def test_as_tokenizer_rejects_unusable_objects():
  with pytest.raises(TokenizerError, match="int"):
    as_tokenizer(42)

  class NoBos:
    vocab_size = 10

    def encode(self, text):
      return [1]

    def decode(self, ids):
      return ""

  with pytest.raises(TokenizerError, match="BOS"):
    as_tokenizer(NoBos())

  class NoVocab(NoBos):
    vocab_size = None
    bos_id = 2

  with pytest.raises(TokenizerError, match="vocabulary size"):
    as_tokenizer(NoVocab())


# check_token_ids ---------------------------------------------------------


@pytest.mark.parametrize(
  "ids",
  [
    [0, 1, 511],
    np.array([[2, 3], [510, 511]], np.int32),
    jnp.array([2, 3, 4], jnp.int32),
    np.array([], np.int32),
    [],
    7,
    pz.nx.wrap(jnp.array([[2, 3], [4, 5]])).tag("batch", "seq"),
  ],
)
def test_check_token_ids_accepts_valid(ids):
  check_token_ids(ids, 512)


def test_check_token_ids_negative():
  with pytest.raises(InputError) as info:
    check_token_ids(np.array([2, 5, -1, 7]), 512)
  msg = str(info.value)
  assert "id -1" in msg and "position 2" in msg and "[0, 512)" in msg


def test_check_token_ids_too_large_2d_positions():
  ids = np.full((2, 3), 5, np.int32)
  ids[1, 2] = 512
  with pytest.raises(InputError, match=r"id 512 at position \(1, 2\)"):
    check_token_ids(ids, 512)
  with pytest.raises(InputError, match=r"id 600"):
    check_token_ids(jnp.asarray([600]), 512)


def test_check_token_ids_reports_first_few_only():
  with pytest.raises(InputError) as info:
    check_token_ids(np.arange(1000, 1100), 512)
  msg = str(info.value)
  assert msg.startswith("100 token id(s)")
  assert "first 5" in msg and "id 1004" in msg and "id 1005" not in msg


def test_check_token_ids_named_array_positions():
  data = jnp.array([[2, 3], [4, 999]])
  named = pz.nx.wrap(data).tag("batch", "seq")
  with pytest.raises(InputError, match=r"\{batch=1, seq=1\}"):
    check_token_ids(named, 512)
  # Same check through a transposed view (a NamedArrayView).
  view = named.untag("batch").tag("batch")
  with pytest.raises(InputError, match=r"batch=1.*seq=1|seq=1.*batch=1"):
    check_token_ids(view, 512)


@pytest.mark.parametrize(
  "ids",
  [np.array([1.0, 2.0]), jnp.array([1.0]), [0.5], np.array([True, False])],
)
def test_check_token_ids_rejects_non_integer_dtype(ids):
  with pytest.raises(InputError, match="integer dtype"):
    check_token_ids(ids, 512)


def test_check_token_ids_rejects_bad_vocab_size():
  with pytest.raises(InputError):
    check_token_ids([1], 0)
  with pytest.raises(InputError):
    check_token_ids([1], 512.0)  # type: ignore[arg-type]


def test_check_token_ids_off_by_one_vocab_negative_control(tok):
  """A vocab_size one too small must reject the largest real id."""
  max_id = tok.vocab_size - 1
  check_token_ids([max_id], tok.vocab_size)
  with pytest.raises(InputError) as info:
    check_token_ids([max_id], tok.vocab_size - 1)
  assert f"id {max_id} at position 0" in str(info.value)
  assert f"[0, {max_id})" in str(info.value)


def test_check_token_ids_refuses_tracers():
  import jax

  @jax.jit
  def f(x):
    check_token_ids(x, 512)
    return x

  with pytest.raises(InputError, match="tracer"):
    f(jnp.array([1, 2]))
