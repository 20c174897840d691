// The aligna page: pick a model, translate, and look at the attention of each translation.
// Plain JavaScript, no libraries; every request goes to this server's /v1 API.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "aligna-api-key";
const KIND_NAMES = { cross: "encoder–decoder (cross)", encoder: "encoder self", decoder: "decoder self" };
const state = { models: [], results: [], selected: 0, request: null, sent: 0 };
const TIMEOUT_MS = 120000;  // a request with no answer by then is given up, and the page says so

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const timeout = AbortSignal.timeout(TIMEOUT_MS);
  init.signal = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let response;
  try {
    response = await fetch(new URL(path, document.baseURI), init);
  } catch (e) {
    if (e.name === "TimeoutError") throw new Error("no answer from the server in " + TIMEOUT_MS / 1000 + " s");
    throw e;
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok || data === null) {
    const message = (data && data.error) || response.status + " " + response.statusText + (response.ok ? " (not JSON)" : "");
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = String(value);
  o.textContent = text;
  return o;
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// ------------------------------------------------------------------ models

async function loadModels() {
  setStatus("loading models…");
  try {
    const data = await api("v1/models");
    state.models = data.models;
    const select = $("model");
    const previous = select.value;
    select.replaceChildren(...data.models.map((m) => option(m.name, m.name + " (" + m.src_lang + "→" + m.tgt_lang + ")")));
    if (data.models.some((m) => m.name === previous)) select.value = previous;
    if (data.limits && data.limits.max_beam) {
      $("beam").max = data.limits.max_beam;
      $("nbest").max = data.limits.max_beam;
    }
    showModel();
    setStatus("ready");
  } catch (e) {
    if (e.status === 401) {
      setStatus("this server needs an API key: enter it above", true);
      $("api-key").focus();
    } else {
      setStatus("error: " + e.message, true);
    }
  }
}

function showModel() {
  const m = currentModel();
  if (!m) return;
  const equal = m.members && m.members.every((x) => Math.abs(x.weight - m.members[0].weight) < 1e-9);
  const member = (x) => x.architecture + (equal ? "" : " ×" + x.weight.toFixed(2));  // unequal weights shown
  const parts = m.members
    ? ["ensemble of " + m.members.map(member).join(" + "), m.parameters.toLocaleString("en") + " parameters"]
    : [m.architecture, m.parameters.toLocaleString("en") + " parameters", m.layers.encoder + "+" + m.layers.decoder + " layers"];
  if (m.heads) parts.push(m.heads + " heads");
  parts.push(m.precision + " on " + m.device);
  $("model-info").textContent = parts.join(" · ");
  const beam = m.decode.beam_size > 1;
  $("beam-search").checked = beam;
  $("greedy").checked = !beam;
  if (beam) $("beam").value = m.decode.beam_size;
  $("nbest").value = m.decode.nbest;
}

// ------------------------------------------------------------------ translating

function buildRequest() {
  const m = currentModel();
  // one sentence per non-blank line (a blank line between sentences is not a sentence)
  const texts = $("source").value.replace(/\r\n?/g, "\n").split("\n").filter((line) => line.trim() !== "");
  const beam = $("beam-search").checked;
  const request = { model: m ? m.name : undefined, texts: texts };
  request.beam_size = beam ? Number($("beam").value) || 1 : 1;
  request.nbest = beam ? Number($("nbest").value) || 1 : 1;
  // the map search used; a Transformer's other maps are fetched for the selected line alone (allMaps)
  request.attention = !m || !m.has_attention ? "none" : "cross";
  return request;
}

// One request at a time: a new translation or another model cancels the one in flight, whose
// answer could otherwise land after (and over) a newer one.
function startRequest() {
  if (state.request) state.request.abort();
  state.request = new AbortController();
  state.sent += 1;
  return { signal: state.request.signal, number: state.sent };
}

function isCurrent(ticket) {
  return ticket.number === state.sent;
}

async function translate() {
  if ($("translate").disabled) return;  // Ctrl+Enter while a translation is on its way
  const request = buildRequest();
  if (!request.texts.length) {
    setStatus("type a sentence first", true);
    return;
  }
  const ticket = startRequest();
  setStatus("translating…");
  $("translate").disabled = true;
  const started = performance.now();
  try {
    const data = await api("v1/translate", request, ticket.signal);
    if (!isCurrent(ticket)) return;
    state.results = data.results.map((r, i) => ({ ...r, source: request.texts[i] }));
    state.search = request;
    state.selected = 0;
    renderResults();
    setStatus("ready");
    $("status").title = data.results.length + " translated in " + Math.round(performance.now() - started) + " ms";
    selectResult(0);
  } catch (e) {
    if (isCurrent(ticket)) setStatus("error: " + e.message, true);
  } finally {
    if (isCurrent(ticket)) $("translate").disabled = false;
  }
}

// Every map of a Transformer's translation (each layer and head of each kind) for the result
// selected: the line decoded again alone, with the same search, asking for attention "all".
async function allMaps(i) {
  const m = currentModel(), r = state.results[i];
  if (!m || m.architecture !== "transformer" || !r || !r.attention || r.attention.maps || r.mapsFailed) return;
  const ticket = { number: state.sent }, results = state.results;
  setStatus("loading the attention maps…");
  try {
    const data = await api("v1/translate", { ...state.search, texts: [r.source], attention: "all" }, state.request && state.request.signal);
    const alone = data.results[0];
    if (!isCurrent(ticket) || state.results !== results) return;
    if (JSON.stringify(alone.tokens) === JSON.stringify(r.tokens)) {
      r.attention = alone.attention;
    } else {  // int8 can decode a line alone otherwise than in its batch: not this translation's maps
      r.mapsFailed = "decoded alone, this line came out otherwise, so only the map search used is shown";
    }
    setStatus("ready");
  } catch (e) {
    if (!isCurrent(ticket) || state.results !== results) return;
    r.mapsFailed = e.message;
    setStatus("ready");
  }
  if (state.selected === i) {
    setupSelectors();
    drawHeatmap();
  }
}

function renderResults() {
  const box = $("results");
  box.replaceChildren();
  state.results.forEach((r, i) => {
    const item = document.createElement("div");
    item.className = "result";
    item.tabIndex = 0;
    item.dataset.index = String(i);
    const source = document.createElement("div");
    source.className = "source";
    source.dir = "auto";  // right-to-left text laid out as such
    source.textContent = r.source;
    const line = document.createElement("div");
    line.className = "line";
    const text = document.createElement("span");
    text.className = "translation";
    text.dir = "auto";
    text.textContent = r.text;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score === null ? "" : "log p " + r.score.toFixed(3);
    line.append(text, score);
    item.append(source, line);
    if (r.nbest.length > 1) {
      const list = document.createElement("ol");
      list.className = "nbest";
      for (const hyp of r.nbest) {
        const li = document.createElement("li");
        const t = document.createElement("span");
        t.dir = "auto";
        t.textContent = hyp.text;
        const s = document.createElement("span");
        s.className = "score";
        s.textContent = hyp.score === null ? "" : hyp.score.toFixed(3);
        li.append(t, s);
        list.append(li);
      }
      item.append(list);
    }
    item.addEventListener("click", () => selectResult(i));
    item.addEventListener("keydown", (e) => { if (e.key === "Enter") selectResult(i); });
    box.append(item);
  });
}

function selectResult(i) {
  state.selected = i;
  document.querySelectorAll("#results .result").forEach((el, j) => el.classList.toggle("selected", i === j));
  setupSelectors();
  drawHeatmap();
  allMaps(i);
}

// ------------------------------------------------------------------ attention

function currentRecord() {
  const r = state.results[state.selected];
  return r ? r.attention : null;
}

// What the user picked in #kind / #layer / #head (null: the default, the map search used:
// cross-attention, last layer, mean over heads).
const choice = { kind: null, layer: null, head: null };

function setupSelectors() {
  const record = currentRecord();
  const maps = record && record.maps ? record.maps : null;
  const kind = $("kind"), layer = $("layer"), head = $("head");
  if (maps && Object.keys(maps).length) {
    const kinds = ["cross", "encoder", "decoder"].filter((k) => k in maps).concat(Object.keys(maps).filter((k) => !(k in KIND_NAMES)));
    kind.replaceChildren(...kinds.map((k) => option(k, KIND_NAMES[k] || k)));
    kind.value = choice.kind in maps ? choice.kind : kinds[0];
    const m = maps[kind.value];
    const layers = m.weights.length, heads = m.weights[0].length;
    layer.replaceChildren(...m.weights.map((_, l) => option(l, "layer " + (l + 1))));
    layer.value = choice.layer !== null && choice.layer < layers ? String(choice.layer) : String(layers - 1);
    head.replaceChildren(option("mean", "mean over heads"), ...m.weights[0].map((_, h) => option(h, "head " + (h + 1))));
    head.value = choice.head !== null && choice.head !== "mean" && Number(choice.head) < heads ? String(choice.head) : "mean";
    [kind, layer, head].forEach((s) => (s.disabled = false));
  } else {
    const ensemble = currentModel() && currentModel().members;  // its map: the mean of its models' maps
    kind.replaceChildren(option("cross", KIND_NAMES.cross));
    layer.replaceChildren(option(0, ensemble ? "each model's last layer" : "layer 1"));
    head.replaceChildren(option("mean", ensemble ? "mean over heads and models" : "mean over heads"));
    [kind, layer, head].forEach((s) => (s.disabled = true));
  }
}

// The grid to draw: {rows, cols, weights[row][col]} or null, with a note saying why not.
function currentGrid() {
  const m = currentModel();
  const r = state.results[state.selected];
  if (!r) return { grid: null, note: "" };
  if (m && !m.has_attention) {
    const why = m.members ? "none of this ensemble's models has attention" : "model.rnn.attention: none";
    return { grid: null, note: "This model has no attention (" + why + ")." };
  }
  const record = r.attention;
  if (!record || !record.src_tokens.length) return { grid: null, note: "Nothing to show for an empty input." };
  const maps = record.maps;
  if (maps && maps[$("kind").value]) {
    const m = maps[$("kind").value];
    const heads = m.weights[Number($("layer").value)] || m.weights[m.weights.length - 1];
    const h = $("head").value;
    const weights = h === "mean" ? meanOver(heads) : heads[Number(h)];
    return { grid: { rows: m.rows, cols: m.cols, weights: weights }, note: "" };
  }
  if (!record.weights) return { grid: null, note: "No attention weights came back for this translation." };
  const note = r.mapsFailed ? "Every layer's maps: " + r.mapsFailed + "." : "";
  return { grid: { rows: record.tgt_tokens, cols: record.src_tokens, weights: record.weights }, note: note };
}

function meanOver(heads) {
  return heads[0].map((row, i) => row.map((_, j) => heads.reduce((sum, hd) => sum + hd[i][j], 0) / heads.length));
}

function drawHeatmap() {
  const table = $("heatmap");
  const { grid, note } = currentGrid();
  $("attention-note").textContent = note;
  $("readout").textContent = "";
  table.replaceChildren();
  $("legend").hidden = !grid;
  if (!grid) return;
  const head = document.createElement("tr");
  head.className = "hm-header";
  const corner = document.createElement("th");
  corner.className = "hm-corner";
  corner.textContent = "target ↓ source →";
  head.append(corner);
  grid.cols.forEach((token, j) => {
    const th = document.createElement("th");
    th.className = "hm-src";
    th.dataset.col = String(j);
    th.scope = "col";
    const span = document.createElement("span");
    span.dir = "auto";
    span.textContent = token;
    th.append(span);
    head.append(th);
  });
  const thead = document.createElement("thead");
  thead.append(head);
  const tbody = document.createElement("tbody");
  grid.rows.forEach((token, i) => {
    const tr = document.createElement("tr");
    tr.className = "hm-row";
    const th = document.createElement("th");
    th.className = "hm-tgt";
    th.scope = "row";
    th.dir = "auto";
    th.textContent = token;
    tr.append(th);
    (grid.weights[i] || []).forEach((w, j) => {
      const td = document.createElement("td");
      td.className = "hm-cell";
      td.dataset.row = String(i);
      td.dataset.col = String(j);
      td.dataset.weight = w.toFixed(3);
      td.style.backgroundColor = "rgba(37, 99, 235, " + Math.min(1, Math.max(0, w)).toFixed(3) + ")";
      td.title = token + " ← " + grid.cols[j] + ": " + w.toFixed(3);
      tr.append(td);
    });
    tbody.append(tr);
  });
  table.append(thead, tbody);
}

function highlight(cell) {
  const table = $("heatmap");
  table.querySelectorAll(".hl").forEach((el) => el.classList.remove("hl"));
  if (!cell) {
    $("readout").textContent = "";
    return;
  }
  const row = cell.dataset.row, col = cell.dataset.col;
  cell.classList.add("hl");
  const tgt = table.querySelectorAll("tbody .hm-tgt")[Number(row)];
  const src = table.querySelector('.hm-src[data-col="' + col + '"]');
  if (tgt) tgt.classList.add("hl");
  if (src) src.classList.add("hl");
  $("readout").textContent = (tgt ? tgt.textContent : "") + " ← " + (src ? src.textContent : "") + ": " + cell.dataset.weight;
}

// ------------------------------------------------------------------ the request as JSON and curl

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function showRequest(event) {
  event.preventDefault();
  const request = buildRequest();
  const json = JSON.stringify(request, null, 1);
  const url = new URL("v1/translate", document.baseURI).href;
  const auth = sessionStorage.getItem(KEY_STORE) ? " \\\n  -H \"Authorization: Bearer $ALIGNA_API_KEY\"" : "";
  const curl = "curl -s " + url + " \\\n  -H 'Content-Type: application/json'" + auth + " \\\n  -d " + shellQuote(JSON.stringify(request));
  const pre = $("request");
  pre.textContent = "POST " + url + "\n" + json + "\n\n" + curl;
  pre.hidden = false;
}

// ------------------------------------------------------------------ wiring

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORE);
    loadModels();
  });
  $("model").addEventListener("change", () => {
    if (state.request) state.request.abort();  // its answer is another model's
    state.sent += 1;
    $("translate").disabled = false;
    setStatus("ready");
    showModel();
    state.results = [];
    renderResults();
    drawHeatmap();
  });
  $("translate").addEventListener("click", translate);
  $("source").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) translate();
  });
  for (const id of ["beam", "nbest"]) {
    $(id).addEventListener("input", () => {
      if (Number($(id).value) > 1) $("beam-search").checked = true;
    });
  }
  $("kind").addEventListener("change", () => {
    choice.kind = $("kind").value;
    setupSelectors();
    drawHeatmap();
  });
  $("layer").addEventListener("change", () => {
    choice.layer = Number($("layer").value);
    drawHeatmap();
  });
  $("head").addEventListener("change", () => {
    choice.head = $("head").value;
    drawHeatmap();
  });
  const table = $("heatmap");
  table.addEventListener("mouseover", (e) => highlight(e.target.closest(".hm-cell")));
  table.addEventListener("mouseleave", () => highlight(null));
  $("show-request").addEventListener("click", showRequest);
  setupSelectors();
  loadModels();
}

init();
