// gemma_surgery attribution graph view. Data (embedded JSON):
//   tokens: display strings; nodes: {id, kind, layer ("E", "0".., logits
//   layers+1), pos, feature, act, infl, label}; links: [source, target, weight].
(function () {
  const gsViz = window.gsViz;
  if (gsViz.graph) return;
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = {
    "cross layer transcoder": "#8e6bd8", "mlp reconstruction error": "#9e9e9e",
    "embedding": "#4caf50", "logit": "#ff9800",
  };

  function el(tag, attrs) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  gsViz.graph = function (root, d) {
    const svg = root.querySelector(".gsv-graph-svg");
    const info = root.querySelector(".gsv-graph-info");
    const status = root.querySelector(".gsv-status");
    const rows = ["E"];
    const numeric = d.nodes.filter((n) => n.layer !== "E").map((n) => Number(n.layer));
    const top = numeric.length ? Math.max(...numeric) : 0;
    for (let i = 0; i <= top; i++) rows.push(String(i));
    const T = Math.max(d.tokens.length, 1 + Math.max(0, ...d.nodes.map((n) => n.pos)));
    const W = 90, H = 70, R = 7;
    const width = 60 + T * W, height = 40 + rows.length * H;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    // Place nodes: per (row, pos) cell, side by side.
    const cells = {}, place = {};
    for (const n of d.nodes) {
      const key = n.layer + "/" + n.pos;
      (cells[key] = cells[key] || []).push(n);
    }
    for (const key in cells) {
      const list = cells[key];
      list.forEach((n, i) => {
        const row = rows.indexOf(n.layer);
        const x = 50 + n.pos * W + W / 2 + (i - (list.length - 1) / 2) * (Math.min(2 * R + 2, (W - 10) / list.length));
        const y = height - 30 - row * H;
        place[n.id] = { x, y, node: n };
      });
    }
    rows.forEach((r, i) => {
      const t = el("text", { x: 4, y: height - 26 - i * H, class: "gsv-graph-row" });
      t.textContent = r === "E" ? "emb" : Number(r) === top && d.nodes.some((n) => n.kind === "logit" && n.layer === r) ? "logit" : "L" + r;
      svg.appendChild(t);
    });
    d.tokens.forEach((tok, p) => {
      const t = el("text", { x: 50 + p * W + W / 2, y: height - 6, "text-anchor": "middle", class: "gsv-graph-tok" });
      t.textContent = tok;
      svg.appendChild(t);
    });
    const maxW = Math.max(1e-12, ...d.links.map((l) => Math.abs(l[2])));
    const edgeEls = [];
    for (const [s, t, w] of d.links) {
      const a = place[s], b = place[t];
      const line = el("line", {
        x1: a.x, y1: a.y, x2: b.x, y2: b.y,
        stroke: w >= 0 ? "#3b6fd8" : "#d84a3b",
        "stroke-width": 0.5 + 4 * Math.abs(w) / maxW, "stroke-opacity": 0.35,
        class: "gsv-graph-edge",
      });
      line.dataset.s = s; line.dataset.t = t; line.dataset.w = w;
      svg.appendChild(line);
      edgeEls.push(line);
    }
    const fmt = (v) => (v === null || v === undefined ? "" : Number(v).toPrecision(3));
    function select(id) {
      const n = place[id].node;
      root.dataset.selected = id;
      for (const e of edgeEls) {
        const on = e.dataset.s === id || e.dataset.t === id;
        e.setAttribute("stroke-opacity", on ? 0.95 : 0.08);
        e.classList.toggle("gsv-on", on);
      }
      const ins = d.links.filter((l) => l[1] === id).sort((x, y) => Math.abs(y[2]) - Math.abs(x[2]));
      const outs = d.links.filter((l) => l[0] === id).sort((x, y) => Math.abs(y[2]) - Math.abs(x[2]));
      status.textContent = `${n.kind} ${id} (layer ${n.layer}, position ${n.pos})` + (n.act !== null && n.act !== undefined ? `, activation ${fmt(n.act)}` : "") + (n.label ? " " + n.label : "");
      info.textContent = "inputs: " + ins.slice(0, 8).map((l) => `${l[0]} ${fmt(l[2])}`).join(", ") + " | outputs: " + outs.slice(0, 8).map((l) => `${l[1]} ${fmt(l[2])}`).join(", ");
    }
    for (const id in place) {
      const p = place[id];
      const c = el("circle", { cx: p.x, cy: p.y, r: R, fill: COLORS[p.node.kind] || "#000", class: "gsv-graph-node" });
      c.dataset.id = id;
      c.addEventListener("click", () => select(id));
      const tip = el("title", {});
      tip.textContent = `${p.node.kind} ${id}` + (p.node.label ? " " + p.node.label : "");
      c.appendChild(tip);
      svg.appendChild(c);
    }
    root.dataset.nodes = String(Object.keys(place).length);
    root.dataset.edges = String(edgeEls.length);
  };
})();
