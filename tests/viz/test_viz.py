"""Unit tests of the HTML renderers: content, escaping, self-containment, data."""

from __future__ import annotations

import html.parser
import json
import re
import sys

import numpy as np
import pytest
from helpers.paths import ROOT
from penzai import pz

import gemma_surgery
from gemma_surgery import errors, viz
from gemma_surgery.viz import attention as attention_mod

EVIL = "</script><script>alert(\"x\")</script><b onmouseover='y'>&amp;"
SHOWN = viz.display_token(EVIL)  # its space becomes a visible marker
TOKENS = ["<bos>", "The", " cat", "\n", "\t", "", EVIL]
T = len(TOKENS)
README = (ROOT / "README.md").read_text()
_VOID = {"br", "img", "input", "meta", "link", "hr", "col", "source", "wbr"}


class _Checker(html.parser.HTMLParser):
  """Checks that non-void elements nest and close properly."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.stack: list[str] = []
    self.texts: list[str] = []

  def handle_starttag(self, tag, attrs):
    if tag not in _VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
    self.stack.pop()

  def handle_data(self, data):
    self.texts.append(data)


def _check_page(page: str) -> str:
  """Well-formed, self-contained, evil token escaped; returns the visible text."""
  checker = _Checker()
  checker.feed(page)
  checker.close()
  assert checker.stack == []
  refs = re.findall(r"""(?:src|href)\s*=\s*["']?\s*([^"'\s>]+)""", page, re.I)
  assert all(not re.match(r"(https?:)?//", r, re.I) for r in refs), refs
  assert "@import" not in page and not re.search(r"url\(\s*['\"]?(https?:)?//", page)
  assert "<script>alert" not in page and "<b onmouseover" not in page
  return "".join(checker.texts)


def _embedded_json(page: str) -> dict:
  m = re.search(
    r'<script type="application/json" id="[^"]+">(.*?)</script>', page, re.S
  )
  assert m
  return json.loads(m.group(1))


def _pattern(L=2, H=3, seed=0):
  rng = np.random.default_rng(seed)
  logits = np.where(
    np.tril(np.ones((T, T), bool)), rng.normal(size=(L, H, T, T)), -np.inf
  )
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_display_token_marks_whitespace():
  assert viz.display_token(" the") == "␣the"
  assert viz.display_token("▁the") == "␣the"
  assert viz.display_token("a\nb\tc") == "a↵b⇥c"
  assert viz.display_token("") == "∅"
  assert viz.display_token("\x01") == "\\x01"
  assert viz.display_token("<b>&") == "<b>&"  # escaping happens later, once


def test_attention_view_embeds_the_pattern_and_escapes_tokens():
  p = _pattern()
  view = viz.attention_view(TOKENS, p, layer_labels=["first", "second"], head=1)
  page = view.to_html()
  text = _check_page(page)
  assert "␣cat" in text and "↵" in text and "∅" in text and SHOWN in text
  data = _embedded_json(page)
  assert data["tokens"] == [viz.display_token(t) for t in TOKENS]
  assert data["tri"]  # causal: only the lower triangle is embedded
  lower = np.tril(np.ones((T, T), bool))
  got = np.zeros_like(p)
  got[..., lower] = (
    np.asarray(data["p"], dtype=np.float64).reshape(2, 3, -1) / data["q"]
  )
  np.testing.assert_allclose(got, p, atol=0.5 / attention_mod.QUANT + 1e-12)
  assert data["init"] == {
    "layer": 1,
    "head": "1",
    "mode": "from",
    "maskBos": False,
    "token": T - 1,
  }
  assert data["layers"] == ["first", "second"]
  assert (
    "</script><script>"
    not in page.split('type="application/json"')[1].split("</script>")[0]
  )


def test_attention_view_takes_named_arrays():
  p = _pattern(L=1, H=2)
  named = pz.nx.wrap(p[:, None]).tag("layer", "batch", "heads", "seq", "kv_seq")
  page = viz.attention_view(TOKENS, named).to_html()
  full = np.ones((1, 1, T, T)) / T  # not causal: embedded whole
  data = _embedded_json(viz.attention_view(TOKENS, full).to_html())
  assert not data["tri"]
  np.testing.assert_allclose(
    np.asarray(data["p"]).reshape(1, 1, T, T) / data["q"], full, atol=1e-3
  )
  data = _embedded_json(page)
  got = np.zeros_like(p)
  got[..., np.tril(np.ones((T, T), bool))] = (
    np.reshape(data["p"], (1, 2, -1)) / data["q"]
  )
  np.testing.assert_allclose(got, p, atol=1e-3)
  single_layer = viz.attention_view(TOKENS, p[0]).to_html()  # [heads, seq, kv_seq]
  assert _embedded_json(single_layer)["L"] == 1
  with pytest.raises(errors.InputError, match="named axes"):
    viz.attention_view(TOKENS, pz.nx.wrap(p).tag("layer", "heads", "q", "k"))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"pattern": np.ones((1, 1, T, T)) * 2}, r"\[0, 1\]"),
    ({"pattern": np.ones((1, 1, T, T + 1)) / T}, "kv_seq"),
    ({"tokens": TOKENS[:-1]}, "expected 7 entries"),
    ({"layer": 5}, "out of range"),
    ({"mode": "sideways"}, "mode"),
  ],
)
def test_attention_view_rejects_bad_input(kwargs, match):
  args = {"tokens": TOKENS, "pattern": _pattern(L=1, H=1)} | kwargs
  tokens, pattern = args.pop("tokens"), args.pop("pattern")
  with pytest.raises(errors.InputError, match=match):
    viz.attention_view(tokens, pattern, **args)


def _lens_inputs(S=3, k=4):
  rng = np.random.default_rng(0)
  top = np.array(
    [[[f"t{s}{j}{r}" for r in range(k)] for j in range(T)] for s in range(S)],
    dtype=object,
  )
  top[1, 2, 0] = EVIL
  top[2, 3, 0] = " sat"
  probs = np.sort(rng.dirichlet(np.ones(k), size=(S, T)), -1)[..., ::-1]
  return top, probs, rng.uniform(0, 0.5, (S, T))


def test_logit_lens_table_cells_tooltips_and_hits():
  top, probs, change = _lens_inputs()
  change[0] = np.nan  # the embedding row has no previous residual
  nxt = ["x"] * T
  nxt[3] = " sat"
  view = viz.logit_lens_table(
    top,
    probs,
    change,
    row_labels=["embed", "attn 0", "mlp 0"],
    col_tokens=TOKENS,
    next_tokens=nxt,
  )
  page = view.to_html()
  text = _check_page(page)
  assert "embed" in text and "mlp 0" in text and "next token" in text
  assert text.count(SHOWN) >= 2  # a column header and a cell
  assert page.count('class="gsv-cell gsv-hit"') == 1  # " sat" at [2, 3]
  assert f"{probs[0, 0, 1]:.3f}" in page  # second-best probability in a tooltip
  assert "t001" in page
  assert "change n/a" in page and "#e6e6e6" in page  # NaN: grey cell
  with pytest.raises(errors.InputError):
    viz.logit_lens_table(
      top, probs[:, :-1], change, row_labels=["a"] * 3, col_tokens=TOKENS
    )
  with pytest.raises(errors.InputError):
    viz.logit_lens_table(top, probs, change, row_labels=["a"], col_tokens=TOKENS)


def test_neuron_views():
  rng = np.random.default_rng(0)
  acts = rng.normal(size=T)
  ids, vals = rng.integers(0, 300, (T, 4)), rng.uniform(0, 3, (T, 4))
  page = viz.neuron_strip(TOKENS, acts, top_ids=ids, top_values=vals).to_html()
  text = _check_page(page)
  assert SHOWN in text and f"#{ids[0, 0]}" in page
  assert "#1d4f91" in page or "#9c1f1a" in page  # signed values: diverging scale
  page = viz.neuron_buckets(
    TOKENS, ids, vals, num_neurons=300, num_buckets=30
  ).to_html()
  _check_page(page)
  assert "30 buckets of 10 neurons" in page
  assert page.count('class="gsv-bucket"') == 30 * T
  # 70 buckets asked of 512 neurons: buckets of 8, so 64 of them (the
  # caption once claimed 70); and an uneven split names the short last one.
  page = viz.neuron_buckets(TOKENS, ids, vals, num_neurons=512, num_buckets=70)
  assert "64 buckets of 8 neurons" in page.to_html()
  assert page.to_html().count('class="gsv-bucket"') == 64 * T
  page = viz.neuron_buckets(TOKENS, ids, vals, num_neurons=300, num_buckets=7)
  assert "7 buckets of 43 (the last 42) neurons" in page.to_html()
  with pytest.raises(errors.InputError):
    viz.neuron_buckets(TOKENS, ids + 300, vals, num_neurons=300)
  with pytest.raises(errors.InputError):
    viz.neuron_strip(TOKENS, acts, top_ids=ids)


def test_heatmap_html_and_png(tmp_path):
  values = np.array([[0.5, -1.0, np.nan], [2.0, 0.0, -0.25]])
  hm = viz.heatmap(
    values, row_labels=["L0", "L1"], col_labels=["<a>", " b", "c"], title="patch"
  )
  page = hm.to_html()
  text = _check_page(page)
  assert "L1" in text and "<a>" in text and "␣b" in text and "-.25" in text
  assert hm.norm.vmin == -2.0 and hm.norm.vmax == 2.0 and hm.scale == "diverging"
  assert "#e6e6e6" in page  # NaN cell
  png = hm.save_png(tmp_path / "hm.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  seq = viz.heatmap(np.abs(values), center=None)
  assert seq.scale == "warm" and seq.norm.vmin == 0.0
  named = pz.nx.wrap(values).tag("layer", "seq")
  np.testing.assert_array_equal(viz.heatmap(named).values, values)


def test_png_export_without_matplotlib_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  with pytest.raises(ImportError, match="gemma-surgery\\[notebook\\]"):
    viz.heatmap(np.zeros((2, 2))).to_png()


def test_sae_views():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 16384, (T, 3))
  vals = np.sort(rng.uniform(0, 4, (T, 3)))[:, ::-1].copy()
  vals[1] = 0
  page = viz.feature_strip(TOKENS, ids, vals, descriptions={int(ids[0, 0]): "<time>"})
  page = page.to_html()
  text = _check_page(page)
  assert f"#{ids[0, 0]}" in text and "·" in text and "&lt;time&gt;" in page

  texts = [TOKENS[:3], TOKENS[2:]]
  acts = [np.array([0.0, 1.0, 2.0]), rng.uniform(0, 1, T - 2)]
  page = viz.feature_texts(
    texts, acts, labels=["one", "two"], notes=["a", "b"]
  ).to_html()
  text = _check_page(page)
  assert "one" in text and "max 2 · sum 3" in text

  ctx = [TOKENS, TOKENS[::-1]]
  acts = [np.arange(T, dtype=float), np.arange(T, dtype=float) * 2]
  view = viz.max_activating_examples(ctx, acts, left=2, right=1)
  page = view.to_html()
  text = _check_page(page)
  assert text.index("example 1") < text.index("example 0")  # strongest first
  assert page.count("gsv-max") >= 2
  assert "max 12 at 6" in text
  one = viz.max_activating_examples(ctx, acts, top=1).to_html()
  assert "example 0" not in one
  with pytest.raises(errors.InputError):
    viz.feature_texts(texts, acts[:1])


def test_report_is_one_self_contained_page(tmp_path):
  hm = viz.heatmap(np.eye(2), title="eye")
  report = (
    viz.Report("Tour <1>")
    .heading("Part & one")
    .text("First para.\n\nSecond <b>para</b>.")
    .code("gemma-surgery tour --out x")
    .add(viz.attention_view(TOKENS, _pattern()), heading="Attention")
    .add(hm)
    .image(b"\x89PNG fake", alt="fake")
  )
  path = report.save(tmp_path / "sub" / "report.html")
  page = path.read_text()
  text = _check_page(page)
  assert text.index("Part & one") < text.index("First para.") < text.index("Attention")
  assert "Second <b>para</b>." in text
  assert page.count("<style>") == 1 and 'src="data:image/png;base64,' in page
  assert page.startswith("<!DOCTYPE html>")
  assert report._repr_html_().startswith("<style>")
  with pytest.raises(TypeError):
    report.add("not a view")


def test_views_display_in_notebooks_and_save(tmp_path):
  view = viz.neuron_strip(TOKENS, np.ones(T))
  assert "gsViz" in view._repr_html_() and "<style>" in view._repr_html_()
  out = view.save(tmp_path / "v.html")
  assert out.read_text().startswith("<!DOCTYPE html>")
  assert "HtmlView" in repr(view)


def test_show_renders_treescope_self_contained():
  import jax

  layer = pz.nn.Linear.from_config(
    name="lin",
    init_base_rng=jax.random.key(0),
    input_axes={"a": 3},
    output_axes={"b": 2},
  )
  view = viz.show({"layer": layer, "x": pz.nx.wrap(np.ones((2, 3))).tag("p", "q")})
  page = view.to_html()
  _check_page(page)
  assert "treescope-container" in page


def test_public_viz_names_are_documented():
  assert "viz" in gemma_surgery.__all__
  missing = [name for name in viz.__all__ if f"`{name}" not in README]
  assert not missing, f"undocumented viz names: {missing}"


def test_heatmap_cell_labels_are_short_and_hide_near_zero():
  from gemma_surgery.viz.heatmap import cell_labels

  rng = np.random.default_rng(3)
  for magnitude in (1e-4, 1e-2, 1.0, 30.0, 1e4):
    values = rng.normal(size=(6, 9)) * magnitude
    values[0, 0] = magnitude * 1e-5  # near zero relative to the rest
    labels = cell_labels(values)
    assert labels[0][0] == ""
    assert all(len(s) <= 5 for row in labels for s in row), labels
    biggest = np.unravel_index(np.abs(values).argmax(), values.shape)
    shown = float(labels[biggest[0]][biggest[1]])
    assert shown == pytest.approx(values[biggest], rel=0.2)
  # Readable: what once printed as "-3.1e-05" or "0.00012" in a 0.4-inch cell.
  assert cell_labels(np.array([[0.5, -0.07, 0.3e-4]])) == [[".50", "-.07", ""]]
