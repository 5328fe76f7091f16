// spectransfer inspect: the page's logic. Plain JS, no framework, no build step.
"use strict";

(() => {
  // Rest-frame vacuum wavelengths (Angstrom) of the usual quasar emission lines.
  const LINES = [
    ["Lyα", 1215.67], ["N V", 1240.14], ["Si IV", 1399.8], ["C IV", 1549.06], ["C III]", 1908.73],
    ["Mg II", 2798.75], ["Hβ", 4862.68], ["[O III]", 5008.24], ["Hα", 6564.61],
  ];
  const SKY = [5577.3, 5889.95, 6300.3, 6363.8]; // strong night-sky lines, observed frame
  const PAGE = 200;
  const LS_KEY = "spectransfer.inspector";
  const COLORS = {
    flux: "#1f3b73", fluxBad: "#c3c9d4", err: "rgba(91,140,255,0.26)", pipe: "#e0782f", user: "#8a3ffc", pred: "#1b8a5a",
    sky: "rgba(120,130,145,0.18)", grid: "#eef1f5", axis: "#8a94a6", text: "#4a5466",
  };
  const CATEGORY_LABEL = {
    new_candidate: "new candidate", missed_by_model: "missed by model", agree_qso: "agree: quasar", agree_other: "agree: not quasar",
  };
  const VERDICT_LABEL = { qso: "quasar", not_qso: "not a quasar", unsure: "unsure" };

  const TOKEN = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);

  const state = {
    items: [], total: 0, inspected: 0, index: -1, status: "all",
    spec: null, zUser: null, smooth: 5, drag: null, hoverX: null, loadingMore: false,
    cache: new Map(), qualityBits: {},
  };

  // ---- HTTP ----------------------------------------------------------------------------------
  async function api(path, options = {}) {
    const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    if (TOKEN) headers["X-Token"] = TOKEN;
    const res = await fetch(path, Object.assign({}, options, { headers }));
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) {
      let reason = body && body.detail;
      if (Array.isArray(reason)) reason = reason.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
      throw new Error(reason || `${res.status} ${res.statusText}`);
    }
    return body;
  }

  function filterParams() {
    const p = new URLSearchParams();
    const cat = $("f-category").value, cls = $("f-class").value;
    if (cat) p.set("category", cat);
    if (cls) p.set("pipeline_class", cls);
    const pmin = parseFloat($("f-pmin").value), pmax = parseFloat($("f-pmax").value);
    if (Number.isFinite(pmin)) p.set("p_min", String(Math.min(Math.max(pmin, 0), 1)));
    if (Number.isFinite(pmax)) p.set("p_max", String(Math.min(Math.max(pmax, 0), 1)));
    p.set("status", state.status);
    const who = inspector();
    if (who) p.set("inspector", who);
    return p;
  }

  // ---- toast ---------------------------------------------------------------------------------
  let toastTimer = null;
  function toast(msg, error = false) {
    const t = $("toast");
    t.textContent = msg;
    t.className = "toast show" + (error ? " error" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.className = "toast" + (error ? " error" : ""); }, error ? 4000 : 1400);
  }

  // ---- queue ---------------------------------------------------------------------------------
  function inspector() { return $("inspector").value.trim(); }

  // keep === true keeps whichever candidate is selected when the answer arrives (the user may
  // have moved on meanwhile, e.g. pressed q right after typing their name); an id keeps that one.
  async function loadQueue(keep = null) {
    const p = filterParams();
    p.set("offset", "0");
    p.set("limit", String(PAGE));
    let current = null;
    try {
      const data = await api(`api/candidates?${p}`);
      current = state.items[state.index] || null;
      state.items = data.items;
      state.total = data.total;
      state.inspected = data.inspected;
    } catch (e) {
      toast(`Could not load candidates: ${e.message}`, true);
      return;
    }
    const keepId = keep === true ? (current ? current.id : null) : keep;
    renderQueue();
    renderProgress();
    let idx = 0;
    if (keepId) {
      const k = state.items.findIndex((it) => it.id === keepId);
      if (k >= 0) idx = k;
    }
    if (state.items.length) select(idx);
    else showEmpty();
  }

  async function loadMore() {
    if (state.loadingMore || state.items.length >= state.total) return;
    state.loadingMore = true;
    const p = filterParams();
    p.set("offset", String(state.items.length));
    p.set("limit", String(PAGE));
    try {
      const data = await api(`api/candidates?${p}`);
      state.items = state.items.concat(data.items);
      state.total = data.total;
      renderQueue();
    } catch (e) {
      toast(`Could not load more: ${e.message}`, true);
    } finally {
      state.loadingMore = false;
    }
  }

  let countsAsked = 0;  // only the answer to the latest request may set the counts
  async function refreshCounts() {
    const p = filterParams();
    p.set("limit", "1");
    p.set("status", "all");
    const ticket = ++countsAsked;
    try {
      const data = await api(`api/candidates?${p}`);
      if (ticket !== countsAsked) return;  // an older answer arriving late
      state.inspected = data.inspected;
      if (state.status === "all") state.total = data.total;
      renderProgress(data.total);
    } catch (e) { /* counts are cosmetic */ }
  }

  function renderProgress(totalAll) {
    const total = totalAll !== undefined ? totalAll : (state.status === "all" ? state.total : null);
    if (total !== null) $("n-total").textContent = total.toLocaleString();
    $("n-done").textContent = state.inspected.toLocaleString();
    const frac = total ? state.inspected / total : 0;
    $("progress-fill").style.width = `${(100 * frac).toFixed(1)}%`;
  }

  function renderQueue() {
    const ol = $("queue");
    ol.textContent = "";
    const frag = document.createDocumentFragment();
    state.items.forEach((it, i) => {
      const li = document.createElement("li");
      li.dataset.index = String(i);
      if (i === state.index) li.className = "current";
      const dot = document.createElement("span");
      dot.className = "dot" + (it.verdict ? ` ${it.verdict}` : "");
      dot.title = it.verdict ? VERDICT_LABEL[it.verdict] : "no verdict yet";
      const id = document.createElement("span");
      id.className = "qid";
      id.textContent = it.id;
      const pq = document.createElement("span");
      pq.className = "qp";
      pq.textContent = fmt(it.p_qso, 3);
      const sub = document.createElement("span");
      sub.className = "qsub";
      sub.textContent = [it["class"] || "no class", it.z !== null && it.z !== undefined ? `z ${fmt(it.z, 3)}` : null,
        CATEGORY_LABEL[it.category] || it.category].filter(Boolean).join(" · ");
      li.append(dot, id, pq, sub);
      frag.appendChild(li);
    });
    ol.appendChild(frag);
    $("queue-count").textContent = `${state.items.length.toLocaleString()} of ${state.total.toLocaleString()} shown`;
    $("more").hidden = state.items.length >= state.total;
  }

  function markCurrentInQueue() {
    const ol = $("queue");
    for (const li of ol.querySelectorAll("li.current")) li.classList.remove("current");
    const li = ol.querySelector(`li[data-index="${state.index}"]`);
    if (li) {
      li.classList.add("current");
      li.scrollIntoView({ block: "nearest" });
    }
  }

  // ---- current candidate ---------------------------------------------------------------------
  function fetchSpectrum(id) {
    if (!state.cache.has(id)) {
      const pr = api(`api/spectrum/${encodeURIComponent(id)}`);
      pr.catch(() => state.cache.delete(id));
      state.cache.set(id, pr);
      if (state.cache.size > 24) state.cache.delete(state.cache.keys().next().value);
    }
    return state.cache.get(id);
  }

  async function select(i) {
    if (i < 0 || i >= state.items.length) return;
    state.index = i;
    markCurrentInQueue();
    const it = state.items[i];
    state.zUser = null;
    $("z-user").value = "";
    renderDetails(it, null);
    showMessage("loading spectrum…");
    if (i >= state.items.length - 5) loadMore();
    try {
      const spec = await fetchSpectrum(it.id);
      if (state.items[state.index] !== it) return; // the user moved on meanwhile
      state.spec = spec;
      renderDetails(it, spec);
      showMessage(null);
      draw();
    } catch (e) {
      if (state.items[state.index] !== it) return;
      state.spec = null;
      showMessage(`No spectrum: ${e.message}`);
      draw();
    }
    const nxt = state.items[i + 1];
    if (nxt) fetchSpectrum(nxt.id).catch(() => {});
  }

  function showEmpty() {
    state.index = -1;
    state.spec = null;
    renderDetails(null, null);
    showMessage("No candidates match these filters.");
    draw();
  }

  function showMessage(msg) {
    const el = $("plot-msg");
    el.hidden = !msg;
    el.textContent = msg || "";
  }

  function fmt(v, digits) {
    return v === null || v === undefined || !Number.isFinite(v) ? "–" : Number(v).toFixed(digits);
  }

  function sexagesimal(deg, hours) {
    if (deg === null || deg === undefined || !Number.isFinite(deg)) return "–";
    let v = hours ? deg / 15 : Math.abs(deg);
    const sign = hours ? "" : (deg < 0 ? "−" : "+");
    let a = Math.floor(v), b = Math.floor((v - a) * 60), c = ((v - a) * 60 - b) * 60;
    const prec = hours ? 2 : 1;
    if (Number(c.toFixed(prec)) >= 60) { c = 0; b += 1; }
    if (b >= 60) { b = 0; a += 1; }
    const pad = (x, n) => String(x).padStart(n, "0");
    const cs = c.toFixed(prec).padStart(prec + 3, "0");
    return `${sign}${pad(a, 2)}${hours ? "h" : "°"}${pad(b, 2)}${hours ? "m" : "′"}${cs}${hours ? "s" : "″"}`;
  }

  function qualityNames(q) {
    if (!q) return "";
    const names = Object.entries(state.qualityBits).filter(([, bit]) => (q >> bit) & 1).map(([name]) => name);
    return names.length ? names.join(", ") : `0x${q.toString(16)}`;
  }

  function surveyIds(c) {
    if (c.survey === "sdss") return `plate ${c.plate} · mjd ${c.mjd} · fiber ${c.fiberid}`;
    if (c.survey === "lamost") return `lmjd ${c.lmjd} · ${c.planid} · sp ${c.spid} · fiber ${c.fiberid}` + (c.obsid ? ` · obsid ${c.obsid}` : "");
    return "–";
  }

  function setText(id, text, cls) {
    const el = $(id);
    el.textContent = text;
    el.className = cls || (el.classList.contains("mono") ? "mono" : "");
    el.title = text;
  }

  function renderDetails(c, spec) {
    if (!c) {
      $("c-id").textContent = "—";
      for (const id of ["c-category", "c-survey"]) $(id).textContent = "";
      $("c-mine").hidden = true;
      $("c-p").textContent = "–";
      $("c-tpl").textContent = "";
      for (const id of ["c-pos", "c-ids", "c-pipe", "c-cat", "c-src", "c-verdicts"]) setText(id, "–");
      return;
    }
    $("c-id").textContent = c.id;
    $("c-category").textContent = CATEGORY_LABEL[c.category] || c.category || "";
    $("c-survey").textContent = c.survey || "";
    const mine = $("c-mine");
    mine.hidden = !c.verdict;
    if (c.verdict) {
      mine.className = `badge verdict ${c.verdict}`;
      mine.textContent = `you: ${VERDICT_LABEL[c.verdict]}`;
    }
    $("c-p").textContent = fmt(c.p_qso, 3);
    $("c-tpl").textContent = c.spectype ? `templates: ${c.spectype}${c.decided_by === "templates" ? " (decided)" : ""}` : "";
    setText("c-pos", c.ra !== null && c.ra !== undefined
      ? `${fmt(c.ra, 5)}, ${fmt(c.dec, 5)}  (${sexagesimal(c.ra, true)} ${sexagesimal(c.dec, false)})` : "–");
    setText("c-ids", surveyIds(c));
    const pipe = [c["class"] || "no class", c.subclass, c.z !== null && c.z !== undefined ? `z = ${fmt(c.z, 4)}` : "no z",
      c.zwarning ? `zwarning ${c.zwarning}` : null].filter(Boolean).join(" · ");
    const flags = qualityNames(c.quality);
    setText("c-pipe", pipe + (flags ? ` · flags: ${flags}` : ""), c.zwarning || flags ? "warn" : "");
    if (c.cat_label === 1 || c.cat_label === true) {
      const how = c.label_source === "position" ? "matched by position" : c.label_source === "id" ? "matched by id" : "";
      setText("c-cat", ["known quasar", c.catalog_name, how, c.catalog_z !== null && c.catalog_z !== undefined ? `z = ${fmt(c.catalog_z, 4)}` : null]
        .filter(Boolean).join(" · "), "yes");
    } else if (c.cat_label === 0 || c.cat_label === false) {
      setText("c-cat", `not a quasar in ${state.labelReference || "the quasar catalogues"}`, "no");
    } else {
      setText("c-cat", "unknown");
    }
    if (spec) {
      const extra = [c.snr !== null && c.snr !== undefined ? `S/N ${fmt(c.snr, 1)}` : null,
        c.mag !== null && c.mag !== undefined ? `mag ${fmt(c.mag, 2)}` : null].filter(Boolean);
      const src = (spec.source === "original"
        ? `original pixels · ${spec.n_pixels} px${spec.binned_by > 1 ? ` (binned ×${spec.binned_by})` : ""}`
        : `resampled grid · ${spec.n_pixels} bins`) + (extra.length ? ` · ${extra.join(" · ")}` : "");
      setText("c-src", src, spec.note ? "warn" : "");
      $("c-src").title = spec.note || spec.file || src;
      const vs = (spec.verdicts || []).map((v) => `${v.inspector}: ${VERDICT_LABEL[v.verdict] || v.verdict}${v.z !== null ? ` (z ${fmt(v.z, 3)})` : ""}`);
      setText("c-verdicts", vs.length ? vs.join(" · ") : "none yet");
    } else {
      setText("c-src", "…");
      setText("c-verdicts", "…");
    }
  }

  // ---- verdicts ------------------------------------------------------------------------------
  // The page moves on at once and posts in the background, so fast typists lose no key press;
  // a failed post is reported by name and the candidate keeps its old mark.
  function verdict(v) {
    const it = state.items[state.index];
    if (!it) return;
    const who = inspector();
    if (!who) {
      const inp = $("inspector");
      inp.classList.remove("need");
      void inp.offsetWidth;
      inp.classList.add("need");
      inp.focus();
      toast("Type your name in the Inspector field first", true);
      return;
    }
    const btn = $({ qso: "b-qso", not_qso: "b-not", unsure: "b-unsure" }[v]);
    btn.classList.add("flash");
    setTimeout(() => btn.classList.remove("flash"), 150);
    const body = { id: it.id, verdict: v, inspector: who };
    if (state.zUser !== null) body.z = Number(state.zUser.toFixed(5));
    const was = it.verdict;
    it.verdict = v;
    if (!was) state.inspected += 1;
    updateQueueItem(it);
    renderProgress();
    if (state.index < state.items.length - 1) select(state.index + 1);
    else renderDetails(it, state.spec);
    api("api/verdicts", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      .then(() => {
        state.cache.delete(it.id);
        toast(`${it.id}: ${VERDICT_LABEL[v]}${body.z !== undefined ? ` at z = ${body.z.toFixed(3)}` : ""}`);
        refreshCounts();
      })
      .catch((e) => {
        if (it.verdict === v) it.verdict = was;
        if (!was) state.inspected -= 1;
        updateQueueItem(it);
        renderProgress();
        toast(`Not saved (${it.id}): ${e.message}`, true);
      });
  }

  function updateQueueItem(it) {
    const i = state.items.indexOf(it);
    const dot = $("queue").querySelector(`li[data-index="${i}"] .dot`);
    if (dot) {
      dot.className = "dot" + (it.verdict ? ` ${it.verdict}` : "");
      dot.title = it.verdict ? VERDICT_LABEL[it.verdict] : "no verdict yet";
    }
  }

  // ---- redshift ------------------------------------------------------------------------------
  function zPipe() {
    const z = state.spec ? state.spec.z_pipeline : null;
    return z !== null && z !== undefined && Number.isFinite(z) ? z : null;
  }

  function zPred() {
    const z = state.spec ? state.spec.z_predicted : null;
    return z !== null && z !== undefined && Number.isFinite(z) ? z : null;
  }

  function zDefault() {
    return zPred() !== null ? zPred() : zPipe();
  }

  function setUserZ(z, fromInput = false) {
    if (z === null || !Number.isFinite(z)) {
      state.zUser = null;
      if (!fromInput) $("z-user").value = "";
    } else {
      state.zUser = Math.min(Math.max(z, 0), 7);
      if (!fromInput) $("z-user").value = state.zUser.toFixed(4);
    }
    draw();
  }

  // ---- plot ----------------------------------------------------------------------------------
  const canvas = $("plot");
  const M = { l: 66, r: 18, t: 34, b: 42 };
  let view = null; // mapping of the last draw, used by the mouse handlers

  function smoothed(flux, ivar, width) {
    if (width <= 1) return flux;
    const n = flux.length, h = Math.floor(width / 2), out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let sw = 0, sf = 0;
      for (let j = Math.max(0, i - h); j <= Math.min(n - 1, i + h); j++) {
        if (ivar[j] > 0) { sw += ivar[j]; sf += ivar[j] * flux[j]; }
      }
      out[i] = sw > 0 ? sf / sw : flux[i];
    }
    return out;
  }

  function quantile(sorted, q) {
    if (!sorted.length) return 0;
    const pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }

  function niceTicks(lo, hi, target) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const raw = span / target, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= target) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    const W = canvas.clientWidth, H = canvas.clientHeight;
    if (!W || !H) return;
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(H * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const spec = state.spec;
    if (!spec || !spec.wave || !spec.wave.length) { view = null; return; }

    const wave = spec.wave, ivar = spec.ivar;
    const flux = smoothed(spec.flux, ivar, state.smooth);
    const n = wave.length;
    const good = [];
    for (let i = 0; i < n; i++) if (ivar[i] > 0 && Number.isFinite(flux[i])) good.push(flux[i]);
    good.sort((a, b) => a - b);
    let ylo = quantile(good, 0.005), yhi = quantile(good, 0.995);
    // Never clip a broad emission line: the top follows the lightly smoothed maximum.
    const broad = state.smooth >= 5 ? flux : smoothed(spec.flux, ivar, 5);
    for (let k = 0; k < n; k++) if (ivar[k] > 0 && broad[k] > yhi) yhi = broad[k];
    if (!(yhi > ylo)) { ylo -= 1; yhi += 1; }
    const pad = 0.12 * (yhi - ylo);
    ylo -= pad; yhi += pad;
    const xlo = wave[0], xhi = wave[n - 1];
    const pw = W - M.l - M.r, ph = H - M.t - M.b;
    const X = (w) => M.l + ((w - xlo) / (xhi - xlo)) * pw;
    const Y = (f) => M.t + (1 - (f - ylo) / (yhi - ylo)) * ph;
    view = { xlo, xhi, pw };

    // grid and axes
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = COLORS.text;
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    const xt = niceTicks(xlo, xhi, Math.max(4, Math.floor(pw / 90)));
    const yt = niceTicks(ylo, yhi, Math.max(3, Math.floor(ph / 55)));
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of xt) {
      const x = Math.round(X(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(x, M.t); ctx.lineTo(x, M.t + ph); ctx.stroke();
      ctx.fillText(String(t), x, M.t + ph + 6);
    }
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of yt) {
      const y = Math.round(Y(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(M.l, y); ctx.lineTo(M.l + pw, y); ctx.stroke();
      ctx.fillText(Math.abs(t) < 1e-12 ? "0" : String(Number(t.toPrecision(4))), M.l - 6, y);
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.strokeRect(M.l + 0.5, M.t + 0.5, pw, ph);
    ctx.textAlign = "center";
    ctx.textBaseline = "alphabetic";
    ctx.fillText("observed wavelength (Å, vacuum)", M.l + pw / 2, H - 6);
    ctx.save();
    ctx.translate(14, M.t + ph / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(spec.source === "original" ? fluxLabel(spec.flux_unit) : "normalised flux", 0, 0);
    ctx.restore();

    ctx.save();
    ctx.beginPath();
    ctx.rect(M.l, M.t, pw, ph);
    ctx.clip();

    // sky lines
    ctx.font = "10px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    for (const s of SKY) {
      if (s < xlo || s > xhi) continue;
      const x0 = X(s - 6), x1 = X(s + 6);
      ctx.fillStyle = COLORS.sky;
      ctx.fillRect(x0, M.t, Math.max(3, x1 - x0), ph);
      ctx.fillStyle = COLORS.axis;
      if (s !== 6363.8) ctx.fillText("sky", (x0 + x1) / 2 + (s === 6300.3 ? 4 : 0), M.t + ph - 3);
    }

    // ±1σ band, broken where there is no data
    ctx.fillStyle = COLORS.err;
    let i = 0;
    while (i < n) {
      while (i < n && !(ivar[i] > 0)) i++;
      let j = i;
      while (j < n && ivar[j] > 0) j++;
      if (j - i >= 2) {
        ctx.beginPath();
        for (let k = i; k < j; k++) ctx.lineTo(X(wave[k]), Y(spec.flux[k] + 1 / Math.sqrt(ivar[k])));
        for (let k = j - 1; k >= i; k--) ctx.lineTo(X(wave[k]), Y(spec.flux[k] - 1 / Math.sqrt(ivar[k])));
        ctx.closePath();
        ctx.fill();
      }
      i = j;
    }

    // flux: good pixels dark, pixels without data light grey
    ctx.lineWidth = 1.1;
    ctx.lineJoin = "round";
    for (const pass of [false, true]) {
      ctx.strokeStyle = pass ? COLORS.flux : COLORS.fluxBad;
      ctx.beginPath();
      let pen = false;
      for (let k = 0; k < n; k++) {
        const ok = (ivar[k] > 0) === pass;
        if (!ok) { pen = false; continue; }
        const x = X(wave[k]), y = Y(flux[k]);
        if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
      }
      ctx.stroke();
    }

    // emission lines
    const drawLines = (z, color, dashed, top) => {
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = dashed ? 1.2 : 1.5;
      ctx.setLineDash(dashed ? [5, 4] : []);
      let lastX = -1e9, row = 0;
      for (const [name, rest] of LINES) {
        const w = rest * (1 + z);
        if (w < xlo || w > xhi) continue;
        const x = Math.round(X(w)) + 0.5;
        ctx.beginPath(); ctx.moveTo(x, M.t); ctx.lineTo(x, M.t + ph); ctx.stroke();
        row = x - lastX < 44 ? (row + 1) % 2 : 0;
        lastX = x;
        ctx.save();
        ctx.setLineDash([]);
        ctx.font = "600 11px system-ui, sans-serif";
        ctx.textAlign = "left";
        const label = name;
        const tw = ctx.measureText(label).width;
        const ty = top ? M.t + 4 + row * 14 : M.t + ph - 18 - row * 14;
        ctx.fillStyle = "rgba(255,255,255,0.85)";
        ctx.fillRect(x + 3, ty - 1, tw + 4, 13);
        ctx.fillStyle = color;
        ctx.textBaseline = "top";
        ctx.fillText(label, x + 5, ty);
        ctx.restore();
      }
      ctx.setLineDash([]);
    };
    const zp = zPipe();
    const zq = zPred();
    if (zq !== null) drawLines(zq, COLORS.pred, false, true);
    else if (zp !== null) drawLines(zp, COLORS.pipe, true, true);
    if (state.zUser !== null) drawLines(state.zUser, COLORS.user, false, false);
    if (state.hoverX !== null && !state.drag) {
      ctx.strokeStyle = "rgba(28,36,49,0.35)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(Math.round(state.hoverX) + 0.5, M.t);
      ctx.lineTo(Math.round(state.hoverX) + 0.5, M.t + ph);
      ctx.stroke();
    }
    ctx.restore();

    // header annotations above the frame
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "bottom";
    ctx.textAlign = "left";
    ctx.fillStyle = COLORS.pipe;
    let xa = M.l;
    if (zq !== null) {
      ctx.fillStyle = COLORS.pred;
      const from = state.spec.z_predicted_from === "templates" ? "templates" : "network";
      const label = `predicted z = ${zq.toFixed(4)} (${from})`;
      ctx.fillText(label, xa, M.t - 8);
      xa += ctx.measureText(label).width + 14;
    }
    ctx.fillStyle = COLORS.pipe;
    const pipeLabel = zp !== null ? `pipeline z = ${zp.toFixed(4)}` : "no pipeline z";
    ctx.fillText(pipeLabel, xa, M.t - 8);
    xa += ctx.measureText(pipeLabel).width + 14;
    if (state.zUser !== null) {
      ctx.fillStyle = COLORS.user;
      ctx.fillText(`your z = ${state.zUser.toFixed(4)}`, xa, M.t - 8);
    }
    ctx.textAlign = "right";
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(spec.source === "original" ? "original pixels" : "resampled (store)", M.l + pw, M.t - 8);
  }

  function fluxLabel(unit) {
    if (!unit) return "flux";
    if (/^1e-17 erg/.test(unit)) return "flux (10⁻¹⁷ erg s⁻¹ cm⁻² Å⁻¹)";
    return `flux (${unit})`;
  }

  function waveAt(clientX) {
    if (!view) return null;
    const r = canvas.getBoundingClientRect();
    const x = clientX - r.left - M.l;
    return view.xlo + (x / view.pw) * (view.xhi - view.xlo);
  }

  function updateReadout(clientX) {
    const w = waveAt(clientX);
    if (w === null || w < view.xlo || w > view.xhi) { $("readout").textContent = ""; return; }
    const z = state.zUser !== null ? state.zUser : zDefault();
    $("readout").textContent = `λ ${w.toFixed(1)} Å` + (z !== null ? ` · rest ${(w / (1 + z)).toFixed(1)} Å` : "");
  }

  canvas.addEventListener("pointerdown", (ev) => {
    const w = waveAt(ev.clientX);
    if (w === null) return;
    const z0 = state.zUser !== null ? state.zUser : (zDefault() !== null ? zDefault() : 0);
    state.drag = { w0: w, z0 };
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointermove", (ev) => {
    updateReadout(ev.clientX);
    state.hoverX = ev.clientX - canvas.getBoundingClientRect().left;
    if (!state.drag) { draw(); return; }
    const w = waveAt(ev.clientX);
    if (w === null || w <= 0) return;
    // Moving the cursor from w0 to w stretches every line by w / w0: 1 + z scales the same way.
    setUserZ((1 + state.drag.z0) * (w / state.drag.w0) - 1);
  });
  const endDrag = () => { state.drag = null; };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("pointerleave", () => { $("readout").textContent = ""; state.hoverX = null; draw(); });

  // ---- controls ------------------------------------------------------------------------------
  function move(step) {
    const i = state.index + step;
    if (i >= 0 && i < state.items.length) select(i);
  }

  $("b-qso").addEventListener("click", () => verdict("qso"));
  $("b-not").addEventListener("click", () => verdict("not_qso"));
  $("b-unsure").addEventListener("click", () => verdict("unsure"));
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("more").addEventListener("click", loadMore);
  $("z-reset").addEventListener("click", () => setUserZ(null));
  $("queue").addEventListener("click", (ev) => {
    const li = ev.target.closest("li");
    if (li) select(Number(li.dataset.index));
  });
  $("queue").addEventListener("scroll", (ev) => {
    const el = ev.target;
    if (el.scrollTop + el.clientHeight > el.scrollHeight - 80) loadMore();
  });
  $("z-user").addEventListener("input", (ev) => {
    const v = parseFloat(ev.target.value);
    setUserZ(Number.isFinite(v) ? v : null, true);
  });
  $("z-user").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === "Escape") { ev.preventDefault(); ev.target.blur(); }
  });
  $("smooth").addEventListener("change", (ev) => { state.smooth = Number(ev.target.value); draw(); });

  const filtersChanged = () => loadQueue(true);
  for (const id of ["f-category", "f-class"]) $(id).addEventListener("change", filtersChanged);
  for (const id of ["f-pmin", "f-pmax"]) $(id).addEventListener("change", filtersChanged);
  for (const b of document.querySelectorAll("#f-status button")) {
    b.addEventListener("click", () => {
      state.status = b.dataset.status;
      for (const o of document.querySelectorAll("#f-status button")) o.classList.toggle("on", o === b);
      filtersChanged();
    });
  }

  const insp = $("inspector");
  insp.value = localStorage.getItem(LS_KEY) || "";
  insp.addEventListener("change", () => {
    localStorage.setItem(LS_KEY, inspector());
    filtersChanged();
  });
  insp.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === "Escape") { ev.preventDefault(); insp.blur(); }
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
    const key = ev.key;
    const actions = {
      q: () => verdict("qso"), n: () => verdict("not_qso"), u: () => verdict("unsure"),
      z: () => { const f = $("z-user"); if (state.zUser === null && zDefault() !== null) setUserZ(zDefault()); f.focus(); f.select(); },
      r: () => setUserZ(null),
      ArrowRight: () => move(1), ArrowDown: () => move(1), ArrowLeft: () => move(-1), ArrowUp: () => move(-1),
    };
    const fn = actions[key.length === 1 ? key.toLowerCase() : key];
    if (fn) { ev.preventDefault(); fn(); }
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(draw, 60); });

  // ---- start ---------------------------------------------------------------------------------
  async function start() {
    try {
      const info = await api("api/info");
      state.qualityBits = info.quality_bits || {};
      state.labelReference = info.label_reference;
      const sel = $("f-class");
      for (const c of info.pipeline_classes) {
        const o = document.createElement("option");
        o.value = c; o.textContent = c;
        sel.appendChild(o);
      }
      if (info.default_category) $("f-category").value = info.default_category;
      for (const o of $("f-category").options) {
        if (o.value && info.categories[o.value] !== undefined) o.textContent += ` (${info.categories[o.value].toLocaleString()})`;
      }
    } catch (e) {
      toast(`Cannot reach the server: ${e.message}`, true);
      return;
    }
    await loadQueue();
    document.body.dataset.ready = "1";
  }
  start();
})();
