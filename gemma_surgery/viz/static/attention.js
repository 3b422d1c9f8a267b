// gemma_surgery attention view. Data (embedded JSON):
//   tokens: display strings; L, H, T: layers, heads, tokens;
//   p: attention weights [L, H, T(query), T(key)] flattened, in 1/q units; with
//      tri, only each query's keys 0..query (causal), row after row;
//   q: quantization (weights = p / q); layers: layer labels; scale: colour anchors;
//   init: {layer, head ("avg" or index), mode ("from" | "to"), maskBos, token}.
(function () {
  const gsViz = window.gsViz;
  if (gsViz.attention) return;

  gsViz.attention = function (root, d) {
    const T = d.T, H = d.H;
    const $ = (sel) => root.querySelector(sel);
    const layerSel = $(".gsv-layer"), headSel = $(".gsv-head"), bosBox = $(".gsv-bos");
    const toks = Array.from(root.querySelectorAll(".gsv-strip .gsv-tok"));
    const status = $(".gsv-status"), canvas = $(".gsv-canvas"), hi = $(".gsv-legend-hi");
    const state = {
      layer: d.init.layer, head: d.init.head, mode: d.init.mode,
      maskBos: d.init.maskBos, token: d.init.token,
    };

    // The [T, T] matrix for the current layer/head choice (average if "avg"),
    // with key 0 zeroed and rows renormalized when BOS is masked.
    function matrix() {
      const m = new Float64Array(T * T);
      const heads = state.head === "avg" ? [...Array(H).keys()] : [Number(state.head)];
      const per = d.tri ? (T * (T + 1)) / 2 : T * T;
      for (const h of heads) {
        const base = (state.layer * H + h) * per;
        for (let i = 0, k = base; i < T; i++) {
          const n = d.tri ? i + 1 : T;
          for (let j = 0; j < n; j++, k++) m[i * T + j] += d.p[k] / d.q / heads.length;
        }
      }
      if (state.maskBos && T > 1) {
        for (let i = 0; i < T; i++) {
          m[i * T] = 0;
          let s = 0;
          for (let j = 0; j < T; j++) s += m[i * T + j];
          if (s > 0) for (let j = 0; j < T; j++) m[i * T + j] /= s;
        }
      }
      return m;
    }

    function headName() {
      return state.head === "avg" ? "average over heads" : "head " + state.head;
    }

    function render() {
      const m = matrix();
      const sel = state.token;
      const vals = toks.map((_, j) => (state.mode === "from" ? m[sel * T + j] : m[j * T + sel]));
      const vmax = Math.max(1e-9, ...vals);
      toks.forEach((el, j) => {
        const v = vals[j];
        const bg = gsViz.color(d.scale, v / vmax);
        el.style.background = bg;
        el.style.color = gsViz.textColor(bg);
        el.classList.toggle("gsv-sel", j === sel);
        const rel = state.mode === "from" ? "attention from selected to this" : "attention from this to selected";
        el.setAttribute("data-tip", "position " + j + "  " + d.tokens[j] + "\n" + rel + "\t" + v.toFixed(3));
      });
      const verb = state.mode === "from" ? "attends to" : "is attended to by";
      status.textContent = d.layers[state.layer] + ", " + headName() +
        (state.maskBos ? ", BOS masked" : "") + ": what position " + sel +
        " (" + d.tokens[sel] + ") " + verb + ". Click a token to select it.";
      hi.textContent = vmax.toFixed(3);
      drawCanvas(m);
    }

    const cell = Math.max(3, Math.min(14, Math.floor(360 / Math.max(1, T))));
    canvas.width = cell * T;
    canvas.height = cell * T;
    function drawCanvas(m) {
      const ctx = canvas.getContext("2d");
      if (!ctx) return;
      for (let i = 0; i < T; i++) {
        for (let j = 0; j < T; j++) {
          ctx.fillStyle = gsViz.color(d.scale, m[i * T + j]);
          ctx.fillRect(j * cell, i * cell, cell, cell);
        }
      }
      ctx.strokeStyle = "#f0a500";
      ctx.lineWidth = 2;
      if (state.mode === "from") ctx.strokeRect(1, state.token * cell + 1, T * cell - 2, cell - 2);
      else ctx.strokeRect(state.token * cell + 1, 1, cell - 2, T * cell - 2);
      canvas._m = m;
    }
    function cellAt(ev) {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor(((ev.clientX - r.left) / r.width) * T);
      const i = Math.floor(((ev.clientY - r.top) / r.height) * T);
      return [Math.min(T - 1, Math.max(0, i)), Math.min(T - 1, Math.max(0, j))];
    }
    canvas.addEventListener("mousemove", (ev) => {
      const [i, j] = cellAt(ev);
      const v = canvas._m ? canvas._m[i * T + j] : 0;
      canvas.setAttribute("data-tip", "query " + i + " " + d.tokens[i] + " → key " + j + " " +
        d.tokens[j] + "\nweight\t" + v.toFixed(3));
    });
    canvas.addEventListener("click", (ev) => {
      const [i, j] = cellAt(ev);
      state.token = state.mode === "from" ? i : j;
      render();
    });

    toks.forEach((el, j) => el.addEventListener("click", () => {
      state.token = j;
      render();
    }));
    layerSel.addEventListener("change", () => { state.layer = Number(layerSel.value); render(); });
    headSel.addEventListener("change", () => { state.head = headSel.value; render(); });
    bosBox.addEventListener("change", () => { state.maskBos = bosBox.checked; render(); });
    root.querySelectorAll(".gsv-mode").forEach((r) => r.addEventListener("change", () => {
      if (r.checked) { state.mode = r.value; render(); }
    }));
    render();
  };
})();
