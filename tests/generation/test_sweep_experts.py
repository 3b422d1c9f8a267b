"""Per-row expert ablations on a tiny Gemma 4 MoE: one batch == single-row runs.

A sweep over which expert is ablated (and a per-row ``{batch, experts}`` mask
given to `gs.ablate_experts` directly) runs as one compiled generation; every
row equals a separate batch-1 generation with that row's ablation (tokens
identical, logits within float32 roundoff).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery.generation import decoding  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_sweep")
  g4.write_checkpoint(directory, seed=3, **g4.ALL_FEATURES)
  return gs.load(directory, dtype="float32", progress=False).model


def _logits(result):
  return np.asarray(result.logits.unwrap("batch", "seq", "vocabulary"))


def _edit(model, experts):
  return gs.ablate_experts(model, None, experts)


def test_expert_sweep_equals_single_row_runs_with_one_compile(model):
  prompts = [list(g4.tokens(1, 7, seed=11)[0]), list(g4.tokens(1, 7, seed=12)[0])]
  grid = {"experts": [[0], [1], [2, 3]]}
  args = dict(max_new_tokens=NEW, return_logits=True)
  gs.generate(_edit(model, [0]), prompts[:1], **args)  # single-row compile first
  before = decoding.trace_count()
  out = gs.sweep(model, _edit, prompts, grid=grid, **args)
  assert decoding.trace_count() - before == 1
  mine = _logits(out.result)
  for experts in grid["experts"]:
    for p, prompt in enumerate(prompts):
      alone = gs.generate(_edit(model, experts), [prompt], **args)
      r = out.row(experts=experts, prompt=p)
      np.testing.assert_array_equal(out.result.tokens[r], alone.tokens[0])
      scale = np.abs(mine[r]).max()
      np.testing.assert_allclose(
        mine[r], _logits(alone)[0], atol=1e-5 + 2e-6 * scale, rtol=0
      )
  # Negative control: the ablations change the logits of the same prompt.
  first, second = out.row(experts=[0], prompt=0), out.row(experts=[1], prompt=0)
  assert np.abs(mine[first] - mine[second]).max() > 1e-3
  # The same ablations as a {batch, experts} mask given directly.
  mask = np.zeros((6, 4), bool)
  for experts in grid["experts"]:
    for p in range(2):
      mask[out.row(experts=experts, prompt=p), experts] = True
  rows = [prompts[r % 2] for r in range(6)]  # C order over (experts, prompt)
  named = pz.nx.wrap(jnp.asarray(mask)).tag("batch", "experts")
  direct = gs.generate(_edit(model, named), rows, **args)
  np.testing.assert_array_equal(direct.tokens, out.result.tokens)
  np.testing.assert_allclose(_logits(direct), mine, atol=1e-5, rtol=0)


def test_bad_row_masks(model):
  with pytest.raises(gs.SurgeryError, match="experts=3"):
    _edit(model, pz.nx.wrap(jnp.zeros((2, 3), bool)).tag("batch", "experts"))
  with pytest.raises(gs.SurgeryError, match="named axes"):
    _edit(model, pz.nx.wrap(jnp.zeros((2, 4), bool)).tag("batch", "heads"))
  with pytest.raises(gs.SurgeryError, match="0/1"):
    _edit(model, pz.nx.wrap(jnp.full((2, 4), 0.5)).tag("batch", "experts"))
