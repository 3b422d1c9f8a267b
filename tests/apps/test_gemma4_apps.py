"""The command line, the tour and the notebooks' loading cell on Gemma 4 sources.

A tiny random Gemma 4 checkpoint written by `transformers` (`helpers.gemma4`,
with the test tokenizer beside it) stands for a downloaded one. `info` must
report its architecture and transformers' parameter count, the tour's greedy
continuation must be transformers' greedy continuation of the same prompt,
the notebooks' first cell must load it, and the Gemma 4 variant names must
resolve to Google's Hugging Face repositories.
"""

from __future__ import annotations

import contextlib
import html
import io
import re
import shutil

import nbformat
import numpy as np
import pytest
from helpers.paths import ROOT, TOKENIZER_FIXTURE

pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import cli, errors  # noqa: E402
from gemma_surgery.loading import api  # noqa: E402
from gemma_surgery.tour.run import DEFAULT_PROMPT  # noqa: E402

# Small enough for a fast tour, with every Gemma 4 feature: per-layer inputs,
# the last layer reusing layer 1's keys/values, k = v on the global layer,
# head_dim 8 local / 16 global, MoE top-2 of 4, double-wide shared MLP.
TOUR_CONFIG = dict(
  g4.ALL_FEATURES,
  vocab_size=512,  # the test tokenizer's
  vocab_size_per_layer_input=512,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=3,
  num_attention_heads=2,
  num_key_value_heads=1,
  head_dim=8,
  global_head_dim=16,
  num_kv_shared_layers=1,
  hidden_size_per_layer_input=4,
  layer_types=["sliding_attention", "full_attention", "full_attention"],
  moe_intermediate_size=8,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_apps")
  torch_model = g4.write_checkpoint(directory, seed=5, **TOUR_CONFIG)
  shutil.copy(TOKENIZER_FIXTURE, directory / "tokenizer.model")
  return directory, torch_model


def _run(argv: list[str]) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(argv) == 0
  return out.getvalue()


def test_info_reports_the_gemma4_architecture(checkpoint):
  directory, torch_model = checkpoint
  text = _run(["info", str(directory), "--dtype", "float32"])
  fields = dict(re.findall(r"^ *(\w+): (.*)$", text, re.MULTILINE))
  assert fields["family"] == "gemma4"
  assert fields["num_experts"] == "4" and fields["top_k_experts"] == "2"
  assert fields["global_head_dim"] == "16" and fields["num_kv_shared_layers"] == "1"
  assert fields["per_layer_input_dim"] == "4" and fields["k_eq_v_global"] == "True"
  # transformers' count; its layer scalars are buffers, ours parameters.
  scalars = sum(b.numel() for n, b in torch_model.named_buffers() if "scalar" in n)
  expected = sum(p.numel() for p in torch_model.parameters()) + scalars
  assert int(fields["parameters"].replace(",", "")) == expected


def _continuation(report: str) -> str:
  found = re.search(r"Greedy continuation</h3>\s*<pre[^>]*>(.*?)</pre>", report, re.S)
  return html.unescape(found.group(1))


def test_tour_runs_on_gemma4_and_continues_like_transformers(checkpoint, tmp_path):
  directory, torch_model = checkpoint
  out = tmp_path / "tour"
  _run(["tour", "--model", str(directory), "--dtype", "float32", "--out", str(out)])
  report = (out / "report.html").read_text()
  assert "family: gemma4" in report
  assert (out / "heads_induction.png").exists()
  # The reference: transformers' greedy continuation of the tour's prompt.
  tok = gs.load(directory, dtype="float32", progress=False).tokenizer
  ids = np.asarray([tok.encode(DEFAULT_PROMPT, add_bos=True)])
  new = g4.torch_greedy(torch_model, ids, 24)[0]
  assert 1 not in new  # no EOS: the tour shows all 24 tokens
  assert len(set(new.tolist())) > 3  # not a constant the test could match by luck
  assert _continuation(report) == DEFAULT_PROMPT + tok.decode([int(i) for i in new])


def test_notebook_loading_cell_loads_gemma4(checkpoint):
  directory, _ = checkpoint
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = nbformat.read(path, as_version=4).cells
    setup = next(
      c.source for c in cells if c.cell_type == "code" and 'MODEL = "tiny"' in c.source
    )
    source = setup.replace('MODEL = "tiny"', f"MODEL = {str(directory)!r}", 1)
    out, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
      exec(source, scope)
    assert out.getvalue().startswith("gemma4 3 layers"), (path.name, out.getvalue())
    assert scope["tok"] is not None and scope["lm"].config.num_experts == 4


@pytest.mark.parametrize(
  "name, repo",
  [
    ("gemma4_e2b", "google/gemma-4-E2B"),
    ("gemma-4-E2B-it", "google/gemma-4-E2B-it"),
    ("gemma4_e4b", "google/gemma-4-E4B"),
    ("gemma-4-26B-A4B-it", "google/gemma-4-26B-A4B-it"),
    ("gemma4_31b", "google/gemma-4-31B"),
  ],
)
def test_gemma4_variant_names_resolve_to_google_repos(monkeypatch, name, repo):
  asked = []
  monkeypatch.setattr(
    api.hub, "download_hf", lambda r, **kw: asked.append(r) or ROOT / "x"
  )
  api.resolve(name)
  assert asked == [repo]


def test_unknown_gemma4_variant_is_refused(monkeypatch):
  monkeypatch.setattr(api.hub, "download_hf", pytest.fail)
  with pytest.raises(errors.CheckpointError, match="gemma4_e4b"):
    api.resolve("gemma4_99b")
