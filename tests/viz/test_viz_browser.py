"""The HTML views work in a real browser: headless Chromium over DevTools.

Needs a Chromium executable (`.ci/run` installs Debian's `chromium` when it is
missing; `$CHROMIUM` may point at another build). Without one these tests
fail: they are part of CI. Deselect them locally with `-m "not browser"`.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cdp_browser import (  # tests/ is on sys.path under pytest.
  Browser,
  find_chromium,
)

from gemma_surgery import viz
from gemma_surgery.viz import _colors

pytestmark = pytest.mark.browser

EVIL = (
  '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'
)
TOKENS = ["<bos>", "The", " cat", " &", '"dog"', "\n", EVIL, " cat", " sat"]
T = len(TOKENS)
L, H = 3, 2


def _pattern() -> np.ndarray:
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(L, H, T, T)) * 3
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


PATTERN = _pattern()
FULL = np.random.default_rng(2).dirichlet(np.ones(T), size=(1, 2, T))  # not causal


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  exe = find_chromium()
  if exe is None:
    pytest.fail(
      "No Chromium found: install Debian's `chromium` (apt-get install chromium; "
      ".ci/run does it) or set $CHROMIUM. Deselect with -m 'not browser'.",
      pytrace=False,
    )
  rng = np.random.default_rng(0)
  S = 1 + 2 * L
  vocab = np.array(["▁Bern", "<tag>", " Zurich", EVIL], dtype=object)
  top = vocab[rng.integers(0, len(vocab), size=(S, T, 10))]
  top[0, 0, :] = ["<tag>"] * 10
  probs = np.sort(rng.dirichlet(np.ones(10), size=(S, T)), -1)[..., ::-1]
  rows = ["embed"] + [f"{k} {i}" for i in range(L) for k in ("attn", "mlp")]
  report = (
    viz.Report("browser test")
    .add(
      viz.logit_lens_table(
        top, probs, rng.uniform(0, 1, (S, T)), row_labels=rows, col_tokens=TOKENS
      )
    )
    .add(viz.attention_view(TOKENS, PATTERN, layer=0, head=0, token=T - 1))
    .add(viz.heatmap(rng.normal(size=(L, T)), col_labels=TOKENS))
    .add(viz.attention_view(TOKENS, FULL, title="bidirectional"))
    .add(
      viz.feature_strip(
        TOKENS, rng.integers(0, 100, (T, 3)), rng.uniform(0.5, 2, (T, 3))
      )
    )
    .add(viz.show({"weights": np.arange(12.0).reshape(3, 4)}, title="tree"))
  )
  path = report.save(tmp_path_factory.mktemp("viz") / "report.html")
  browser = Browser(exe)
  try:
    yield browser.open(path.as_uri())
  finally:
    browser.close()


def _colours(page) -> list[str]:
  return page.eval(
    "Array.from(document.querySelector('.gsv-attention')"
    ".querySelectorAll('.gsv-strip .gsv-tok'))"
    ".map(e => getComputedStyle(e).backgroundColor)"
  )


def _darkest(scale_end: str) -> str:
  r, g, b = (int(scale_end[i : i + 2], 16) for i in (1, 3, 5))
  return f"rgb({r}, {g}, {b})"


def test_no_console_errors_and_nothing_fetched(page):
  page.wait_for("document.querySelector('.gsv-attention').dataset.ready")
  assert page.problems() == []
  urls = page.requested_urls()
  assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls


def test_token_text_is_not_executed(page):
  assert page.eval("window.__pwned === undefined")
  texts = page.eval(
    "Array.from(document.querySelector('.gsv-attention')"
    ".querySelectorAll('.gsv-strip .gsv-tok'))"
    ".map(e => e.textContent)"
  )
  assert texts[6] == viz.display_token(EVIL)
  assert texts[5] == "↵" and texts[2] == "␣cat"


def test_click_selects_a_token_and_colours_what_it_attends_to(page):
  before = _colours(page)
  page.click(".gsv-attention .gsv-tok[data-i='4']")
  after = _colours(page)
  assert after != before
  assert page.eval("document.querySelector('.gsv-attention .gsv-sel').dataset.i") == "4"
  # Layer 0, head 0, query 4: the strongest key gets the end colour of the scale;
  # keys after the query get none.
  strongest = int(np.argmax(PATTERN[0, 0, 4]))
  assert after[strongest] == _darkest(_colors.COOL[-1][1])
  assert all(c == "rgb(255, 255, 255)" for c in after[5:])


def test_layer_and_head_selectors_change_the_colouring(page):
  page.click(".gsv-attention .gsv-tok[data-i='7']")
  base = _colours(page)
  page.eval(
    "(() => { const s = document.querySelector('.gsv-attention .gsv-layer');"
    " s.value = '2'; s.dispatchEvent(new Event('change')); })()"
  )
  by_layer = _colours(page)
  assert by_layer != base
  assert int(np.argmax(PATTERN[2, 0, 7])) == by_layer.index(
    _darkest(_colors.COOL[-1][1])
  )
  page.eval(
    "(() => { const s = document.querySelector('.gsv-attention .gsv-head');"
    " s.value = 'avg'; s.dispatchEvent(new Event('change')); })()"
  )
  averaged = _colours(page)
  assert averaged != by_layer
  assert int(np.argmax(PATTERN[2, :, 7].mean(0))) == averaged.index(
    _darkest(_colors.COOL[-1][1])
  )
  status = page.eval("document.querySelector('.gsv-attention .gsv-status').textContent")
  assert "layer 2" in status and "average" in status


def test_mode_and_bos_mask(page):
  page.click(".gsv-attention .gsv-tok[data-i='1']")
  page.click(".gsv-attention input.gsv-mode[value='to']")
  colours = _colours(page)
  assert colours[0] == "rgb(255, 255, 255)"  # BOS cannot attend to a later token
  page.click(".gsv-attention .gsv-mode[value='from']")
  page.click(".gsv-attention .gsv-tok[data-i='3']")
  page.click(".gsv-attention .gsv-bos")
  assert page.eval("document.querySelector('.gsv-attention .gsv-bos').checked")
  assert _colours(page)[0] == "rgb(255, 255, 255)"


def test_hover_shows_a_tooltip_with_the_top_tokens(page):
  page.hover(".gsv-lens td.gsv-cell")
  page.wait_for(
    "getComputedStyle(document.querySelector('.gsv-tip')).display === 'block'"
  )
  text = page.eval("document.querySelector('.gsv-tip').textContent")
  assert "embed" in text and "<tag>" in text and "10." in text
  page.hover(".gsv-features .gsv-tok")
  text = page.eval("document.querySelector('.gsv-tip').textContent")
  assert "position 0" in text and "#" in text
  page.hover(".gsv-heatmap td")
  assert "value" in page.eval("document.querySelector('.gsv-tip').textContent")
  page.hover("h1")
  assert (
    page.eval("getComputedStyle(document.querySelector('.gsv-tip')).display") == "none"
  )


def test_treescope_rendering_loads(page):
  # Treescope renders lazily, once its container scrolls into view.
  page.eval("document.querySelector('.gsv-treescope').scrollIntoView()")
  page.wait_for(
    "(() => { const c = document.querySelector('.gsv-treescope treescope-container');"
    " return c && c.shadowRoot && c.shadowRoot.textContent.includes('weights'); })()"
  )
  assert page.problems() == []


def test_the_driver_sees_console_errors_and_exceptions(page, tmp_path):
  """Negative control: a broken page is reported, so an empty list means something."""
  bad = tmp_path / "bad.html"
  bad.write_text(
    "<script>console.error('boom'); undefinedFunction();</script>"
    '<img src="https://example.invalid/x.png">'
  )
  other = page.browser.open(bad.as_uri())
  problems = other.problems()
  assert any("boom" in p for p in problems)
  assert any("undefinedFunction" in p for p in problems)
  assert any(u.startswith("https:") for u in other.requested_urls())


def test_a_non_causal_pattern_is_decoded_whole(page):
  colours = page.eval(
    "(() => { const v = document.querySelectorAll('.gsv-attention')[1];"
    " v.querySelector('.gsv-tok[data-i=\"0\"]').click();"
    " return Array.from(v.querySelectorAll('.gsv-strip .gsv-tok'))"
    ".map(e => getComputedStyle(e).backgroundColor); })()"
  )
  avg = FULL[0, :, 0].mean(0)
  assert colours.index(_darkest(_colors.COOL[-1][1])) == int(np.argmax(avg))
  assert colours[int(np.argmin(avg))] != "rgb(255, 255, 255)" or avg.min() < 1e-3


FORCE_LAYOUT = """(() => {
  let right = 0;
  const walk = (root) => {
    for (const e of root.querySelectorAll('*')) {
      right = Math.max(right, e.getBoundingClientRect().right);
      if (e.shadowRoot) walk(e.shadowRoot);
    }
  };
  walk(document);
  return right;
})()"""


def test_a_report_never_scrolls_the_page_sideways(tmp_path):
  """At 1280 px a report holding the embedded model in treescope, a long code
  line and a 200-column heatmap fits the window: wide content scrolls inside
  its own view. (Before the fix, treescope's one-line layout of the folded
  model made the page 278,521 px wide.)"""
  import gemma_surgery as gs

  model = gs.load("tiny").model
  report = (
    viz.Report("wide")
    .add(viz.show(model, arrays=False), heading="the model")
    .code("x" * 3000)
    .add(viz.heatmap(np.random.default_rng(0).normal(size=(4, 200))))
  )
  path = report.save(tmp_path / "report.html")
  browser = Browser(find_chromium())
  try:
    page = browser.open(path.as_uri())
    page.eval("document.querySelector('.gsv-treescope').scrollIntoView()")
    # Treescope renders into a shadow root and lays out lazily: measure every
    # element (which forces layout) until the model's rendering is there.
    page.wait_for(FORCE_LAYOUT + " > 1280", 30)
    inner = page.eval("window.innerWidth")
    assert inner == 1280
    assert page.eval("document.documentElement.scrollWidth") <= inner
    assert page.problems() == []
    # Negative control: without the containment rules the treescope view
    # alone widens the page.
    page.eval(
      "(() => { const s = document.createElement('style');"
      " s.textContent = '.gsv { max-width: none !important; }"
      " .gsv .gsv-treescope { overflow-x: visible !important; }';"
      " document.head.appendChild(s);"
      " document.querySelector('.gsv-report pre').remove(); })()"
    )
    page.eval(FORCE_LAYOUT)
    assert page.eval("document.documentElement.scrollWidth") > inner
  finally:
    browser.close()
