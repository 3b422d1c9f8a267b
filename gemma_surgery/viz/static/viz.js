// gemma_surgery visualizations: shared runtime (tooltips, colour scales).
// Defined once per page; views written later reuse it.
(function () {
  if (window.gsViz) return;
  const gsViz = {};
  window.gsViz = gsViz;

  function rgb(hex) {
    const h = hex.replace("#", "");
    return [0, 2, 4].map((i) => parseInt(h.substr(i, 2), 16));
  }
  // Colour at t in [0, 1] on a scale given as [[position, "#rrggbb"], ...].
  gsViz.color = function (scale, t) {
    if (!isFinite(t)) return "#e6e6e6";
    t = Math.min(1, Math.max(0, t));
    for (let i = 1; i < scale.length; i++) {
      const [p0, c0] = scale[i - 1];
      const [p1, c1] = scale[i];
      if (t <= p1) {
        const f = p1 === p0 ? 0 : (t - p0) / (p1 - p0);
        const a = rgb(c0), b = rgb(c1);
        const c = a.map((x, k) => Math.round(x + (b[k] - x) * f));
        return "#" + c.map((x) => x.toString(16).padStart(2, "0")).join("");
      }
    }
    return scale[scale.length - 1][1];
  };
  gsViz.textColor = function (bg) {
    const [r, g, b] = rgb(bg);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 ? "#111111" : "#ffffff";
  };

  // Hover tooltips: any element inside a .gsv root with a data-tip attribute.
  // Format: first line = title, later lines = table rows with tab-separated cells.
  // Text is set with textContent only, never parsed as HTML.
  let tip = null;
  function ensureTip() {
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "gsv-tip";
      document.body.appendChild(tip);
    }
    return tip;
  }
  gsViz.showTip = function (el, x, y) {
    const t = ensureTip();
    const lines = (el.getAttribute("data-tip") || "").split("\n");
    t.replaceChildren();
    const b = document.createElement("b");
    b.textContent = lines[0];
    t.appendChild(b);
    if (lines.length > 1) {
      const table = document.createElement("table");
      for (const line of lines.slice(1)) {
        const tr = document.createElement("tr");
        for (const cell of line.split("\t")) {
          const td = document.createElement("td");
          td.textContent = cell;
          tr.appendChild(td);
        }
        table.appendChild(tr);
      }
      t.appendChild(table);
    }
    t.style.display = "block";
    const w = t.offsetWidth, h = t.offsetHeight;
    const left = Math.min(x + 14, window.innerWidth - w - 4);
    const top = y + 16 + h > window.innerHeight ? y - h - 10 : y + 16;
    t.style.left = Math.max(0, left) + "px";
    t.style.top = Math.max(0, top) + "px";
  };
  gsViz.hideTip = function () {
    if (tip) tip.style.display = "none";
  };
  document.addEventListener("mouseover", function (ev) {
    const el = ev.target.closest ? ev.target.closest(".gsv [data-tip]") : null;
    if (el) gsViz.showTip(el, ev.clientX, ev.clientY);
    else gsViz.hideTip();
  });
  document.addEventListener("mousemove", function (ev) {
    if (!tip || tip.style.display === "none") return;
    const el = ev.target.closest ? ev.target.closest(".gsv [data-tip]") : null;
    if (el) gsViz.showTip(el, ev.clientX, ev.clientY);
  });

  // Views whose script ran before the runtime (should not happen) or that
  // initialize lazily register here.
  gsViz.init = function (kind, rootId) {
    const root = document.getElementById(rootId);
    const dataEl = document.getElementById(rootId + "-data");
    if (!root || !dataEl || root.dataset.ready) return;
    root.dataset.ready = "1";
    gsViz[kind](root, JSON.parse(dataEl.textContent));
  };
})();
