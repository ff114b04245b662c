// The attention explorer: translate sentences (one a line) with /api/translate, then draw the
// attention and the word links of the chosen translation from /api/attention. Plain JavaScript
// with no dependencies: the page works offline and is served as is (no build step). Heatmaps are
// drawn on canvases here, word links as SVG.
"use strict";

const $ = (id) => document.getElementById(id);

const KIND_HELP = {
  cross: "Encoder–decoder attention. Rows: the target token each decoder position writes; " +
         "columns: the source tokens it reads. A sharp diagonal is a word alignment.",
  encoder: "Encoder self-attention. Rows and columns: the source tokens; each row is one source " +
           "position attending over the whole sentence.",
  decoder: "Masked decoder self-attention. Rows: the token each position writes; columns: what it " +
           "has read so far (<s> and the tokens before). No position can see the future.",
};

// viridis (matplotlib), 9 stops. Its lightness rises monotonically, so brighter is always more.
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                 [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  info: null,
  sentences: [],    // [{src, target (given by the user) or null, candidates: [{text, score, log_prob, tokens}]}]
  selected: null,   // {sentence, index}: the translation whose attention is shown; index "target" = the given one
  result: null,     // the /api/attention answer
  kind: "cross",
  layer: 0,         // opens on the layer that aligns best (alignment_best, else the alignment layer of /api/info)
  head: "mean",     // "mean" or a head index
  hover: null,      // {row?, col?}
  request: 0,       // id of the latest request: older answers arriving late are dropped
  timing: "",       // how long the translation took, shown with the attention's time
};

function viridis(v) {
  const x = Math.min(1, Math.max(0, v)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const t = x - i;
  const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
  return `rgb(${Math.round(a[0] + t * (b[0] - a[0]))},${Math.round(a[1] + t * (b[1] - a[1]))},` +
         `${Math.round(a[2] + t * (b[2] - a[2]))})`;
}

// -- talking to the server ---------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`Cannot reach the server (${err.message}). Is aiayn serve still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    // not JSON: the status line below says what happened
  }
  if (!response.ok) {
    throw new Error(data && data.error ? data.error : `The server answered ${response.status} ${response.statusText}.`);
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy, text) {
  $("translate").disabled = busy;
  $("status").textContent = text || "";
}

// Results that no longer answer what was asked are dimmed: while a request runs, and after it
// failed. The class goes when new results arrive.
function setStale(id, stale) {
  $(id).classList.toggle("stale", stale);
}

// -- model information -------------------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await api("/api/info");
    state.info = info;
    const langs = info.languages && info.languages.src ? `${info.languages.src} → ${info.languages.tgt}` : null;
    const parts = [
      `checkpoint ${info.checkpoint}`,
      langs,
      `${info.layers.encoder}+${info.layers.decoder} layers`,
      `${info.heads} heads`,
      `d_model ${info.model.d_model}`,
      `${info.vocab_size.toLocaleString("en")} subwords`,
      info.step != null ? `step ${info.step}` : null,
      info.quantize ? info.quantize : null,
    ];
    $("model-info").textContent = parts.filter(Boolean).join(" · ");
    if (info.languages && info.languages.src) $("src-lang").textContent = `(${info.languages.src})`;
    $("beam").max = info.limits.max_beam;
    $("beam").value = info.search.beam;
    $("nbest").value = Math.min(4, info.search.beam);
    $("alpha").max = info.limits.max_alpha;
    $("alpha").value = info.search.alpha;
    clampNbest();
    // Open on the layer (and head) whose alignment is clearest: the one aiayn heads measured
    // best, else the layer word alignments are read from. Not if a view is already shown.
    if (!state.result) {
      const best = info.alignment_best;
      state.layer = (best ? best.layer : info.alignment.layer) - 1;
      state.head = best && best.head != null ? best.head - 1 : "mean";
    }
  } catch (err) {
    $("model-info").textContent = "";
    showError(`Could not load the model information: ${err.message}`);
  }
}

function clampNbest() {
  const beam = Math.max(1, parseInt($("beam").value, 10) || 1);
  $("nbest").max = beam;
  if ((parseInt($("nbest").value, 10) || 1) > beam) $("nbest").value = beam;
}

// -- translating -------------------------------------------------------------------------------

// Each line of a text area is its own sentence; line k of the target belongs to line k of the source.
function linesOf(id) {
  return $(id).value.split("\n").map((line) => line.trim());
}

async function translate() {
  clearError();
  const sourceLines = linesOf("source");
  const targetLines = linesOf("target");
  const numbered = sourceLines.map((src, k) => ({src, target: targetLines[k] || null})).filter((s) => s.src);
  if (!numbered.length) {
    showError("Type a sentence to translate.");
    return;
  }
  const extra = targetLines.findIndex((t, k) => t && !sourceLines[k]);
  if (extra !== -1) {
    showError(`Line ${extra + 1} of the target has no source line: give line k of the target for line k of the source.`);
    return;
  }
  const beam = parseInt($("beam").value, 10);
  const nbest = parseInt($("nbest").value, 10);
  const alpha = parseFloat($("alpha").value);
  const body = {text: numbered.map((s) => s.src), beam, nbest, details: true};
  if (Number.isFinite(alpha)) body.alpha = alpha;  // empty: the server's default
  const id = ++state.request;
  setBusy(true, "Translating…");
  setStale("results", true);
  setStale("attention-panel", true);
  const started = performance.now();
  try {
    // details: candidate objects with the search's own subword ids, also for nbest 1
    const data = await api("/api/translate", body);
    if (id !== state.request) return;
    state.sentences = numbered.map((s, i) => ({...s, candidates: data.translations[i]}));
    const n = state.sentences.length;
    state.timing = `${n} sentence${n === 1 ? "" : "s"} translated in ${Math.round(performance.now() - started)} ms`;
    renderResults();
    setStale("results", false);
    const first = state.sentences[0];
    await selectCandidate(0, first.target !== null ? "target" : 0);
  } catch (err) {
    if (id !== state.request) return;
    setBusy(false, "");
    showError(err.message);
  }
}

function candidateItem(sentence, index, text, note, title) {
  const item = document.createElement("li");
  item.tabIndex = 0;
  item.dataset.sentence = sentence;
  item.dataset.index = index;
  const span = document.createElement("span");
  span.className = "cand-text";
  span.textContent = text === "" ? "(empty translation)" : text;
  item.append(span);
  if (note) {
    const extra = document.createElement("span");
    extra.className = index === "target" ? "cand-note" : "cand-score";
    extra.textContent = note;
    if (title) extra.title = title;
    item.append(extra);
  }
  item.addEventListener("click", () => selectCandidate(sentence, index));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") selectCandidate(sentence, index); });
  return item;
}

function renderResults() {
  const many = state.sentences.length > 1;
  $("sentences").replaceChildren(...state.sentences.map((sentence, s) => {
    const box = document.createElement("section");
    box.className = "sentence";
    box.dataset.sentence = s;
    if (many) {
      const src = document.createElement("p");
      src.className = "sentence-src";
      src.textContent = `${s + 1}. ${sentence.src}`;
      box.append(src);
    }
    const list = document.createElement("ol");
    list.className = "nbest";
    if (sentence.target !== null) {
      list.append(candidateItem(s, "target", sentence.target, "your target", "the target you gave, not the model's"));
    }
    sentence.candidates.forEach((cand, i) => {
      list.append(candidateItem(s, i, cand.text, `score ${cand.score.toFixed(3)} · log P ${cand.log_prob.toFixed(3)}`,
                                "score = log P(y|x) / ((5+|y|)/6)^α, the ranking of beam search; log P counts the EOS"));
    });
    box.append(list);
    return box;
  }));
  $("results").hidden = false;
}

async function selectCandidate(sentence, index) {
  state.selected = {sentence, index};
  for (const item of $("sentences").querySelectorAll("li")) {
    item.classList.toggle("selected", item.dataset.sentence === String(sentence) && item.dataset.index === String(index));
  }
  const id = ++state.request;
  clearError();
  setBusy(true, "Computing attention…");
  setStale("attention-panel", true);
  const started = performance.now();
  try {
    const chosen = state.sentences[sentence];
    // The weights of exactly the output the search produced: its subword ids, not its text
    // encoded again; a target of the user's own is sent as text.
    const cand = index === "target" ? null : chosen.candidates[index];
    const body = cand ? {src: chosen.src, tgt: cand.text, tgt_ids: cand.tokens} : {src: chosen.src, tgt: chosen.target};
    const data = await api("/api/attention", body);
    if (id !== state.request) return;
    state.result = data;
    state.hover = null;
    setupPickers();
    const panel = $("attention-panel");
    panel.hidden = false;
    // Which translation is shown (read by the tests).
    Object.assign(panel.dataset, {tgt: data.tgt, sentence, index});
    render();
    renderLinks();
    setStale("attention-panel", false);
    setBusy(false, `${state.timing} · attention in ${Math.round(performance.now() - started)} ms`);
  } catch (err) {
    if (id !== state.request) return;
    setBusy(false, "");
    showError(err.message);
  }
}

// -- pickers -----------------------------------------------------------------------------------

function weightsOf(kind) {
  return state.result.attention[kind].weights;  // [layer][head][row][column]
}

// The role aiayn heads gave a head (from the server's --heads file), or null.
function roleOf(kind, layer, head) {
  const roles = state.info && state.info.roles && state.info.roles[kind];
  return head !== "mean" && roles && roles[layer] ? roles[layer][head] || null : null;
}

function layerNote(i) {
  const info = state.info;
  if (!info || state.kind !== "cross") return "";
  const best = info.alignment_best;
  const notes = [];
  if (best && best.layer === i + 1) {
    notes.push("aligns best" + (best.aer != null ? ` (AER ${best.aer.toFixed(2)})` : ""));
  }
  if (info.alignment && info.alignment.layer === i + 1) notes.push("word links");
  return notes.length ? ` · ${notes.join(", ")}` : "";
}

function setupPickers() {
  const layers = weightsOf(state.kind).length;
  state.layer = Math.min(state.layer, layers - 1);
  const layer = $("layer");
  layer.replaceChildren(...Array.from({length: layers}, (_, i) => new Option(`${i + 1} of ${layers}${layerNote(i)}`, i)));
  layer.value = state.layer;
  setupHeads();
  for (const tab of $("kind-tabs").children) {
    tab.setAttribute("aria-selected", String(tab.dataset.kind === state.kind));
  }
  $("kind-help").textContent = KIND_HELP[state.kind];
}

// The head picker of the current kind and layer, each head with its role when the server knows it.
function setupHeads() {
  const heads = weightsOf(state.kind)[0].length;
  if (state.head !== "mean") state.head = Math.min(state.head, heads - 1);
  const head = $("head");
  head.replaceChildren(new Option("mean of heads", "mean"), ...Array.from({length: heads}, (_, i) => {
    const role = roleOf(state.kind, state.layer, i);
    return new Option(`${i + 1} of ${heads}${role ? ` · ${role}` : ""}`, i);
  }));
  head.value = state.head;
  showRole();
}

function showRole() {
  const role = roleOf(state.kind, state.layer, state.head);
  $("head-role").textContent = role ? `role: ${role}` : "";
  $("head-role").hidden = !role;
}

function matrixOf(kind, layer, head) {
  const perHead = weightsOf(kind)[layer];
  if (head !== "mean") return perHead[head];
  const rows = perHead[0].length, cols = perHead[0][0].length;
  const mean = Array.from({length: rows}, () => new Array(cols).fill(0));
  for (const m of perHead) {
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) mean[r][c] += m[r][c] / perHead.length;
  }
  return mean;
}

// -- drawing -----------------------------------------------------------------------------------

function displayToken(piece) {
  // sentencepiece marks a word start with ▁; show it as a thin space so words read naturally
  return piece.replace(/▁/g, "\u2009");
}

let measurer = null;

// How wide the row labels will be (they are at most 180 px wide, CSS), to give the rest to the cells.
function labelWidth(labels) {
  measurer = measurer || document.createElement("canvas").getContext("2d");
  measurer.font = `14px ${getComputedStyle(document.body).fontFamily}`;
  const widest = Math.max(0, ...labels.map((piece) => measurer.measureText(displayToken(piece)).width));
  return Math.min(180, Math.ceil(widest) + 14);
}

// Cells fill the width there is (up to 36 px square); a sentence too long for 12 px cells
// scrolls sideways in #heatmap-wrap.
function cellSize(att) {
  const width = $("heatmap-wrap").clientWidth - labelWidth(att.rows) - 4;
  return Math.max(12, Math.min(36, Math.floor(width / att.columns.length)));
}

function drawMatrix(canvas, matrix, cell, scale, highlight) {
  const rows = matrix.length, cols = matrix[0].length;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(cols * cell * ratio);
  canvas.height = Math.round(rows * cell * ratio);
  canvas.style.width = `${cols * cell}px`;
  canvas.style.height = `${rows * cell}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      ctx.fillStyle = viridis(matrix[r][c] / scale);
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
  }
  if (highlight) {
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#ff5a36";
    if (highlight.row !== undefined) ctx.strokeRect(1, highlight.row * cell + 1, cols * cell - 2, cell - 2);
    if (highlight.col !== undefined) ctx.strokeRect(highlight.col * cell + 1, 1, cell - 2, rows * cell - 2);
  }
}

function scaleOf(matrix) {
  if (!$("stretch").checked) return 1;
  let max = 0;
  for (const row of matrix) for (const v of row) max = Math.max(max, v);
  return max > 0 ? max : 1;
}

function render() {
  const {kind, layer, head} = state;
  const att = state.result.attention[kind];
  const matrix = matrixOf(kind, layer, head);
  const cell = cellSize(att);
  const scale = scaleOf(matrix);
  const canvas = $("heatmap-canvas");
  drawMatrix(canvas, matrix, cell, scale, state.hover);
  // What the tests (and anyone curious) can read back: which view is drawn, at what size.
  Object.assign(canvas.dataset, {view: `${kind}:${layer}:${head}`, rows: att.rows.length,
                                 cols: att.columns.length, cell});
  renderLabels(att, matrix, cell);
  renderStrip();
  $("legend-max").textContent = scale === 1 ? "1" : scale.toFixed(2);
}

function renderLabels(att, matrix, cell) {
  const rowBox = $("row-labels"), colBox = $("col-labels");
  const makeLabel = (piece, axis, index) => {
    const el = document.createElement("div");
    el.className = "tok";
    el.textContent = displayToken(piece);
    el.title = piece;
    el.dataset.axis = axis;
    el.dataset.index = index;
    el.style[axis === "row" ? "height" : "width"] = `${cell}px`;
    el.style.fontSize = `${Math.max(9, Math.min(14, cell - 4))}px`;
    el.addEventListener("mouseenter", () => setHover(axis === "row" ? {row: index} : {col: index}));
    el.addEventListener("mouseleave", () => setHover(null));
    return el;
  };
  rowBox.replaceChildren(...att.rows.map((p, i) => makeLabel(p, "row", i)));
  colBox.replaceChildren(...att.columns.map((p, i) => makeLabel(p, "col", i)));
  shadeLabels(matrix);
}

// Hovering a row shades the columns by how much that row attends to each; hovering a column
// shades the rows by how much each attends to it.
function shadeLabels(matrix) {
  const hover = state.hover || {};
  const scale = scaleOf(matrix);
  for (const el of $("row-labels").children) {
    const r = Number(el.dataset.index);
    const w = hover.col !== undefined ? matrix[r][hover.col] : null;
    el.classList.toggle("active", hover.row === r);
    shade(el, w, scale);
  }
  for (const el of $("col-labels").children) {
    const c = Number(el.dataset.index);
    const w = hover.row !== undefined ? matrix[hover.row][c] : null;
    el.classList.toggle("active", hover.col === c);
    shade(el, w, scale);
  }
}

function shade(el, weight, scale) {
  if (weight === null) {
    el.style.background = "";
    delete el.dataset.weight;
    return;
  }
  el.dataset.weight = weight.toFixed(4);
  el.style.background = `rgba(255, 140, 0, ${Math.min(1, weight / scale).toFixed(3)})`;
}

function setHover(hover) {
  state.hover = hover;
  const {kind, layer, head} = state;
  const att = state.result.attention[kind];
  const matrix = matrixOf(kind, layer, head);
  drawMatrix($("heatmap-canvas"), matrix, Number($("heatmap-canvas").dataset.cell), scaleOf(matrix), hover);
  shadeLabels(matrix);
  const tip = $("tooltip");
  if (hover && hover.row !== undefined && hover.col !== undefined) {
    tip.textContent = `${att.rows[hover.row]} → ${att.columns[hover.col]}: ${matrix[hover.row][hover.col].toFixed(3)}`;
    tip.hidden = false;
  } else {
    tip.hidden = true;
  }
}

function renderStrip() {
  // Small multiples of the current layer: the mean and every head; click one to pick it.
  const strip = $("heads-strip");
  const perHead = weightsOf(state.kind)[state.layer];
  const choices = ["mean", ...perHead.map((_, i) => i)];
  strip.replaceChildren(...choices.map((head) => {
    const fig = document.createElement("figure");
    fig.className = "thumb" + (head === state.head ? " selected" : "");
    fig.tabIndex = 0;
    fig.dataset.head = head;
    const canvas = document.createElement("canvas");
    const matrix = matrixOf(state.kind, state.layer, head);
    const size = Math.max(2, Math.floor(72 / Math.max(matrix.length, matrix[0].length)));
    drawMatrix(canvas, matrix, size, scaleOf(matrix), null);
    const caption = document.createElement("figcaption");
    caption.textContent = head === "mean" ? "mean" : `head ${head + 1}`;
    const role = roleOf(state.kind, state.layer, head);
    if (role) {
      const line = document.createElement("span");
      line.className = "role";
      line.textContent = role;
      caption.append(line);
      fig.title = `head ${head + 1}: ${role}`;
    }
    fig.append(canvas, caption);
    const pick = () => { state.head = head; $("head").value = head; showRole(); render(); };
    fig.addEventListener("click", pick);
    fig.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") pick(); });
    return fig;
  }));
}

// -- word links ------------------------------------------------------------------------------------

// The alignment of the shown pair (/api/attention's "alignment"): source words on the top line,
// target words on the bottom one, a line for each hard link. Hovering a word highlights its links.
function renderLinks() {
  const a = state.result.alignment;
  const svg = $("links");
  svg.replaceChildren();
  delete svg.dataset.links;
  if (!a) return;
  const al = state.info && state.info.alignment;
  const where = al ? `layer ${al.layer}, ${al.head == null ? "mean of the heads" : `head ${al.head}`}` : "";
  $("links-note").textContent = a && a.links.length
    ? `each target word (below) linked to the source word (above) it attends to most${where ? ` (${where})` : ""}; ` +
      "hover a word to see its links"
    : "no links: a side is empty";
  const GAP = 18, PAD = 6, TOP = 18, BOTTOM = 84;
  const words = (list, side, y) => list.map((word, i) => {
    const text = document.createElementNS(SVG_NS, "text");
    text.textContent = word;
    text.setAttribute("class", `word ${side}`);
    text.setAttribute("y", y);
    text.dataset.side = side;
    text.dataset.index = i;
    svg.append(text);
    return text;
  });
  const src = words(a.src_words, "src", TOP), tgt = words(a.tgt_words, "tgt", BOTTOM);
  const widths = (els) => els.map((el) => el.getComputedTextLength());
  const sw = widths(src), tw = widths(tgt);
  const total = (w) => w.reduce((x, y) => x + y, 0) + GAP * Math.max(0, w.length - 1);
  const width = Math.max(total(sw), total(tw), $("links-wrap").clientWidth - 2 * PAD);
  // Each line spread over the same width, so that links run as straight as the words allow.
  const place = (els, w) => {
    const spare = width - total(w);
    const gap = GAP + (w.length > 1 ? spare / (w.length - 1) : 0);
    let x = PAD + (w.length > 1 ? 0 : spare / 2);
    return els.map((el, i) => {
      el.setAttribute("x", x);
      const centre = x + w[i] / 2;
      x += w[i] + gap;
      return centre;
    });
  };
  const sx = place(src, sw), tx = place(tgt, tw);
  const lines = a.links.map(([i, j]) => {
    const line = document.createElementNS(SVG_NS, "line");
    line.setAttribute("class", "link");
    Object.entries({x1: sx[i], y1: TOP + 6, x2: tx[j], y2: BOTTOM - 15}).forEach(([k, v]) => line.setAttribute(k, v));
    line.dataset.src = i;
    line.dataset.tgt = j;
    return line;
  });
  svg.prepend(...lines);
  svg.setAttribute("width", width + 2 * PAD);
  svg.setAttribute("height", BOTTOM + 8);
  const focus = (side, index) => {
    svg.classList.toggle("focus", side !== null);
    const linked = {src: new Set(), tgt: new Set()};
    for (const line of lines) {
      const on = side !== null && line.dataset[side] === String(index);
      line.classList.toggle("active", on);
      if (on) { linked.src.add(line.dataset.src); linked.tgt.add(line.dataset.tgt); }
    }
    for (const el of [...src, ...tgt]) {
      el.classList.toggle("active", side !== null && (linked[el.dataset.side].has(el.dataset.index) ||
                                                      (el.dataset.side === side && el.dataset.index === String(index))));
    }
  };
  for (const el of [...src, ...tgt]) {
    el.addEventListener("mouseenter", () => focus(el.dataset.side, el.dataset.index));
    el.addEventListener("mouseleave", () => focus(null, null));
  }
  svg.dataset.links = a.links.length;  // drawn (read by the tests)
}

function canvasCell(event) {
  const canvas = $("heatmap-canvas");
  const rect = canvas.getBoundingClientRect();
  const cell = Number(canvas.dataset.cell);
  const col = Math.floor((event.clientX - rect.left) / cell);
  const row = Math.floor((event.clientY - rect.top) / cell);
  if (row < 0 || col < 0 || row >= Number(canvas.dataset.rows) || col >= Number(canvas.dataset.cols)) return null;
  return {row, col, x: event.clientX - rect.left, y: event.clientY - rect.top};
}

// -- wiring ------------------------------------------------------------------------------------

function drawLegend() {
  const canvas = $("legend");
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    ctx.fillStyle = viridis(x / (canvas.width - 1));
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

function wire() {
  $("translate-form").addEventListener("submit", (e) => { e.preventDefault(); translate(); });
  for (const id of ["source", "target"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); translate(); }
    });
  }
  $("beam").addEventListener("change", clampNbest);
  for (const tab of $("kind-tabs").children) {
    tab.addEventListener("click", () => { state.kind = tab.dataset.kind; state.hover = null; setupPickers(); render(); });
  }
  $("layer").addEventListener("change", () => {
    state.layer = Number($("layer").value);
    state.hover = null;
    setupHeads();  // the roles of this layer's heads
    render();
  });
  $("head").addEventListener("change", () => {
    const v = $("head").value;
    state.head = v === "mean" ? "mean" : Number(v);
    showRole();
    render();
  });
  $("stretch").addEventListener("change", () => render());
  const canvas = $("heatmap-canvas");
  canvas.addEventListener("mousemove", (e) => {
    const at = canvasCell(e);
    if (!at) return;
    const hover = state.hover || {};
    if (hover.row !== at.row || hover.col !== at.col) setHover({row: at.row, col: at.col});
    const tip = $("tooltip");
    tip.style.left = `${canvas.offsetLeft + at.x + 14}px`;
    tip.style.top = `${canvas.offsetTop + at.y + 14}px`;
  });
  canvas.addEventListener("mouseleave", () => setHover(null));
  window.addEventListener("resize", () => { if (state.result) { render(); renderLinks(); } });
  drawLegend();
}

wire();
loadInfo();
