"""The tour and SAE steering on the embedded model (its real structure).

The induction head the tour reports must be the one the model's own tests
(`test_tiny`, an independent scoring on other random sequences) find; an SAE
feature's decoder direction, added at the SAE's site, must raise the
probability of the tokens its decoder row promotes.
"""

from __future__ import annotations

import ast
import html
import re

import jax
import numpy as np
import pytest
from helpers.tiny import SPAN, induction_batch
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import cli
from gemma_surgery.tour import sae_section


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


def _independent_best_head(lm) -> tuple[int, int]:
  tokens = induction_batch(lm.config.vocab_size)
  patched, acts = gs.capture(lm.model, "attn.pattern")
  gs.jit_forward(patched)(pz.nx.wrap(tokens.astype(np.int32)).tag("batch", "seq"))
  q = np.arange(1 + SPAN, 1 + 2 * SPAN)
  scores = np.stack(
    [
      np.asarray(acts["attn.pattern", i].unwrap("batch", "heads", "seq", "kv_seq"))[
        :, :, q, q - SPAN + 1
      ].mean(axis=(0, 2))
      for i in range(lm.config.num_layers)
    ]
  )
  layer, head = np.unravel_index(np.argmax(scores), scores.shape)
  return int(layer), int(head)


def test_tour_on_the_embedded_model_finds_its_induction_head(lm, tmp_path):
  assert cli.main(["tour", "--sae", "tiny", "--out", str(tmp_path)]) == 0
  report = html.unescape((tmp_path / "report.html").read_text())
  found = re.search(r"best induction heads \(layer, head, score\): (\[.*?\])", report)
  heads = ast.literal_eval(found.group(1))
  assert heads[0][:2] == _independent_best_head(lm)
  assert heads[0][2] >= 0.5
  knocked = re.search(r"knocked out: ([\d.]+) \(\+([-\d.]+)\)", report)
  assert float(knocked.group(2)) > 0.5  # knocking the best heads out hurts copying
  assert "Sparse autoencoder" in report and (tmp_path / "heads_induction.png").exists()
  # the prompt's strongest SAE features have coherent max-activating examples:
  # all but at most one peak on one token in at least half of their examples
  counts = re.findall(r"feature +\d+: peaks on .*? in (\d+)/(\d+) examples", report)
  assert len(counts) == sae_section.SHOWN_FEATURES, counts
  coherent = [int(n) >= 0.5 * int(total) for n, total in counts]
  assert sum(coherent) >= sae_section.SHOWN_FEATURES - 1, counts

  # Attribution patching beside the exact sweeps, and their agreement.
  agree = re.findall(
    r"([\w.]+) +by (\w+) +Spearman ([-\d.]+) +top-5 in top-10 (\d+)%", report
  )
  assert {(site, by) for site, by, _, _ in agree} == {
    ("resid_post", "position"),
    ("attn.out", "position"),
    ("mlp.out", "position"),
    ("attn.z", "head"),
  }
  assert all(float(rho) >= 0.8 and int(recall) == 100 for _, _, rho, recall in agree)
  assert (tmp_path / "attribution_attn_z.png").exists()


def test_random_corpus_tokens_are_not_coherent(lm):
  """Negative control for the coherence count: ten random positions of the
  same corpus rarely share a token (the most common piece is far below half)."""
  batches = sae_section.corpus(lm.tokenizer, lm.config.bos_id, lm.config.eos_id)
  rows = np.concatenate(batches)[:, 1:]
  rng = np.random.default_rng(0)
  for _ in range(20):
    picks = rng.integers(0, rows.size, sae_section.EXAMPLES)
    fake = [gs.sae.Example(0, 1.0, 0, 0, [int(rows.flat[i])], 0) for i in picks]
    c = sae_section.coherence(fake, lm.tokenizer.pieces)
    assert c.count < 0.5 * c.total, c


def test_steering_with_an_sae_feature_raises_its_lens_tokens(lm):
  sae = gs.sae.load_sae("tiny")
  texts = ("Return the value of the", "Open a new file and")
  rows = [lm.tokenizer.encode(t) for t in texts]
  width = min(map(len, rows))
  ids = np.asarray([r[:width] for r in rows], np.int32)
  f = gs.sae.features.feature_activations(lm.model, sae, ids)
  feature = int(np.argmax(f[:, 1:].max(axis=(0, 1))))
  top = gs.sae.feature_logit_lens(lm.model, sae, feature, k=10)["top"][0]
  named = pz.nx.wrap(ids).tag("batch", "seq")

  def mass(model):
    logits = model(named).unwrap("batch", "seq", "vocabulary")[:, -1]
    return float(np.asarray(jax.nn.softmax(logits, -1))[:, top].sum(-1).mean())

  scale = 4.0 * float(f[..., feature].max())
  base = mass(lm.model)
  up = mass(gs.sae.steer_with_feature(lm.model, sae, feature, scale))
  down = mass(gs.sae.steer_with_feature(lm.model, sae, feature, -scale))
  assert up > 2 * base and down < base, (base, up, down)
