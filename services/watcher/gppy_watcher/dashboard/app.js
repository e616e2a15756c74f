// The gppy dashboard: polls GET /overview and redraws in place (no reload, nothing fetched
// from elsewhere). Every value from the server is put into the page as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"];
const SVG_NS = "http://www.w3.org/2000/svg";
// The watcher's root, relative to this page (/dashboard/): works behind a proxy's sub-path too.
const ROOT = new URL("..", window.location.href);
const api = (path) => new URL(path.replace(/^\//, ""), ROOT).href;
const state = { selected: null, polls: 0, filterColours: {} };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function fmt(v, digits) {
  return (v === null || v === undefined) ? "–" : Number(v).toFixed(digits);
}

function colourOf(filter) {
  if (!(filter in state.filterColours)) {
    const n = Object.keys(state.filterColours).length;
    state.filterColours[filter] = PALETTE[n % PALETTE.length];
  }
  return state.filterColours[filter];
}

// ---------------------------------------------------------------- nights in progress
function stageRow(night, s) {
  const known = s.total !== null && s.total !== undefined && s.total > 0;
  const bar = el("div", { class: known ? "bar" : "bar unknown", role: "progressbar",
                          "data-stage": s.stage, "data-done": s.done, "data-failed": s.failed,
                          "data-total": known ? s.total : "", "aria-valuenow": s.done,
                          "aria-valuemax": known ? s.total : "" });
  if (known) {
    bar.append(el("div", { class: "done", style: `width:${(100 * s.done / s.total).toFixed(2)}%` }));
    bar.append(el("div", { class: "failed", style: `width:${(100 * s.failed / s.total).toFixed(2)}%` }));
  }
  const text = known ? `${s.done}/${s.total}` + (s.failed ? ` (${s.failed} failed)` : "")
                     : (s.done || s.failed ? `${s.done}` + (s.failed ? ` (${s.failed} failed)` : "") : "waiting");
  return el("div", { class: "stage-row", "data-night": night.night_id, "data-stage": s.stage },
            el("span", {}, s.label), bar, el("span", { class: "count" }, text));
}

function renderActive(nights) {
  const box = document.getElementById("active");
  box.replaceChildren();
  if (!nights.length) { box.append(el("p", { class: "muted" }, "None.")); return; }
  for (const n of nights) {
    const card = el("div", { class: "night", "data-night": n.night_id, "data-state": n.state },
      el("span", { class: "title" }, n.night_id),
      el("span", { class: `state ${n.state}` }, n.state),
      el("span", { class: "meta" }, `${n.lane} · attempt ${n.run_attempts} · queued ${fmtTime(n.queued_at)}` +
                                      (n.outstanding !== null && n.outstanding !== undefined ? ` · ${n.outstanding} outstanding` : "")));
    for (const s of n.stages) card.append(stageRow(n, s));
    if (n.last_error) card.append(el("div", { class: "muted" }, "last error: " + n.last_error));
    box.append(card);
  }
}

// ---------------------------------------------------------------- queues
function renderQueues(q) {
  const body = document.querySelector("#queues tbody");
  body.replaceChildren();
  for (const s of q.stages) {
    const lane = (name) => s.lanes[name] ? String(s.lanes[name].pending) : "–";
    body.append(el("tr", { "data-stage": s.stage },
      el("td", {}, s.stage), el("td", { class: "too" }, lane("too")), el("td", { class: "survey" }, lane("survey")),
      el("td", { class: "inprogress" }, String(s.ack_pending)),
      el("td", { class: "workers", title: s.replicas.map(r => r.replica).join(", ") }, String(s.workers))));
  }
}

// ---------------------------------------------------------------- recent nights and failures
function renderRecent(nights) {
  const body = document.querySelector("#recent tbody");
  body.replaceChildren();
  for (const n of nights) {
    const c = (k) => { const s = n.stages.find(x => x.stage === k); return s ? s.done : 0; };
    const link = n.report_url ? el("a", { href: api(n.report_url), target: "_blank", class: "report" }, "report") : "–";
    const name = el("a", { href: "#", "data-night": n.night_id }, n.night_id);
    name.addEventListener("click", (e) => { e.preventDefault(); select(n.night_id); });
    body.append(el("tr", { "data-night": n.night_id },
      el("td", {}, name), el("td", {}, el("span", { class: `state ${n.state}` }, n.state)),
      el("td", {}, String(c("phot_single"))), el("td", {}, String(c("stack"))), el("td", {}, String(c("subtract"))),
      el("td", {}, n.note || ""), el("td", {}, fmtTime(n.finished_at)), el("td", {}, link)));
  }
}

function renderFailures(list) {
  const ul = document.getElementById("failures");
  ul.replaceChildren();
  if (!list.length) { ul.append(el("li", { class: "muted" }, "None.")); return; }
  for (const f of list) {
    const item = f.item ? f.item.split("/").pop() : "";
    ul.append(el("li", { "data-night": f.night_id, "data-stage": f.stage },
      el("span", { class: "muted" }, fmtTime(f.at) + " "), el("span", { class: "stage" }, f.stage), " ",
      el("span", {}, f.night_id), item ? el("code", {}, " " + item) : "",
      (f.count > 1 ? ` ×${f.count}` : ""), el("div", { class: "reason" }, f.reason)));
  }
}

// ---------------------------------------------------------------- QA plots
function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

function drawPlot(id, rows, key, digits) {
  const box = document.getElementById(id);
  box.replaceChildren();
  const W = 360, H = 200, L = 42, R = 8, T = 8, B = 26;
  const pts = rows.filter(r => r[key] !== null && r[key] !== undefined && r.mjd !== null && r.mjd !== undefined);
  box.setAttribute("data-points", String(pts.length));
  if (!pts.length) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }); t.textContent = "no data yet"; box.append(t);
    return;
  }
  const t0 = Math.min(...pts.map(r => r.mjd));
  const xs = pts.map(r => (r.mjd - t0) * 24), ys = pts.map(r => r[key]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 - x0 < 1e-6) { x0 -= 0.1; x1 += 0.1; }
  if (y1 - y0 < 1e-6) { y0 -= 0.1; y1 += 0.1; }
  const py = (y1 - y0) * 0.08; y0 -= py; y1 += py;
  const px = (x1 - x0) * 0.04; x0 -= px; x1 += px;
  const sx = v => L + (v - x0) / (x1 - x0) * (W - L - R);
  const sy = v => H - B - (v - y0) / (y1 - y0) * (H - T - B);
  for (const v of niceTicks(y0, y1, 4)) {
    box.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(v), y2: sy(v) }));
    const t = svg("text", { x: L - 4, y: sy(v) + 3, "text-anchor": "end" }); t.textContent = v.toFixed(digits); box.append(t);
  }
  for (const v of niceTicks(x0, x1, 5)) {
    const t = svg("text", { x: sx(v), y: H - B + 12, "text-anchor": "middle" }); t.textContent = v.toFixed(1); box.append(t);
  }
  const xl = svg("text", { x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle" });
  xl.textContent = `hours since MJD ${t0.toFixed(4)}`; box.append(xl);
  box.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  box.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  pts.forEach((r, i) => {
    const attrs = { cx: sx(xs[i]).toFixed(2), cy: sy(ys[i]).toFixed(2), fill: colourOf(r.filter),
                    class: `pt ${r.kind}`, "data-value": String(r[key]), "data-name": r.name,
                    "data-filter": r.filter, "data-kind": r.kind };
    const shape = r.kind === "stack"
      ? svg("rect", Object.assign({}, attrs, { x: (sx(xs[i]) - 4).toFixed(2), y: (sy(ys[i]) - 4).toFixed(2), width: 8, height: 8 }))
      : svg("circle", Object.assign({}, attrs, { r: 3.2 }));
    const title = svg("title", {}); title.textContent = `${r.name}: ${fmt(r[key], digits)} (${r.filter})`;
    shape.append(title);
    box.append(shape);
  });
}

function renderQa(qa) {
  const rows = qa ? qa.images : [];
  drawPlot("plot-seeing", rows, "seeing", 2);
  drawPlot("plot-zp", rows, "zp", 2);
  drawPlot("plot-depth", rows, "depth", 2);
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const g of (qa ? qa.by_filter : [])) {
    legend.append(el("span", { "data-filter": g.filter, "data-kind": g.kind },
      el("i", { style: `background:${colourOf(g.filter)}` }),
      `${g.filter} ${g.kind}s: ${g.n} · seeing ${fmt(g.seeing, 2)}″ · ZP ${fmt(g.zp, 2)} · depth ${fmt(g.depth, 2)}`));
  }
}

// ---------------------------------------------------------------- candidates
function renderCandidates(c) {
  const box = document.getElementById("candidates");
  const list = c ? c.candidates : [];
  document.getElementById("cand-count").textContent = c ? `(${list.length} of ${c.total})` : "";
  const key = JSON.stringify(list.map(x => [x.catalogue, x.id, x.cutout_urls]));
  if (box.getAttribute("data-key") === key) return;  // unchanged: keep the images loaded
  box.setAttribute("data-key", key);
  box.replaceChildren();
  if (!list.length) { box.append(el("p", { class: "muted" }, "None.")); return; }
  for (const x of list) {
    const imgs = el("div", {});
    for (const tag of ["sci", "ref", "sub"]) {
      const url = x.cutout_urls[tag];
      if (url) imgs.append(el("img", { src: api(url), alt: tag, title: tag, "data-tag": tag, loading: "eager" }));
    }
    box.append(el("div", { class: "cand", "data-id": x.id, "data-catalogue": x.catalogue },
      imgs,
      el("div", {}, el("b", {}, `#${x.id}`), ` ${x.label} · ${x.object} ${x.filter}`),
      el("div", {}, `RA ${fmt(x.ra, 5)} Dec ${fmt(x.dec, 5)}`),
      el("div", {}, `mag ${fmt(x.mag, 2)} ± ${fmt(x.magerr, 2)} · rb ${fmt(x.rb, 2)}`)));
  }
}

// ---------------------------------------------------------------- night selector
function renderSelector(data) {
  const sel = document.getElementById("night-select");
  const ids = [...data.active, ...data.recent].map(n => n.night_id);
  const current = data.current;
  const opts = Array.from(sel.options).map(o => o.value);
  if (JSON.stringify(opts) !== JSON.stringify(ids)) {
    sel.replaceChildren(...ids.map(id => el("option", { value: id }, id)));
  }
  if (current) sel.value = current;
  const n = [...data.active, ...data.recent].find(x => x.night_id === current);
  const st = document.getElementById("current-state");
  st.textContent = n ? n.state : "";
  st.className = "state " + (n ? n.state : "");
}

function select(nightId) {
  state.selected = nightId;
  poll(true);
}

// ---------------------------------------------------------------- polling
let timer = null;
async function poll(now) {
  if (timer) { clearTimeout(timer); timer = null; }
  const conn = document.getElementById("conn");
  try {
    const q = state.selected ? `?night=${encodeURIComponent(state.selected)}` : "";
    const resp = await fetch(api(`overview${q}`), { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    renderActive(data.active);
    renderQueues(data.queues);
    renderRecent(data.recent);
    renderFailures(data.failures);
    renderSelector(data);
    renderQa(data.qa);
    renderCandidates(data.candidates);
    state.polls += 1;
    document.body.setAttribute("data-polls", String(state.polls));
    document.getElementById("updated").textContent = fmtTime(data.at);
    conn.textContent = "live"; conn.setAttribute("data-state", "ok");
  } catch (err) {
    conn.textContent = "disconnected (" + err.message + ")"; conn.setAttribute("data-state", "error");
  }
  timer = setTimeout(poll, POLL_MS);
}

document.getElementById("night-select").addEventListener("change", (e) => select(e.target.value));
poll();
