// attnstore viewer: plain ES module, canvas 2D, no dependencies. Every view's state lives in the
// URL hash (#/page?key=value…), so a view is shared by sharing its link.

const $app = document.getElementById("app");
const $tooltip = document.getElementById("tooltip");
let META = null;
let renderToken = 0; // a newer render cancels the older one's late work

// ---------------------------------------------------------------- helpers
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {}

function mount(...children) { $app.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)); }

// Every API request carries this header: a page on another origin cannot send it without CORS,
// so it cannot make the viewer spend time on its behalf (schemas/serve.md).
const API_HEADERS = { "X-Attnstore": "1" };

async function api(path, params = {}) {
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null));
  const res = await fetch(`/api/${path}?${qs}`, { headers: API_HEADERS });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new ApiError(body.error || `HTTP ${res.status}`);
  return body;
}

async function tile(params) {
  const res = await fetch(`/api/tile?${new URLSearchParams(params)}`, { headers: API_HEADERS });
  if (!res.ok) {
    const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
    throw new ApiError(body.error);
  }
  const [rows, cols] = res.headers.get("X-Shape").split(",").map(Number);
  return { rows, cols, data: new Float32Array(await res.arrayBuffer()) };
}

// A head's stored --overview (max): [M, M] float32 cells of b × b tokens (X-Block).
async function overviewImage(params) {
  const res = await fetch(`/api/overview?${new URLSearchParams(params)}`, { headers: API_HEADERS });
  if (!res.ok) return null;
  const [rows, cols] = res.headers.get("X-Shape").split(",").map(Number);
  return { rows, cols, block: Number(res.headers.get("X-Block")), data: new Float32Array(await res.arrayBuffer()) };
}

function route() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [page, query] = raw.split("?");
  return { page: page || "overview", params: Object.fromEntries(new URLSearchParams(query || "")) };
}

function href(page, params) {
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  return `#/${page}${qs.toString() ? "?" + qs : ""}`;
}

function setParams(changes, { replace = false } = {}) {
  const { page, params } = route();
  const next = href(page, { ...params, ...changes });
  if (replace) history.replaceState(null, "", next);
  else location.hash = next;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits);
}

function showError(container, err) {
  container.append(h("p", { class: "error", role: "alert", text: err.message || String(err) }));
}

function select(name, options, value, onchange, labels = {}) {
  return h("label", {}, name,
    h("select", { name, onchange: (e) => onchange(e.target.value) },
      options.map((o) => h("option", { value: o, selected: String(o) === String(value), text: labels[o] ?? o }))));
}

// ---------------------------------------------------------------- colour
// viridis anchors (matplotlib), interpolated into a 256-entry table; lightness increases along it.
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
const LUT = (() => {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (VIRIDIS.length - 1), a = Math.floor(x), b = Math.min(a + 1, VIRIDIS.length - 1), f = x - a;
    for (let c = 0; c < 3; c++) out[i * 3 + c] = Math.round(VIRIDIS[a][c] * (1 - f) + VIRIDIS[b][c] * f);
  }
  return out;
})();
const SCALES = { sqrt: "square root", log: "log (4 decades)", linear: "linear" };

function scaled(v, vmax, scale) {
  if (!(vmax > 0) || !(v > 0)) return 0;
  const t = Math.min(v / vmax, 1);
  if (scale === "linear") return t;
  if (scale === "log") return Math.max(0, (Math.log10(t) + 4) / 4);
  return Math.sqrt(t);
}

function lutColour(t) {
  const i = Math.round(Math.max(0, Math.min(1, t)) * 255) * 3;
  return `rgb(${LUT[i]}, ${LUT[i + 1]}, ${LUT[i + 2]})`;
}

function textColour(t) { return t > 0.6 ? "#111" : "#fff"; }

const LABEL_COLOURS = {
  induction: "#d6336c", "previous-token": "#2463c7", duplicate: "#7048e8", self: "#0ca678",
  sink: "#495057", diffuse: "#f59f00", none: "#e9ecef",
};
function labelColour(label) {
  if (!label) return "#f1f3f5";
  if (label.startsWith("syntactic")) return "#12b886";
  return LABEL_COLOURS[label] || "#adb5bd";
}

function legendCanvas() {
  const c = h("canvas", { width: 256, height: 1 });
  const ctx = c.getContext("2d"), img = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) img.data.set([LUT[i * 3], LUT[i * 3 + 1], LUT[i * 3 + 2], 255], i * 4);
  ctx.putImageData(img, 0, 0);
  return c;
}

// ---------------------------------------------------------------- meta
function storeMeta(i) {
  const s = META.stores[Number(i) || 0];
  if (!s) throw new ApiError(`No store ${i}: this server serves ${META.stores.length}.`);
  return s;
}

function storeSelect(params) {
  if (META.stores.length < 2) return null;
  return select("store", META.stores.map((s) => s.store), params.store || 0,
    (v) => setParams({ store: v }), Object.fromEntries(META.stores.map((s) => [s.store, s.name])));
}

// ---------------------------------------------------------------- overview
async function overview(params, token) {
  const st = storeMeta(params.store);
  const scoreOptions = [...st.scores, "label", ...(st.syntax ? ["syntactic"] : []), ...(st.semantic ? ["semantic"] : [])];
  const score = params.score || (st.scores.includes("prev_token") ? "prev_token" : st.scores[0]);
  const agg = params.agg || "mean";
  const top = Number(params.top || 5);
  const xs = params.x || (st.scores.includes(score) ? score : st.scores[0]);
  const ys = params.y || (st.scores.includes("sink") && xs !== "sink" ? "sink" : st.scores[1]);
  const sel = params.sel ? params.sel.split(",").map(Number) : null;

  const [grid, heads] = await Promise.all([
    api("grid", { store: st.store, score, agg }),
    api("heads", { store: st.store }),
  ]);
  if (token !== renderToken) return;
  const byKey = new Map(heads.rows.map((r) => [`${r.layer}:${r.head}`, r]));
  const inSel = (r) => !sel || (r && r[xs] !== null && r[ys] !== null &&
    r[xs] >= sel[0] && r[xs] <= sel[1] && r[ys] >= sel[2] && r[ys] <= sel[3]);

  const numeric = grid.cells.filter((c) => typeof c.value === "number");
  const values = numeric.map((c) => c.value);
  const vmin = Math.min(...values, 0), vmax = Math.max(...values, 0);
  const ranked = [...numeric].sort((a, b) => b.value - a.value);
  const topKeys = new Set(ranked.slice(0, top).map((c) => `${c.layer}:${c.head}`));
  const mean = values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;

  const controls = h("div", { class: "controls" },
    storeSelect(params),
    select("colour by", scoreOptions, score, (v) => setParams({ score: v })),
    score === "label" || score === "syntactic" || score === "semantic" ? null :
      select("over documents", META.aggregates, agg, (v) => setParams({ agg: v }),
        { mean: "mean (count-weighted)", median: "median", p90: "90th percentile", max: "max", min: "min" }),
    h("label", {}, "highlight top",
      h("input", { type: "number", name: "top", min: 0, max: 999, value: top,
        onchange: (e) => setParams({ top: e.target.value }) })));

  const layers = st.layers, headsList = st.heads;
  const gridEl = h("div", { class: "grid", id: "grid", "data-score": score, "data-agg": agg });
  gridEl.style.gridTemplateColumns = `3.5em repeat(${headsList.length}, minmax(44px, 1fr))`;
  gridEl.append(h("div", { class: "hdr", text: "L \\ H" }), ...headsList.map((hd) => h("div", { class: "hdr", text: hd })));
  const cells = new Map(grid.cells.map((c) => [`${c.layer}:${c.head}`, c]));
  for (const layer of layers) {
    gridEl.append(h("div", { class: "rowhdr", text: layer }));
    for (const hd of headsList) {
      const c = cells.get(`${layer}:${hd}`) || { value: null, label: null };
      const r = byKey.get(`${layer}:${hd}`);
      const isNum = typeof c.value === "number";
      const t = isNum ? (vmax > vmin ? (c.value - vmin) / (vmax - vmin) : 0) : 0;
      const el = h("div", {
        class: "cell" + (topKeys.has(`${layer}:${hd}`) ? " top" : "") + (inSel(r) ? "" : " dim"),
        "data-layer": layer, "data-head": hd, "data-value": c.value === null ? "" : String(c.value),
        "data-selected": inSel(r) ? "1" : "0",
        title: `layer ${layer} head ${hd}: ${score} ${fmt(c.value, 4)} (${c.label || "no label"})`,
        onclick: () => { location.hash = href("head", { store: st.store, layer, head: hd }); },
      }, score === "label" ? (c.value || "").slice(0, 4) : isNum ? (Math.abs(c.value) < 100 ? c.value.toFixed(2) : c.value.toPrecision(3)) : "–");
      el.style.background = isNum ? lutColour(t) : labelColour(c.value);
      el.style.color = isNum ? textColour(t) : "#111";
      gridEl.append(el);
    }
  }

  const summary = h("p", {},
    score === "label"
      ? `Label of each of the ${grid.cells.length} heads (thresholds in attnstore.labels).`
      : `${agg === "mean" ? "Count-weighted corpus mean" : agg} of ${score} per head over ${st.docs} documents; ` +
        `across heads: mean ${fmt(mean)}, range ${fmt(vmin)}…${fmt(vmax)}` +
        (ranked.length ? `; highest layer ${ranked[0].layer} head ${ranked[0].head} (${fmt(ranked[0].value)}).` : "."));
  const legend = score === "label"
    ? h("div", { class: "legend" }, ...Object.keys(LABEL_COLOURS).map((l) => {
      const s = h("span", { class: "swatch" }); s.style.background = labelColour(l);
      return h("span", {}, s, l);
    }))
    : h("div", { class: "legend" }, h("span", { text: fmt(vmin) }), legendCanvas(), h("span", { text: fmt(vmax) }),
      h("span", { text: `${score}, ${agg === "mean" ? "corpus mean" : agg}, linear colour scale` }));

  // scatter of two scores: drag a rectangle to filter the grid, double-click to clear
  const scatterBox = h("div", { class: "panel" },
    h("div", { class: "controls" },
      select("x", st.scores, xs, (v) => setParams({ x: v, sel: null })),
      select("y", st.scores, ys, (v) => setParams({ y: v, sel: null })),
      sel ? h("button", { onclick: () => setParams({ sel: null }) }, "clear selection") : null),
    scatter(heads.rows, xs, ys, sel, (r) => topKeys.has(`${r.layer}:${r.head}`)),
    h("p", { class: "muted", text: sel ? `${heads.rows.filter(inSel).length} heads selected` : "Drag to select heads; the grid shows only those." }));

  mount(
    h("h1", {}, `Heads of ${st.model}`),
    controls, summary, legend,
    h("div", { class: "row" }, h("div", { class: "panel" }, gridEl), scatterBox));
}

function scatter(rows, xs, ys, sel, isTop) {
  const W = 380, H = 340, pad = 40;
  const canvas = h("canvas", { width: W, height: H, id: "scatter" });
  const pts = rows.filter((r) => typeof r[xs] === "number" && typeof r[ys] === "number");
  const ext = (k) => {
    const v = pts.map((r) => r[k]); let lo = Math.min(...v), hi = Math.max(...v);
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi === lo) { hi = lo + 1; }
    return [lo, hi];
  };
  const [x0, x1] = ext(xs), [y0, y1] = ext(ys);
  const px = (v) => pad + ((v - x0) / (x1 - x0)) * (W - pad - 10);
  const py = (v) => H - pad - ((v - y0) / (y1 - y0)) * (H - pad - 10);
  const dx = (p) => x0 + ((p - pad) / (W - pad - 10)) * (x1 - x0);
  const dy = (p) => y0 + ((H - pad - p) / (H - pad - 10)) * (y1 - y0);
  const ctx = canvas.getContext("2d");
  function draw(box) {
    ctx.clearRect(0, 0, W, H);
    ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(pad, 10); ctx.lineTo(pad, H - pad); ctx.lineTo(W - 10, H - pad); ctx.stroke();
    ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
    ctx.fillText(fmt(x0, 2), pad, H - pad + 14); ctx.fillText(fmt(x1, 2), W - 40, H - pad + 14);
    ctx.fillText(xs, W / 2 - 20, H - 8);
    ctx.save(); ctx.translate(12, H / 2 + 20); ctx.rotate(-Math.PI / 2); ctx.fillText(ys, 0, 0); ctx.restore();
    ctx.fillText(fmt(y0, 2), 2, H - pad); ctx.fillText(fmt(y1, 2), 2, 18);
    for (const r of pts) {
      const inside = !sel || (r[xs] >= sel[0] && r[xs] <= sel[1] && r[ys] >= sel[2] && r[ys] <= sel[3]);
      ctx.fillStyle = inside ? (isTop(r) ? "#e8590c" : "#2463c7") : "#ccd";
      ctx.beginPath(); ctx.arc(px(r[xs]), py(r[ys]), 3.5, 0, 2 * Math.PI); ctx.fill();
    }
    const b = box || (sel && [px(sel[0]), py(sel[3]), px(sel[1]), py(sel[2])]);
    if (b) { ctx.strokeStyle = "#e8590c"; ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]); }
  }
  draw();
  let start = null;
  const pos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  canvas.addEventListener("mousedown", (e) => { start = pos(e); });
  canvas.addEventListener("mousemove", (e) => {
    if (start) { const p = pos(e); draw([Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])]); return; }
    const [mx, my] = pos(e);
    let best = null, bd = 64;
    for (const r of pts) { const d = (px(r[xs]) - mx) ** 2 + (py(r[ys]) - my) ** 2; if (d < bd) { bd = d; best = r; } }
    if (best) showTooltip(e, `layer ${best.layer} head ${best.head}: ${xs} ${fmt(best[xs])}, ${ys} ${fmt(best[ys])}`);
    else hideTooltip();
  });
  canvas.addEventListener("mouseleave", hideTooltip);
  canvas.addEventListener("mouseup", (e) => {
    if (!start) return;
    const p = pos(e), s = start; start = null;
    if (Math.abs(p[0] - s[0]) < 3 && Math.abs(p[1] - s[1]) < 3) return;
    const v = [dx(Math.min(s[0], p[0])), dx(Math.max(s[0], p[0])), dy(Math.max(s[1], p[1])), dy(Math.min(s[1], p[1]))];
    setParams({ sel: v.map((x) => x.toPrecision(6)).join(",") });
  });
  canvas.addEventListener("dblclick", () => setParams({ sel: null }));
  return h("div", { class: "scatter-wrap" }, canvas);
}

function showTooltip(e, text) {
  $tooltip.textContent = text; $tooltip.hidden = false;
  $tooltip.style.left = `${e.clientX + 14}px`; $tooltip.style.top = `${e.clientY + 12}px`;
}
function hideTooltip() { $tooltip.hidden = true; }

// ---------------------------------------------------------------- head page
async function headPage(params, token) {
  const st = storeMeta(params.store);
  const layer = Number(params.layer), head = Number(params.head);
  const d = await api("head", { store: st.store, layer: params.layer, head: params.head, by: params.by });
  if (token !== renderToken) return;
  const docLink = (r) => h("a", { href: href("doc", { store: st.store, doc: r.doc_id, layer, head }) }, `doc ${r.doc_id}`);
  const docRow = (r, extra = []) => h("tr", {}, ...extra, h("td", {}, docLink(r)), h("td", { class: "num", text: fmt(r.value, 4) }),
    h("td", { class: "num", text: r.n_tokens }), h("td", { class: "text", text: r.text, title: r.text }));
  const li = st.layers.indexOf(layer), hi = st.heads.indexOf(head);
  const nav = (l, hh) => (l === undefined || hh === undefined ? null : href("head", { ...params, layer: l, head: hh }));
  const prev = hi > 0 ? nav(layer, st.heads[hi - 1]) : li > 0 ? nav(st.layers[li - 1], st.heads.at(-1)) : null;
  const next = hi < st.heads.length - 1 ? nav(layer, st.heads[hi + 1]) : li < st.layers.length - 1 ? nav(st.layers[li + 1], st.heads[0]) : null;

  const scores = h("table", { id: "head-scores" },
    h("tr", {}, h("th", { text: "score" }), h("th", { text: "corpus mean" }), h("th", { text: "rank" }), h("th")),
    d.scores.map((s) => h("tr", { "data-score": s.score, "data-value": s.value === null ? "" : String(s.value), "data-rank": s.rank },
      h("td", {}, h("a", { href: href("head", { ...params, by: s.score }) }, s.score)),
      h("td", { class: "num", text: fmt(s.value, 4) }),
      h("td", { class: "num", text: `rank ${s.rank} of ${s.of}` }),
      h("td", {}, (() => { const b = h("span", { class: "bar" }); b.style.width = `${Math.round(100 * (s.of - s.rank + 1) / s.of)}px`; return b; })()))));

  const deciles = [];
  let last = null;
  for (const r of d.deciles) {
    if (r.decile !== last) { deciles.push(h("tr", {}, h("th", { colspan: 4, text: `decile ${r.decile} of 10` }))); last = r.decile; }
    deciles.push(docRow(r));
  }
  const firstDoc = d.top[0];
  mount(
    h("p", { class: "muted" }, h("a", { href: href("overview", { store: st.store }) }, "← overview"), " · ",
      prev ? h("a", { href: prev }, "previous head") : "previous head", " · ",
      next ? h("a", { href: next }, "next head") : "next head"),
    h("h1", { id: "head-title", "data-layer": layer, "data-head": head },
      `Layer ${layer} head ${head} `, h("span", { class: "muted" }, `— ${d.label} · ${d.n_docs} documents`)),
    h("div", { class: "row" },
      h("div", { class: "panel" }, h("h2", { text: "Scores (corpus means, rank among all heads)" }), scores),
      h("div", { class: "panel" },
        h("h2", {}, `Top documents by ${d.by}`),
        h("div", { class: "controls" }, select("by", st.scores, d.by, (v) => setParams({ by: v }))),
        h("table", { id: "top-docs" }, h("tr", {}, h("th", { text: "doc" }), h("th", { text: d.by }), h("th", { text: "tokens" }), h("th", { text: "text" })),
          d.top.map((r) => docRow(r))),
        firstDoc ? h("p", {}, h("a", { href: href("compare", { store: st.store, doc: firstDoc.doc_id, heads: `${st.store}:${layer}:${head}` }) }, "compare this head with others on its top document")) : null)),
    h("h2", {}, `Documents from each decile of ${d.by}`),
    h("table", { id: "deciles" }, deciles),
    d.syntax.length ? h("div", {}, h("h2", { text: "Syntactic relations (accuracy vs. the best fixed-offset baseline)" }),
      h("table", { id: "syntax" }, h("tr", {}, ...["relation", "direction", "n", "accuracy", "baseline", "gain"].map((c) => h("th", { text: c }))),
        d.syntax.map((r) => h("tr", {}, h("td", { text: r.relation }), h("td", { text: r.direction }), h("td", { class: "num", text: r.n }),
          h("td", { class: "num", text: fmt(r.accuracy) }), h("td", { class: "num", text: fmt(r.baseline) }), h("td", { class: "num", text: fmt(r.gain) }))))) : null,
    d.semantic.length ? h("div", {}, h("h2", { text: "Semantic probes (span probes: accuracy vs. the probe baseline)" }),
      h("table", { id: "semantic" }, h("tr", {}, ...Object.keys(d.semantic[0]).map((c) => h("th", { text: c }))),
        d.semantic.map((r) => h("tr", {}, ...Object.values(r).map((v) => h("td", { class: typeof v === "number" ? "num" : "", text: fmt(v) })))))) : null);
}

// ---------------------------------------------------------------- heatmap
// One head of one document on a canvas, one pixel per (pooled) cell. Long documents come as
// server-side max-pooled 256² tiles at the smallest power-of-two pooling that fits MAX_SIDE.
class Heatmap {
  // maxPx: the largest on-screen side. The pooling keeps at least one screen pixel per cell, and
  // the cells are drawn an integer number of pixels wide, so a one-cell diagonal never vanishes.
  constructor({ store, doc, layer, head, n, scale, sink, maxPx }) {
    Object.assign(this, { store, doc, layer, head, n, scale, sink });
    const limit = Math.min(maxPx, META.max_side);
    this.pool = 1;
    while (Math.ceil(n / this.pool) > limit) this.pool *= 2;
    this.side = Math.ceil(n / this.pool);
    const size = this.side * Math.max(1, Math.floor(maxPx / this.side));
    this.canvas = h("canvas", { class: "main", width: this.side, height: this.side,
      "data-pool": this.pool, "data-layer": layer, "data-head": head, "data-store": store });
    this.overlay = h("canvas", { class: "overlay", width: size, height: size });
    this.el = h("div", { class: "heatmap" }, this.canvas, this.overlay);
    this.el.style.setProperty("--size", `${size}px`);
    this.listeners = [];
    this.canvas.addEventListener("mousemove", (e) => {
      const r = this.canvas.getBoundingClientRect();
      const i = Math.floor(((e.clientY - r.top) / r.height) * this.side);
      const j = Math.floor(((e.clientX - r.left) / r.width) * this.side);
      if (i < 0 || j < 0 || i >= this.side || j >= this.side) return;
      const cell = { q: i * this.pool, k: j * this.pool };
      this.listeners.forEach((f) => f(cell, e));
    });
    this.canvas.addEventListener("mouseleave", () => this.listeners.forEach((f) => f(null)));
    // pooled cells: a click zooms down to the exact cells around it (zoomInto)
    this.canvas.addEventListener("click", (e) => {
      const r = this.canvas.getBoundingClientRect();
      const i = Math.floor(((e.clientY - r.top) / r.height) * this.side);
      const j = Math.floor(((e.clientX - r.left) / r.width) * this.side);
      if (this.onzoom && i >= 0 && j >= 0 && i < this.side && j < this.side) this.onzoom({ q: i * this.pool, k: j * this.pool });
    });
  }

  async load() {
    const T = META.tile, nt = Math.ceil(this.side / T);
    this.data = new Float32Array(this.side * this.side);
    let done = false;
    // A long document with a stored overview: its first picture comes from the overview (one small
    // read), then the exact tiles (partial reads of their rows) replace it.
    if (storeMeta(this.store).overview && nt > 1) {
      overviewImage({ store: this.store, doc: this.doc, layer: this.layer, head: this.head, kind: "max" })
        .then((ov) => { if (ov && !done) this.preview(ov); });
    }
    const jobs = [];
    for (let ty = 0; ty < nt; ty++) {
      // tiles above the diagonal are all zero (causal); an encoder's (bidirectional) are not
      const full = META.stores[Number(this.store) || 0]?.attention === "bidirectional";
      for (let tx = 0; tx <= (full ? nt - 1 : ty); tx++) {
        jobs.push(tile({ store: this.store, doc: this.doc, layer: this.layer, head: this.head, pool: this.pool, ty, tx })
          .then((t) => {
            for (let i = 0; i < t.rows; i++) this.data.set(t.data.subarray(i * t.cols, (i + 1) * t.cols), (ty * T + i) * this.side + tx * T);
          }));
      }
    }
    await Promise.all(jobs);
    done = true;
    this.draw();
  }

  // Draw an overview (cells of ov.block tokens) at this heatmap's pooling: each cell the maximum
  // of the overview cells it covers (an upper bound of the exact pooled value).
  preview(ov) {
    const n = this.side, m = ov.rows, p = this.pool, b = ov.block;
    const data = new Float32Array(n * n);
    for (let i = 0; i < n; i++) {
      const r0 = Math.min(m - 1, Math.floor((i * p) / b)), r1 = Math.min(m, Math.max(r0 + 1, Math.ceil(((i + 1) * p) / b)));
      for (let j = 0; j <= i; j++) {
        const c0 = Math.min(m - 1, Math.floor((j * p) / b)), c1 = Math.min(m, Math.max(c0 + 1, Math.ceil(((j + 1) * p) / b)));
        let v = 0;
        for (let r = r0; r < r1; r++) for (let c = c0; c < c1; c++) v = Math.max(v, ov.data[r * m + c]);
        data[i * n + j] = v;
      }
    }
    const exact = this.data;
    this.data = data;
    this.draw(false);
    this.data = exact;
    this.canvas.dataset.overview = String(b);
  }

  value(q, k) {
    const i = Math.floor(q / this.pool), j = Math.floor(k / this.pool);
    if (i >= this.side || j >= this.side) return null;
    return this.data[i * this.side + j];
  }

  draw(final = true) {
    const n = this.side, d = this.data;
    let vmax = 0;
    for (let i = 0; i < n; i++) for (let j = this.sink ? 1 : 0; j <= i; j++) if (d[i * n + j] > vmax) vmax = d[i * n + j];
    if (vmax === 0 && this.sink) for (let i = 0; i < n; i++) vmax = Math.max(vmax, d[i * n]);
    this.vmax = vmax;
    const ctx = this.canvas.getContext("2d");
    const img = ctx.createImageData(n, n);
    const px = img.data;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        const o = (i * n + j) * 4;
        if (j > i) { px[o] = 12; px[o + 1] = 12; px[o + 2] = 12; px[o + 3] = 255; continue; }
        const c = Math.round(scaled(d[i * n + j], vmax, this.scale) * 255) * 3;
        px[o] = LUT[c]; px[o + 1] = LUT[c + 1]; px[o + 2] = LUT[c + 2]; px[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    this.canvas.dataset.vmax = String(vmax);
    if (final) this.canvas.dataset.ready = "1";
  }

  crosshair(cell) {
    const o = this.overlay, ctx = o.getContext("2d");
    ctx.clearRect(0, 0, o.width, o.height);
    if (!cell) return;
    const s = o.width / this.side;
    const i = Math.floor(cell.q / this.pool), j = Math.floor(cell.k / this.pool);
    ctx.strokeStyle = "rgba(255,255,255,.8)"; ctx.lineWidth = 1;
    ctx.strokeRect(j * s - 2, i * s - 2, s + 4, s + 4);
    ctx.strokeStyle = "rgba(255,80,40,.6)";
    ctx.beginPath(); ctx.moveTo(0, (i + 0.5) * s); ctx.lineTo((j - 1) * s, (i + 0.5) * s); ctx.moveTo((j + 0.5) * s, (i + 2) * s); ctx.lineTo((j + 0.5) * s, o.height); ctx.stroke();
  }
}

// The exact cells (pool 1: a partial read of 256 query rows) of the 256 × 256 block holding
// `cell`, drawn one pixel per cell into `box`.
async function zoomInto(hm, cell, box) {
  const T = META.tile, ty = Math.floor(cell.q / T), tx = Math.min(ty, Math.floor(cell.k / T));
  const t = await tile({ store: hm.store, doc: hm.doc, layer: hm.layer, head: hm.head, pool: 1, ty, tx });
  const q0 = ty * T, k0 = tx * T;
  const c = h("canvas", { class: "zoom", width: t.cols, height: t.rows, "data-q0": q0, "data-k0": k0 });
  let vmax = 0;
  for (let i = 0; i < t.rows; i++) for (let j = hm.sink && k0 === 0 ? 1 : 0; j < t.cols; j++) vmax = Math.max(vmax, t.data[i * t.cols + j]);
  const ctx = c.getContext("2d"), img = ctx.createImageData(t.cols, t.rows), px = img.data;
  for (let i = 0; i < t.rows; i++) {
    for (let j = 0; j < t.cols; j++) {
      const o = (i * t.cols + j) * 4;
      if (k0 + j > q0 + i) { px[o] = 12; px[o + 1] = 12; px[o + 2] = 12; px[o + 3] = 255; continue; }
      const v = Math.round(scaled(t.data[i * t.cols + j], vmax, hm.scale) * 255) * 3;
      px[o] = LUT[v]; px[o + 1] = LUT[v + 1]; px[o + 2] = LUT[v + 2]; px[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  c.addEventListener("mousemove", (e) => {
    const r = c.getBoundingClientRect();
    const i = Math.floor(((e.clientY - r.top) / r.height) * t.rows), j = Math.floor(((e.clientX - r.left) / r.width) * t.cols);
    if (i < 0 || j < 0 || i >= t.rows || j >= t.cols) return;
    c.title = `q ${q0 + i} → k ${k0 + j}: ${t.data[i * t.cols + j].toPrecision(6)} (exact)`;
  });
  c.dataset.ready = "1";
  box.replaceChildren(h("p", { class: "muted" }, `Exact cells: queries ${q0}…${q0 + t.rows - 1}, keys ${k0}…${k0 + t.cols - 1}.`), c);
}

function tokenText(tokens, i) {
  const t = tokens[i];
  return t === undefined ? "?" : t.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r");
}

function colourControls(params) {
  return [
    select("scale", Object.keys(SCALES), params.scale || "sqrt", (v) => setParams({ scale: v }), SCALES),
    h("label", {}, h("input", { type: "checkbox", name: "sink", checked: params.sink === "1",
      onchange: (e) => setParams({ sink: e.target.checked ? "1" : null }) }), "exclude the sink (key 0) from the colour maximum"),
  ];
}

function legend(hm, scale) {
  return h("div", { class: "legend" }, h("span", { text: "0" }), legendCanvas(), h("span", { class: "vmax" }, fmt(hm.vmax, 4)),
    h("span", { text: `${SCALES[scale]} scale${hm.sink ? ", sink excluded from the maximum" : ""}${hm.pool > 1 ? `; ${hm.pool}×${hm.pool} max-pooled cells` : ""}` }));
}

// ---------------------------------------------------------------- document × head
async function docPage(params, token) {
  const st = storeMeta(params.store);
  const layer = params.layer ?? st.layers[0], head = params.head ?? st.heads[0];
  const scale = params.scale || "sqrt", sink = params.sink === "1";
  const doc = await api("doc", { store: st.store, doc: params.doc });
  if (token !== renderToken) return;
  const hm = new Heatmap({ store: st.store, doc: doc.doc_id, layer, head, n: doc.n_tokens, scale, sink, maxPx: 640 });
  const hover = h("div", { class: "hover", id: "hover" }, `Hover the heatmap for (query, key, value)${hm.pool > 1 ? "; click it to zoom down to exact cells" : ""}; hover a token below for where it attends.`);
  const strip = h("div", { class: "strip", id: "strip" },
    doc.tokens.map((t, i) => h("span", { class: "tok", "data-pos": i, title: `position ${i}` }, tokenText(doc.tokens, i))));
  const controls = h("div", { class: "controls" },
    storeSelect(params),
    h("label", {}, "doc", h("input", { type: "number", name: "doc", value: doc.doc_id, min: 0, onchange: (e) => setParams({ doc: e.target.value }) })),
    select("layer", st.layers, layer, (v) => setParams({ layer: v })),
    select("head", st.heads, head, (v) => setParams({ head: v })),
    ...colourControls(params),
    h("a", { href: href("head", { store: st.store, layer, head }) }, "head page"),
    h("a", { href: href("compare", { store: st.store, doc: doc.doc_id, heads: `${st.store}:${layer}:${head}`, scale, sink: params.sink }) }, "compare"));
  const legendBox = h("div");
  const zoomBox = h("div", { class: "zoombox", id: "zoom" });
  if (hm.pool > 1) hm.onzoom = (cell) => zoomInto(hm, cell, zoomBox);
  mount(
    h("h1", {}, `Document ${doc.doc_id} · layer ${layer} head ${head} `,
      h("span", { class: "muted" }, `— ${doc.n_tokens} tokens${doc.truncated ? " (truncated)" : ""}`)),
    controls,
    h("div", { class: "row" }, h("div", {}, hm.el, legendBox, hover, zoomBox),
      h("div", { class: "panel tokens-panel" }, h("h2", { text: "Tokens" }),
        h("p", { class: "muted" }, "Hover a token: orange = what it attends to, blue underline = what attends to it."), strip)));
  await hm.load();
  if (token !== renderToken) return;
  legendBox.replaceChildren(legend(hm, scale));
  const toks = strip.children;
  let focused = null;
  hm.listeners.push((cell) => {
    hm.crosshair(cell);
    if (focused) focused.classList.remove("focus");
    if (!cell) return;
    const v = hm.value(cell.q, cell.k);
    const p = hm.pool;
    hover.dataset.q = cell.q; hover.dataset.k = cell.k; hover.dataset.value = String(v); hover.dataset.pool = p;
    hover.textContent = p === 1
      ? `query ${cell.q} "${tokenText(doc.tokens, cell.q)}" → key ${cell.k} "${tokenText(doc.tokens, cell.k)}": ${cell.k > cell.q && META.stores[Number(hm.store) || 0]?.attention !== "bidirectional" ? "masked (causal)" : v.toPrecision(6)}`
      : `queries ${cell.q}…${Math.min(cell.q + p, doc.n_tokens) - 1} → keys ${cell.k}…${Math.min(cell.k + p, doc.n_tokens) - 1}: max ${v.toPrecision(6)} over this ${p}×${p} block`;
    focused = toks[cell.q];
    if (focused) focused.classList.add("focus");
  });
  // token strip: outgoing (row) and incoming (column) attention of the hovered token
  let pending = 0;
  strip.addEventListener("mouseover", async (e) => {
    const el = e.target.closest(".tok"); if (!el) return;
    const i = Number(el.dataset.pos), mine = ++pending;
    const base = { store: st.store, doc: doc.doc_id, layer, head };
    const [row, col] = await Promise.all([api("row", { ...base, q: i }), api("col", { ...base, k: i })]);
    if (mine !== pending) return;
    const rmax = Math.max(...row.values.slice(sink && i > 0 ? 1 : 0)) || 1;
    const cmax = Math.max(...col.values.slice(sink && i === 0 ? 1 : 0)) || 1;
    for (let j = 0; j < toks.length; j++) {
      const out = j <= i ? row.values[j] : 0, inc = j >= i ? col.values[j - i] : 0;
      toks[j].style.background = out > 0 ? `rgba(232, 89, 12, ${scaled(out, rmax, scale).toFixed(3)})` : "";
      toks[j].style.borderBottomColor = inc > 0 && j !== i ? `rgba(36, 99, 199, ${scaled(inc, cmax, scale).toFixed(3)})` : "transparent";
    }
    hover.textContent = `token ${i} "${tokenText(doc.tokens, i)}": attends most to ${row.values.indexOf(Math.max(...row.values))} ` +
      `(${fmt(Math.max(...row.values), 4)}); attended most by ${i + col.values.indexOf(Math.max(...col.values))}.`;
  });
}

// ---------------------------------------------------------------- compare
async function comparePage(params, token) {
  const specs = (params.heads || "").split(",").filter(Boolean).map((s) => s.split(":").map(Number));
  const docId = params.doc ?? 0;
  const scale = params.scale || "sqrt", sink = params.sink === "1";
  const input = h("input", { name: "heads", size: 34, value: params.heads || "", placeholder: "store:layer:head, … e.g. 0:0:1,0:1:2" });
  const controls = h("div", { class: "controls" },
    h("label", {}, "doc", h("input", { type: "number", name: "doc", min: 0, value: docId, onchange: (e) => setParams({ doc: e.target.value }) })),
    h("label", {}, "heads", input),
    h("button", { class: "primary", onclick: () => setParams({ heads: input.value.replace(/\s+/g, "") }) }, "show"),
    ...colourControls(params));
  mount(h("h1", { text: `Compare heads on document ${docId}` }), controls,
    h("p", { class: "muted" }, "Two to four heads, from one store or several (store:layer:head). Hover one map: the same cell is marked on all."));
  if (specs.length === 0) return;
  if (specs.length > 4 || specs.some((s) => s.length !== 3 || s.some((x) => !Number.isInteger(x)))) {
    showError($app, new ApiError(`Expected 1 to 4 heads as store:layer:head separated by commas. Got ${JSON.stringify(params.heads)}.`));
    return;
  }
  // Documents of other stores are paired with the first store's by text, not by number: "doc 3"
  // of two stores is only the same document when both hold the same texts in the same order.
  const ref = specs[0][0], refName = storeMeta(ref).name;
  const others = [...new Set(specs.map((s) => s[0]))].filter((s) => s !== ref);
  const pairs = await Promise.all(others.map((s) => api("pair", { store: s, from: ref, doc: docId })));
  if (token !== renderToken) return;
  const docIdOf = new Map([[ref, Number(docId)]]);
  const notes = [], warnings = [];
  for (const p of pairs) {
    const name = storeMeta(p.store).name;
    if (p.doc_id !== null) {
      docIdOf.set(p.store, p.doc_id);
      if (p.how === "text") notes.push(`doc ${docId} of ${refName} is doc ${p.doc_id} of ${name} (the same text)`);
    } else if (p.same_number) {
      docIdOf.set(p.store, Number(docId));
      warnings.push(`Different texts: doc ${docId} of ${refName} and doc ${docId} of ${name} are different documents, and ${name} holds no document with the same text. The maps below show different texts; hover pairs positions only.`);
    } else {
      throw new ApiError(`${name} has no document ${docId} and none with the text of doc ${docId} of ${refName}.`);
    }
  }
  const docs = await Promise.all([...docIdOf].map(([s, d]) => api("doc", { store: s, doc: d })));
  if (token !== renderToken) return;
  const docOf = new Map(docs.map((d) => [d.store, d]));
  const refDoc = docOf.get(ref);
  for (const d of docs) {
    if (d.store === ref || d.text !== refDoc.text) continue;
    if (d.n_tokens !== refDoc.n_tokens || d.tokens.some((t, i) => t !== refDoc.tokens[i])) {
      warnings.push(`Same text, tokenized differently: ${refName} has ${refDoc.n_tokens} tokens, ${storeMeta(d.store).name} ${d.n_tokens}; position q in one map need not be the same token in the other.`);
    }
  }
  $app.append(h("p", { class: "muted", id: "compare-pairing", "data-docs": JSON.stringify(Object.fromEntries(docIdOf)) },
    others.length === 0 ? `Document ${docId}.` : notes.length ? `Paired by text: ${notes.join("; ")}.` : `Document ${docId} of every store.`));
  if (warnings.length) $app.append(h("p", { class: "warning", id: "compare-warning", role: "status" }, warnings.join(" ")));
  const maxPx = specs.length <= 2 ? 520 : 380;
  const maps = specs.map(([s, l, hd]) => {
    const d = docOf.get(s);
    const hm = new Heatmap({ store: s, doc: d.doc_id, layer: l, head: hd, n: d.n_tokens, scale, sink, maxPx });
    hm.caption = h("div", { class: "hover" });
    hm.legendBox = h("div");
    hm.tokens = d.tokens;
    return hm;
  });
  const panels = h("div", { class: "panels", id: "compare" }, maps.map((hm) => h("div", { class: "panel" },
    h("h3", {}, h("a", { href: href("head", { store: hm.store, layer: hm.layer, head: hm.head }) },
      `${META.stores.length > 1 ? storeMeta(hm.store).name + " · " : ""}${others.length ? `doc ${hm.doc} · ` : ""}layer ${hm.layer} head ${hm.head}`)),
    hm.el, hm.legendBox, hm.caption)));
  $app.append(panels);
  await Promise.all(maps.map((m) => m.load()));
  if (token !== renderToken) return;
  const sync = (cell) => {
    for (const m of maps) {
      m.crosshair(cell);
      if (!cell) continue;
      const v = m.value(cell.q, cell.k);
      m.caption.dataset.value = String(v);
      m.caption.textContent = v === null ? "outside this document"
        : `q ${cell.q} "${tokenText(m.tokens, cell.q)}" → k ${cell.k} "${tokenText(m.tokens, cell.k)}": ${m.pool > 1 ? "block max " : ""}${v.toPrecision(6)}`;
    }
  };
  for (const m of maps) { m.listeners.push(sync); m.legendBox.replaceChildren(legend(m, scale)); }
}

// ---------------------------------------------------------------- SQL console
const EXAMPLES = [
  "SELECT layer, head, label, prev_token, sink FROM head_summary ORDER BY prev_token DESC LIMIT 10",
  "SELECT doc_id, layer, head, induction FROM heads WHERE induction IS NOT NULL ORDER BY induction DESC LIMIT 20",
  "SELECT doc_id, n_tokens, left(text, 80) AS text FROM docs ORDER BY n_tokens DESC LIMIT 20",
];

async function sqlPage(params, token) {
  const st = storeMeta(params.store);
  const q = params.q || "";
  const area = h("textarea", { id: "sql-input", spellcheck: "false" }, q || EXAMPLES[0]);
  const run = () => setParams({ q: area.value.trim(), run: String(Date.now() % 100000) });
  area.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  const out = h("div", { id: "sql-out" });
  mount(
    h("h1", { text: "SQL" }),
    h("p", { class: "muted" }, `Read-only SELECT over the views docs, tokens, heads, head_summary, syntax_heads; at most ${META.row_cap} rows, ${META.time_limit_s} s. Rows with doc_id/layer/head link to their pages. Ctrl-Enter runs.`),
    h("div", { class: "controls" }, storeSelect(params)),
    area,
    h("div", { class: "controls" }, h("button", { class: "primary", id: "sql-run", onclick: run }, "Run"),
      ...EXAMPLES.map((e, i) => h("a", { href: href("sql", { store: params.store, q: e }) }, `example ${i + 1}`))),
    out);
  if (!q) return;
  try {
    const r = await api("sql", { store: st.store, q });
    if (token !== renderToken) return;
    const cols = r.columns;
    const link = (row) => {
      const has = (c) => cols.includes(c) && row[c] !== null;
      if (has("doc_id") && has("layer") && has("head")) return href("doc", { store: st.store, doc: row.doc_id, layer: row.layer, head: row.head });
      if (has("layer") && has("head")) return href("head", { store: st.store, layer: row.layer, head: row.head });
      if (has("doc_id")) return href("doc", { store: st.store, doc: row.doc_id });
      return null;
    };
    out.replaceChildren(
      h("p", { class: "muted", id: "sql-status" }, `${r.rows.length} row${r.rows.length === 1 ? "" : "s"} in ${r.elapsed_ms} ms${r.truncated ? ` (truncated at ${r.row_cap})` : ""}`),
      h("div", { class: "results" }, h("table", { id: "sql-results" },
        h("tr", {}, h("th"), cols.map((c) => h("th", { text: c }))),
        r.rows.map((row) => {
          const to = link(row);
          return h("tr", {}, h("td", {}, to ? h("a", { href: to, class: "row-link" }, "open") : ""),
            cols.map((c) => h("td", { class: typeof row[c] === "number" ? "num" : "", text: typeof row[c] === "object" && row[c] !== null ? JSON.stringify(row[c]) : fmt(row[c], 6) })));
        }))));
  } catch (err) {
    if (token !== renderToken) return;
    out.replaceChildren(h("p", { class: "error", id: "sql-error", role: "alert", text: err.message }));
  }
}

// ---------------------------------------------------------------- router
const PAGES = { overview, head: headPage, doc: docPage, compare: comparePage, sql: sqlPage };

async function render() {
  const token = ++renderToken;
  const { page, params } = route();
  hideTooltip();
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  document.body.dataset.page = page;
  document.body.dataset.ready = "0";
  try {
    if (!META) {
      META = await api("meta");
      const s = META.stores;
      document.getElementById("store-info").textContent =
        s.map((x) => `${x.name}: ${x.model}, ${x.layers.length} layers × ${x.heads.length} heads, ${x.docs} docs`).join(" | ");
    }
    const fn = PAGES[page];
    if (!fn) throw new ApiError(`No page ${JSON.stringify(page)}. Pages: ${Object.keys(PAGES).join(", ")}.`);
    await fn(params, token);
  } catch (err) {
    if (token !== renderToken) return;
    if (!(err instanceof ApiError)) throw err;
    mount(h("h1", { text: "Cannot show this view" }));
    showError($app, err);
  } finally {
    if (token === renderToken) document.body.dataset.ready = "1";
  }
}

window.addEventListener("hashchange", render);
render();
