// The attention explorer: translate a sentence with /api/translate, then draw the attention of
// the chosen translation from /api/attention. Plain JavaScript with no dependencies: the page
// works offline and is served as is (no build step). Heatmaps are drawn on canvases here.
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

const state = {
  info: null,
  source: "",
  candidates: [],   // [{text, score?, log_prob?}], best first
  selected: 0,      // the candidate whose attention is shown
  result: null,     // the /api/attention answer
  kind: "cross",
  layer: 0,
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
    clampNbest();
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

async function translate() {
  const text = $("source").value;
  clearError();
  if (!text.trim()) {
    showError("Type a sentence to translate.");
    return;
  }
  const beam = parseInt($("beam").value, 10);
  const nbest = parseInt($("nbest").value, 10);
  const id = ++state.request;
  setBusy(true, "Translating…");
  const started = performance.now();
  try {
    // details: candidate objects with the search's own subword ids, also for nbest 1
    const data = await api("/api/translate", {text, beam, nbest, details: true});
    if (id !== state.request) return;
    state.source = text;
    state.candidates = data.translations[0];
    state.timing = `translated in ${Math.round(performance.now() - started)} ms`;
    renderCandidates();
    await selectCandidate(0);
  } catch (err) {
    if (id !== state.request) return;
    setBusy(false, "");
    showError(err.message);
  }
}

function renderCandidates() {
  const list = $("nbest-list");
  list.replaceChildren();
  state.candidates.forEach((cand, i) => {
    const item = document.createElement("li");
    item.tabIndex = 0;
    item.dataset.index = i;
    const text = document.createElement("span");
    text.className = "cand-text";
    text.textContent = cand.text === "" ? "(empty translation)" : cand.text;
    item.append(text);
    if (cand.score !== undefined) {
      const score = document.createElement("span");
      score.className = "cand-score";
      score.textContent = `score ${cand.score.toFixed(3)} · log P ${cand.log_prob.toFixed(3)}`;
      score.title = "score = log P(y|x) / ((5+|y|)/6)^α, the ranking of beam search; log P counts the EOS";
      item.append(score);
    }
    item.addEventListener("click", () => selectCandidate(i));
    item.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") selectCandidate(i); });
    list.append(item);
  });
  $("results").hidden = false;
}

async function selectCandidate(index) {
  state.selected = index;
  for (const item of $("nbest-list").children) {
    item.classList.toggle("selected", Number(item.dataset.index) === index);
  }
  const id = ++state.request;
  clearError();
  setBusy(true, "Computing attention…");
  const started = performance.now();
  try {
    // The weights of exactly the output the search produced: its subword ids, not its text encoded again.
    const cand = state.candidates[index];
    const data = await api("/api/attention", {src: state.source, tgt: cand.text, tgt_ids: cand.tokens});
    if (id !== state.request) return;
    state.result = data;
    state.hover = null;
    setupPickers();
    $("attention-panel").hidden = false;
    $("attention-panel").dataset.tgt = data.tgt;  // which translation is shown (read by the tests)
    render();
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

function setupPickers() {
  const layers = weightsOf(state.kind).length;
  const heads = weightsOf(state.kind)[0].length;
  state.layer = Math.min(state.layer, layers - 1);
  if (state.head !== "mean") state.head = Math.min(state.head, heads - 1);
  const layer = $("layer");
  layer.replaceChildren(...Array.from({length: layers}, (_, i) => new Option(`${i + 1} of ${layers}`, i)));
  layer.value = state.layer;
  const head = $("head");
  head.replaceChildren(new Option("mean of heads", "mean"),
                       ...Array.from({length: heads}, (_, i) => new Option(`${i + 1} of ${heads}`, i)));
  head.value = state.head;
  for (const tab of $("kind-tabs").children) {
    tab.setAttribute("aria-selected", String(tab.dataset.kind === state.kind));
  }
  $("kind-help").textContent = KIND_HELP[state.kind];
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

function cellSize(rows, cols) {
  const available = Math.max(240, Math.min(720, $("heatmap-wrap").clientWidth - 160));
  return Math.max(10, Math.min(36, Math.floor(available / Math.max(rows, cols))));
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
  const cell = cellSize(att.rows.length, att.columns.length);
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
    fig.append(canvas, caption);
    const pick = () => { state.head = head; $("head").value = head; render(); };
    fig.addEventListener("click", pick);
    fig.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") pick(); });
    return fig;
  }));
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
  $("source").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); translate(); }
  });
  $("beam").addEventListener("change", clampNbest);
  for (const tab of $("kind-tabs").children) {
    tab.addEventListener("click", () => { state.kind = tab.dataset.kind; state.hover = null; setupPickers(); render(); });
  }
  $("layer").addEventListener("change", () => { state.layer = Number($("layer").value); state.hover = null; render(); });
  $("head").addEventListener("change", () => {
    const v = $("head").value;
    state.head = v === "mean" ? "mean" : Number(v);
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
  window.addEventListener("resize", () => { if (state.result) render(); });
  drawLegend();
}

wire();
loadInfo();
