// The page of `mlxclip serve`: it calls the server's public JSON routes, as any client does.
"use strict";

const KEY_STORAGE = "mlxclip-api-key";
const METRICS_EVERY_MS = 2000;
const $ = (id) => document.getElementById(id);

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const state = { info: null, previousMetrics: null, classifyFile: null, thumbnailUrls: [], metricsTimer: null };

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch() with the key; any answer but 2xx becomes an ApiFailure carrying the server's own message.
async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (err) {
    throw new ApiFailure(0, `the server did not answer (${err.message}); is it still running?`);
  }
  if (response.ok) return response;
  let message = response.statusText;
  try {
    const body = await response.json();
    message = typeof body.error === "string" ? body.error : (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) { /* not JSON: keep the status text */ }
  if (response.status === 401) askForKey(message);
  throw new ApiFailure(response.status, message);
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

function report(err, what, upload) {
  if (err instanceof ApiFailure && err.status === 401) return;  // the key form says it
  const limit = state.info && state.info.limits ? state.info.limits.max_body_mb : null;
  if (err instanceof ApiFailure && err.status === 0 && upload && limit && upload.size > limit * 2 ** 20) {
    // A server refusing a large body may close the connection before the browser reads its 413.
    showMessage(`${what} failed: ${upload.name} (${(upload.size / 2 ** 20).toFixed(1)} MB) exceeds the server's ` +
      `limit of ${limit} MB per request (--max-body-mb)`);
    return;
  }
  const status = err instanceof ApiFailure && err.status ? ` (HTTP ${err.status})` : "";
  showMessage(`${what} failed${status}: ${err.message}`);
}

// --- the API key ------------------------------------------------------------------------------
function askForKey(serverMessage) {
  const had = sessionStorage.getItem(KEY_STORAGE);
  $("key-form").hidden = false;
  $("key-message").textContent = had
    ? `The server refused this API key: ${serverMessage}. Enter the right one.`
    : "This server needs an API key.";
  $("status").textContent = "needs an API key";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value);
  $("key-input").value = "";
  if (await loadInfo()) $("key-form").hidden = true;
});

// --- the model card -----------------------------------------------------------------------------
function fillList(list, rows) {
  list.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.field = name;
    list.append(dt, dd);
  }
}

async function loadInfo() {
  let info;
  try {
    info = await (await api("/info")).json();
  } catch (err) {
    report(err, "Loading the model's card");
    return false;
  }
  state.info = info;
  const quantized = info.quantization ? `${info.quantization.bits}-bit` : "float";
  fillList($("card-info"), [
    ["model", info.model],
    ["engine", info.engine],
    ["weights", quantized],
    ["embedding dims", info.embedding_dim],
    ["image size", info.image_size ? `${info.image_size} px` : "—"],
    ["context", info.context_length ? `${info.context_length} tokens` : "—"],
    ["index", info.index ? `${info.index.images} images` : "none"],
    ["batching", `${info.batching.max_batch_size} rows, ${info.batching.max_wait_ms} ms wait`],
    ["version", info.version],
  ]);
  $("status").textContent = info.ready ? `${info.model} on ${info.engine}` : "the model is loading…";
  const noIndex = !info.index;
  $("no-index").hidden = !noIndex;
  for (const id of ["query", "k", "search-file"]) $(id).disabled = noIndex;
  $("search-form").querySelector("button").disabled = noIndex;
  $("search-drop").classList.toggle("disabled", noIndex);
  if (info.limits) $("k").max = info.limits.max_k;
  if (!state.metricsTimer) {
    refreshMetrics();
    state.metricsTimer = setInterval(refreshMetrics, METRICS_EVERY_MS);
  }
  return true;
}

// Prometheus' text format -> [{name, labels, value}].
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: parseFloat(m[3]) });
  }
  return samples;
}

// The API's own requests: what a person means by the server's load (not the page's polling).
const isApiRoute = (route) => route.startsWith("/v1/");

function latencyBuckets(samples) {
  const byBound = new Map();
  for (const s of samples) {
    if (s.name !== "mlxclip_request_latency_seconds_bucket" || !isApiRoute(s.labels.route)) continue;
    const bound = s.labels.le === "+Inf" ? Infinity : parseFloat(s.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + s.value);
  }
  return [...byBound.entries()].sort((a, b) => a[0] - b[0]);  // [[upper bound, cumulative count]]
}

// Prometheus' histogram_quantile: linear within the bucket holding the rank.
function histogramQuantile(q, buckets) {
  if (!buckets.length) return NaN;
  const total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return NaN;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const [upper, count] of buckets) {
    if (count >= rank) {
      if (upper === Infinity) return lower;
      return lower + (upper - lower) * (count > below ? (rank - below) / (count - below) : 0);
    }
    lower = upper;
    below = count;
  }
  return lower;
}

function summarizeMetrics(samples) {
  const sum = (name, test = () => true) => samples.filter((s) => s.name === name && test(s)).reduce((a, s) => a + s.value, 0);
  return {
    at: performance.now(),
    requests: sum("mlxclip_requests_total", (s) => isApiRoute(s.labels.route)),
    failures: sum("mlxclip_request_failures_total", (s) => isApiRoute(s.labels.route)),
    inFlight: sum("mlxclip_requests_in_flight"),
    queued: sum("mlxclip_queue_depth"),
    buckets: latencyBuckets(samples),
  };
}

async function refreshMetrics() {
  let now;
  try {
    now = summarizeMetrics(parseMetrics(await (await api("/metrics")).text()));
  } catch (err) {
    fillList($("card-live"), [["metrics", `unavailable: ${err.message}`]]);
    return;
  }
  const before = state.previousMetrics;
  state.previousMetrics = now;
  let rate = "—", buckets = now.buckets, window = "since start";
  if (before) {
    rate = ((now.requests - before.requests) / ((now.at - before.at) / 1000)).toFixed(2);
    const recent = now.buckets.map(([bound, count], i) => [bound, count - ((before.buckets[i] || [0, 0])[1])]);
    if (recent.length && recent[recent.length - 1][1] > 0) {
      buckets = recent;
      window = `last ${METRICS_EVERY_MS / 1000} s`;
    }
  }
  const p50 = histogramQuantile(0.5, buckets);
  fillList($("card-live"), [
    ["requests/s", rate],
    [`p50 latency (${window})`, Number.isFinite(p50) ? `${(p50 * 1000).toFixed(0)} ms` : "—"],
    ["in flight", now.inFlight],
    ["queued rows", now.queued],
    ["API requests", now.requests],
    ["refused or failed", now.failures],
  ]);
}

// --- search ---------------------------------------------------------------------------------------
function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 12;
}

async function search(body, what, upload) {
  showMessage("");
  $("search-summary").textContent = `searching ${what}…`;
  let answer;
  try {
    answer = await (await api("/v1/search", body)).json();
  } catch (err) {
    $("search-summary").textContent = "";
    report(err, "Search", upload);
    return;
  }
  $("search-summary").textContent = `${answer.results.length} nearest images to ${what}, best first`;
  showResults(answer.results);
}

function showResults(results) {
  for (const url of state.thumbnailUrls) URL.revokeObjectURL(url);
  state.thumbnailUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  results.forEach((result, rank) => {
    const item = document.createElement("li");
    item.dataset.row = result.row;
    item.dataset.path = result.path;
    item.dataset.score = result.score;
    item.dataset.rank = rank;
    const picture = document.createElement("div");
    picture.className = "missing";
    picture.textContent = "loading…";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `cosine ${result.score.toFixed(4)}`;
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = result.path;
    item.append(picture, score, path);
    grid.append(item);
    loadThumbnail(result.row, result.path, picture);
  });
}

// Through fetch rather than <img src>: the thumbnail route needs the API key too.
async function loadThumbnail(row, path, placeholder) {
  try {
    const blob = await (await api(`/v1/thumbnails/${row}`)).blob();
    const url = URL.createObjectURL(blob);
    state.thumbnailUrls.push(url);
    const img = document.createElement("img");
    img.src = url;
    img.alt = path;
    placeholder.replaceWith(img);
  } catch (err) {
    placeholder.textContent = `no thumbnail: ${err.message}`;
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) return;
  search({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k: kValue() }) },
    `“${text}”`);
});

function searchByImage(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("k", String(kValue()));
  search({ method: "POST", body: form }, file.name, file);
}

// --- zero-shot ------------------------------------------------------------------------------------
const lines = (text) => text.split("\n").map((l) => l.trim()).filter(Boolean);

async function classify() {
  const file = state.classifyFile;
  const labels = lines($("labels").value);
  if (!file) { showMessage("Drop an image (or choose one) to classify."); return; }
  if (!labels.length) { showMessage("Type at least one label, one per line."); return; }
  showMessage("");
  const form = new FormData();
  form.append("file", file, file.name);
  for (const label of labels) form.append("labels", label);
  for (const template of lines($("templates").value)) form.append("templates", template);
  let answer;
  try {
    answer = await (await api("/v1/classify", { method: "POST", body: form })).json();
  } catch (err) {
    $("bars").replaceChildren();
    report(err, "Zero-shot", file);
    return;
  }
  showBars(answer);
}

function showBars(answer) {
  const order = answer.labels.map((label, i) => [label, answer.probabilities[i]]).sort((a, b) => b[1] - a[1]);
  const bars = $("bars");
  bars.replaceChildren();
  for (const [label, probability] of order) {
    const item = document.createElement("li");
    item.dataset.label = label;
    item.dataset.probability = probability;
    if (label === answer.best) item.classList.add("best");
    const name = document.createElement("span");
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(probability * 100).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(probability * 100).toFixed(1)}%`;
    item.append(name, track, value);
    bars.append(item);
  }
}

function setClassifyImage(file) {
  state.classifyFile = file;
  const preview = $("classify-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  classify();
}

$("classify-form").addEventListener("submit", (event) => {
  event.preventDefault();
  classify();
});

// --- dropping files -------------------------------------------------------------------------------
function dropZone(zone, input, onFile) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file && !input.disabled) onFile(file);
  });
  input.addEventListener("change", () => {
    if (input.files[0]) onFile(input.files[0]);
    input.value = "";
  });
}

// A file dropped beside a zone must not navigate the tab away to it.
for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
dropZone($("search-drop"), $("search-file"), searchByImage);
dropZone($("classify-drop"), $("classify-file"), setClassifyImage);

window.mlxclipPage = { parseMetrics, histogramQuantile, latencyBuckets };
loadInfo();
