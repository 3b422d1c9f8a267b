"""A Gemma 4 checkpoint folder with only ``tokenizer.json``, as Gemma 4's
Hugging Face repositories ship it, and the per-layer architecture summary.

A tiny random Gemma 4 checkpoint written by `transformers` (`helpers.gemma4`)
gets the small Gemma-like ``tokenizer.json`` of `helpers.json_tokenizer` and
no ``tokenizer.model``. `gs.load` must find it; `gs.generate` on a text
prompt must give transformers' prompt ids, greedy continuation and decoded
text. The per-layer rows of the tour's overview and of ``gemma-surgery
info`` must state each layer's head width, kv heads, KV sharing, MLP width
and experts as the transformers model's own modules have them.
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from helpers import json_tokenizer as jt

transformers = pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import cli  # noqa: E402
from gemma_surgery.config_gemma4 import layer_ranges  # noqa: E402
from gemma_surgery.tokenizer import JsonTokenizer  # noqa: E402
from gemma_surgery.tour import TourContext  # noqa: E402
from gemma_surgery.tour.overview_section import model_summary  # noqa: E402
from gemma_surgery.tour.run import SECTIONS  # noqa: E402

VOCAB = 400  # the test tokenizer.json's

# Layers vary: head_dim 8 local / 16 global, kv 2 local / 1 global with
# k = v, the last two layers reuse earlier keys/values with double-wide MLPs,
# MoE top-2 of 4 beside every dense MLP.
CONFIG = dict(
  g4.ALL_FEATURES,
  vocab_size=VOCAB,
  vocab_size_per_layer_input=VOCAB,
  hidden_size=32,
  intermediate_size=24,
  num_hidden_layers=4,
  num_attention_heads=2,
  num_key_value_heads=2,
  head_dim=8,
  global_head_dim=16,
  num_kv_shared_layers=2,
  hidden_size_per_layer_input=4,
  layer_types=["sliding_attention", "full_attention"] * 2,
  moe_intermediate_size=8,
)
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_tokjson")
  torch_model = g4.write_checkpoint(directory, seed=3, **CONFIG)
  jt.write(directory)
  assert not (directory / "tokenizer.model").exists()
  lm = gs.load(directory, dtype="float32", progress=False)
  return directory, torch_model, lm


def test_load_finds_tokenizer_json_and_generates_like_transformers(checkpoint):
  directory, torch_model, lm = checkpoint
  assert isinstance(lm.tokenizer, JsonTokenizer)
  reference = transformers.PreTrainedTokenizerFast(
    tokenizer_file=str(directory / "tokenizer.json")
  )
  ids = reference.encode(PROMPT)  # <bos> + the text
  assert ids[0] == lm.config.bos_id and len(ids) > 4
  out = gs.generate(lm.model, [PROMPT], max_new_tokens=8, tokenizer=lm.tokenizer)
  expected = g4.torch_greedy(torch_model, np.asarray([ids]), 8)[0]
  assert len(set(expected.tolist())) > 2  # not a constant matched by luck
  assert np.asarray(out.tokens)[0].tolist() == expected.tolist()
  assert out.text[0] == reference.decode(expected.tolist())


def test_without_a_tokenizer_file_there_is_none(checkpoint, tmp_path):
  # Negative control: the same weights without tokenizer.json load bare.
  directory, _, _ = checkpoint
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((directory / name).read_bytes())
  assert gs.load(tmp_path, dtype="float32", progress=False).tokenizer is None


def _torch_layers(torch_model) -> dict[int, tuple]:
  """Per layer, from transformers' modules: (heads, head_dim, kv, k=v, mlp,
  experts, expert width); kv is ``"shared"`` on KV-shared layers."""
  out = {}
  for i, layer in enumerate(torch_model.model.layers):
    attn = layer.self_attn
    heads = attn.q_proj.out_features // attn.head_dim
    kv, k_eq_v = "shared", False
    if not attn.is_kv_shared_layer:
      kv, k_eq_v = attn.k_proj.out_features // attn.head_dim, attn.v_proj is None
    experts = layer.experts.gate_up_proj.shape
    out[i] = (
      heads,
      attn.head_dim,
      kv,
      k_eq_v,
      layer.mlp.gate_proj.out_features,
      experts[0],
      experts[1] // 2,
    )
  return out


def _parse_rows(text: str) -> dict[int, tuple]:
  """The same tuple per layer, read from our per-layer rows."""
  out = {}
  pattern = r"^ *layers? ([\d, -]+?)(?: \(\d+\))?:? +((?:local|global).*)$"
  for layers, spec in re.findall(pattern, text, re.MULTILINE):
    kv = re.search(r", kv (\d+)", spec)
    experts = re.search(r"(\d+) experts x (\d+)", spec)
    row = (
      int(re.search(r"(\d+) heads x", spec).group(1)),
      int(re.search(r"heads x (\d+)", spec).group(1)),
      int(kv.group(1)) if kv else "shared",
      "k = v" in spec,
      int(re.search(r"mlp (\d+)", spec).group(1)),
      int(experts.group(1)),
      int(experts.group(2)),
    )
    for part in layers.split(", "):
      first, _, last = part.partition("-")
      for i in range(int(first), int(last or first) + 1):
        assert i not in out, f"layer {i} listed twice"
        out[i] = row
  return out


def test_tour_overview_states_each_layers_shape(checkpoint):
  _, torch_model, lm = checkpoint
  expected = _torch_layers(torch_model)
  assert len(set(expected.values())) == 4  # the layers do differ
  summary = model_summary(lm.config, "x")
  assert _parse_rows(summary) == expected
  # Negative control: a config that forgets the global head width says so.
  wrong = model_summary(lm.config.replace(global_head_dim=None), "x")
  assert _parse_rows(wrong) != expected


def test_info_reports_tokenizer_and_per_layer_shapes(checkpoint):
  directory, torch_model, _ = checkpoint
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["info", str(directory), "--dtype", "float32"]) == 0
  text = out.getvalue()
  assert re.search(r"^ *tokenizer: JsonTokenizer\(.*tokenizer\.json", text, re.M)
  assert _parse_rows(text.split("per layer:")[1]) == _torch_layers(torch_model)


def test_tour_neuron_section_on_a_double_wide_layer(checkpoint, tmp_path):
  _, _, lm = checkpoint
  layer = lm.config.num_layers // 2  # the section's layer: KV-shared, 2x wide
  assert lm.config.layer_mlp_dim(layer) == 2 * lm.config.mlp_hidden_dim
  ids = np.asarray([lm.tokenizer.encode(PROMPT, add_bos=True)], np.int32)
  ctx = TourContext(
    lm=lm,
    prompt=PROMPT,
    ids=ids,
    pieces=lm.tokenizer.pieces(ids[0]),
    report=gs.viz.Report("t"),
    out=tmp_path,
    new_tokens=2,
  )
  SECTIONS["neurons"](ctx)
  assert f"MLP neurons (layer {layer})" in ctx.report.to_html()
  # Control: its top neurons reach past the base width, where a view sized by
  # mlp_hidden_dim (what the section used before) refuses them.
  top = gs.analysis.top_neurons(lm.model, ids, layers=[layer], k=8)
  assert top.ids.max() >= lm.config.mlp_hidden_dim


def test_layer_ranges_are_compact_and_elided():
  assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
  many = [i for i in range(62) if i % 6 != 5]  # Gemma 3 27B's local layers
  assert layer_ranges(many) == "0-4, 6-10, 12-16, 18-22, ..., 60-61"
