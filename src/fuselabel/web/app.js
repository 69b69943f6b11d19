// The fuselabel page: one photo and/or caption -> every label's bar, and a "why" view for one label.
// Plain DOM code against the service's JSON (POST predict, POST explain, GET health and info); no build step.
// A service started with an API key says so in /health; the page then asks for the key, keeps it in the tab's
// sessionStorage (gone when the tab closes) and sends it as X-API-Key.
//
// What is shown always belongs to the inputs shown: a newer request makes any older answer stale (it is
// dropped when it arrives), and new input or an error clears the results of the old one.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPES = { "image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP", "image/gif": "GIF", "image/bmp": "BMP" };
const KEY_STORE = "fuselabel-api-key";
const state = { file: null, photoUrl: null, sent: null, ticket: 0, limits: { max_upload_mb: 10 }, pending: null,
                rows: [], counting: null, countTimer: null };
// With hundreds of labels a bar for each buries the answer: the predicted labels and the most probable are
// drawn, and the filter box finds any other (at most FOUND_MAX bars for one search).
const TOP = 10;
const FOUND_MAX = 50;

function keyHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

function setMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "muted";
}

function percent(p) {
  if (p === null || p === undefined || Number.isNaN(p)) return "–";
  const value = 100 * p;
  // Small but non-zero figures keep one significant digit instead of reading as zero.
  if (value > 0 && value < 0.1) return "<0.1%";
  return `${value.toFixed(1)}%`;
}

// A new ticket for each request; an answer whose ticket is no longer the latest is stale and dropped.
function newTicket() {
  if (state.pending) state.pending.abort();
  state.pending = new AbortController();
  state.ticket += 1;
  setBusy(null);  // the request at work, if any, is dropped
  return state.ticket;
}

function clearResults() {
  newTicket();   // whatever is still on its way belongs to inputs no longer shown
  $("result-panel").hidden = true;
  $("why-panel").hidden = true;
  $("caption-cut").hidden = true;
  $("bars").replaceChildren();
  $("predicted").replaceChildren();
  $("contributions").replaceChildren();
  state.rows = [];
  hideHeatmap();
  state.sent = null;
}

function fileProblem(file) {
  if (!TYPES[file.type]) {
    return `"${file.name}" is not a photo this page can send: choose a JPEG, PNG, WebP, GIF or BMP file.`;
  }
  const limit = state.limits.max_upload_mb;
  if (file.size > limit * 1e6) {
    return `"${file.name}" is ${(file.size / 1e6).toFixed(1)} MB, over the ${limit} MB limit: choose a smaller photo.`;
  }
  return null;
}

async function choosePhoto(file) {
  if (!file) return;
  clearResults();
  const problem = fileProblem(file);
  if (problem) {
    clearPhoto();
    setMessage(problem, true);
    return;
  }
  const url = URL.createObjectURL(file);
  const probe = new Image();
  probe.src = url;
  try {
    await probe.decode();   // the browser opens it, so the service very likely will too
  } catch (err) {
    URL.revokeObjectURL(url);
    clearPhoto();
    setMessage(`"${file.name}" could not be opened as a photo: it may be damaged, or not a photo at all.`, true);
    return;
  }
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.file = file;
  state.photoUrl = url;
  $("photo").src = url;
  $("photo-frame").hidden = false;
  $("drop-hint").hidden = true;
  $("clear-photo").hidden = false;
  setMessage("");
}

function clearPhoto() {
  state.file = null;
  $("photo-input").value = "";
  $("photo").removeAttribute("src");
  $("photo-frame").hidden = true;
  $("drop-hint").hidden = false;
  $("clear-photo").hidden = true;
  hideHeatmap();
}

function hideHeatmap() {
  $("heatmap").hidden = true;
  $("heatmap").removeAttribute("src");
}

// The inputs as a form; the same ones go to /explain, so a "why" explains the prediction shown.
function inputsForm(extra = {}) {
  const form = new FormData();
  if (state.sent.file) form.append("image", state.sent.file, state.sent.file.name || "photo");
  if (state.sent.caption) form.append("caption", state.sent.caption);
  for (const [key, value] of Object.entries(extra)) form.append(key, value);
  return form;
}

// What a person reads when the service says no: what happened and what to do, not a status code.
function humanError(status, detail, retryAfter) {
  if (status === 401) return "This service wants its API key: enter it in the API key field, then try again.";
  if (status === 413) return `Too large for the service (limit ${state.limits.max_upload_mb} MB): choose a smaller photo.`;
  if (status === 415) return "The service could not read this file as a photo: send a JPEG, PNG, WebP, GIF or BMP "
    + "photo (very large photos are refused too).";
  if (status === 503) return `The service is busy: try again in ${retryAfter || "a few"} seconds.`;
  if (status === 408) return "The upload took too long: try again, or with a smaller photo.";
  if (status === 422 && detail) return `The service needs something else: ${detail}.`;
  return `Something went wrong in the service (${status}): try again later.`;
}

class ServiceError extends Error {}

async function post(path, form, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form, signal, headers: keyHeaders() });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ServiceError("Could not reach the service: check that it is running, then try again.");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON: said below */ }
  if (!response.ok) {
    throw new ServiceError(humanError(response.status, body && body.detail, response.headers.get("Retry-After")));
  }
  return body;
}

// The button whose request is at work says so (aria-busy, and a style) until its answer, or a newer request's
// start, ends it: only one request is ever shown as at work.
function setBusy(button) {
  document.querySelectorAll("[aria-busy='true']").forEach((b) => b.setAttribute("aria-busy", "false"));
  if (button) button.setAttribute("aria-busy", "true");
}

async function predict() {
  const caption = $("caption").value.trim();
  if (!state.file && !caption) {
    clearResults();
    setMessage("Choose a photo or type a caption first.", true);
    return;
  }
  clearResults();
  const ticket = state.ticket;
  const signal = state.pending.signal;
  state.sent = { file: state.file, caption };
  setMessage("Predicting…");
  setBusy($("predict-button"));
  try {
    const result = await post("predict", inputsForm(), signal);
    if (ticket !== state.ticket) return;
    renderResult(result);
    setMessage("");
  } catch (err) {
    if (ticket !== state.ticket || err.name === "AbortError") return;
    clearResults();
    setMessage(err.message, true);
  } finally {
    if (ticket === state.ticket) setBusy(null);
  }
}

const STATUS_TEXT = { ok: "from the photo and the caption", caption_only: "from the caption only",
                      image_only: "from the photo only" };

function renderResult(result) {
  $("result-panel").hidden = false;
  $("why-panel").hidden = true;
  hideHeatmap();
  $("status").textContent = STATUS_TEXT[result.status] || result.status;
  showFusion(result.fusion);
  const rows = [...result.labels].sort((a, b) => b.probability - a.probability);
  // Chips in the bars' order: the most probable first.
  $("predicted").replaceChildren(...rows.filter((lab) => lab.predicted).map((lab) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = lab.name;
    return chip;
  }));
  state.rows = rows;
  // Thresholds in plain view (a phone shows no tooltips): one figure when every label shares it, else each row's.
  const thresholds = new Set(rows.map((lab) => lab.threshold));
  state.oneThreshold = thresholds.size === 1;
  $("threshold-legend").textContent = state.oneThreshold
    ? `, ${percent(rows[0].threshold)} for every label` : " (its figure under the probability)";
  drawBars();
  showContributions(result);
}

// The bars: the predicted labels and the TOP most probable, or those the filter box finds.
function drawBars() {
  const rows = state.rows;
  const query = $("label-filter").value.trim().toLowerCase();
  let shown;
  let said;
  if (query) {
    const found = rows.filter((lab) => lab.name.toLowerCase().includes(query) || String(lab.id).toLowerCase() === query);
    shown = found.slice(0, FOUND_MAX);
    said = `${found.length} of ${rows.length} labels match “${$("label-filter").value.trim()}”`
      + (found.length > FOUND_MAX ? `; the ${FOUND_MAX} most probable are shown: type more to narrow them.` : ".");
  } else {
    shown = rows.filter((lab, i) => lab.predicted || i < TOP);
    said = `The predicted labels and the most probable: ${shown.length} of ${rows.length}. Find the others here.`;
  }
  $("filter-row").hidden = rows.length <= TOP;
  $("bars-shown").textContent = said;
  $("bars").replaceChildren(...shown.map(barRow));
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function readText(c) {
  return `read ${c.words_read} of ${plural(c.words, "word")} (${c.tokens_read} of ${c.tokens} tokens; `
    + `it reads at most ${c.max_tokens})`;
}

// What each input did to this answer: whether the label set would differ without it, and how much of the
// caption was read. A weight of 0 or 1 means the model ignores one input altogether.
function showContributions(result) {
  const c = result.contributions;
  const reads = result.fusion ? result.fusion.reads : "both";
  const lines = [];
  const effect = (changed, other) => (changed ? "changed the labels"
    : `did not change the labels (the ${other} alone gives the same ones)`);
  if (!c.separable) {
    lines.push("This model reads the photo and the caption together in one head (early fusion): what each "
      + "contributed cannot be told apart.");
  }
  if (reads === "caption only") lines.push("Photo: not used by this model.");
  else if (!result.inputs.includes("image")) lines.push("Photo: none given.");
  else if (c.separable) lines.push(`Photo: ${effect(c.image_changed, "caption")}.`);
  const read = c.caption ? `; the model ${readText(c.caption)}` : "";
  if (reads === "photo only") lines.push("Caption: not used by this model.");
  else if (!result.inputs.includes("caption")) lines.push("Caption: none given.");
  else if (c.separable) lines.push(`Caption: ${effect(c.caption_changed, "photo")}${read}.`);
  else if (read) lines.push(`Caption: the model ${readText(c.caption)}.`);
  $("contributions").replaceChildren(...lines.map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  }));
  const cut = c.caption && c.caption.cut;
  $("caption-cut").hidden = !cut;
  $("caption-cut").textContent = cut ? `This caption is longer than the model reads: it ${readText(c.caption)}; `
    + `the rest did not count. It read: “${c.caption.read_text}”.` : "";
}

// The caption box's limit as it is typed: the service counts the tokens the model would read.
function countCaption() {
  clearTimeout(state.countTimer);
  state.countTimer = setTimeout(async () => {
    if (state.counting) state.counting.abort();
    state.counting = new AbortController();
    const caption = $("caption").value;
    const shown = $("caption-count");
    if (!caption.trim()) { shown.textContent = ""; shown.classList.remove("cut"); return; }
    const form = new FormData();
    form.append("caption", caption);
    try {
      const answer = await post("caption", form, state.counting.signal);
      const c = answer.caption;
      shown.classList.toggle("cut", Boolean(c && c.cut));
      shown.textContent = !c ? "This model does not read captions."
        : `${c.words_read} of ${plural(c.words, "word")} read (${c.tokens_read} of ${c.max_tokens} tokens)`
          + (c.cut ? ": the rest is past the model's limit and not read." : "");
    } catch (err) {
      if (err.name !== "AbortError") shown.textContent = "";
    }
  }, 200);
}

// What each input contributed: the photo head's weight in force, and a plain notice when it is nothing.
function showFusion(fusion) {
  const weight = fusion ? fusion.image_weight : null;
  $("fusion").textContent = weight === null || weight === undefined ? ""
    : `photo weight ${weight.toFixed(2)} · caption weight ${(1 - weight).toFixed(2)}`;
  // A late fusion that gives one input no weight (a model without a photo head never asks for a photo).
  const ignores = (reads) => Boolean(fusion) && fusion.kind === "late" && fusion.reads === reads;
  $("no-photo-notice").hidden = !ignores("caption only");
  $("no-caption-notice").hidden = !ignores("photo only");
}

function barRow(lab) {
  const row = document.createElement("div");
  row.className = "bar-row" + (lab.predicted ? " predicted" : "");
  row.dataset.label = lab.id;
  const name = document.createElement("span");
  name.className = "bar-name";
  name.textContent = lab.name;
  const track = document.createElement("span");
  track.className = "bar-track";
  track.title = `probability ${percent(lab.probability)}, threshold ${percent(lab.threshold)}`;
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${(100 * lab.probability).toFixed(2)}%`;
  const tick = document.createElement("span");
  tick.className = "bar-threshold";
  tick.style.left = `${(100 * lab.threshold).toFixed(2)}%`;
  track.append(fill, tick);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(lab.probability);
  if (!state.oneThreshold) {
    const threshold = document.createElement("span");
    threshold.className = "bar-threshold-value";
    threshold.textContent = `≥ ${percent(lab.threshold)}`;
    value.append(threshold);
  }
  const why = document.createElement("button");
  why.type = "button";
  why.className = "why-button";
  why.dataset.label = lab.id;
  why.textContent = "why";
  why.setAttribute("aria-label", `why ${lab.name}`);
  why.addEventListener("click", () => explain(lab));
  row.append(name, value, track, why);
  return row;
}

async function explain(lab) {
  if (!state.sent) return;
  const ticket = newTicket();
  const signal = state.pending.signal;
  setMessage(`Explaining ${lab.name}…`);
  setBusy(document.querySelector(`.why-button[data-label="${CSS.escape(String(lab.id))}"]`));
  // A service just started may still be loading the explaining model: the wait is then said, not silent.
  fetch("health").then((r) => r.json()).then((health) => {
    if (ticket === state.ticket && health.explainer === "loading" && $("message").textContent.startsWith("Explaining")) {
      setMessage(`Explaining ${lab.name}… The explaining model is still loading (the service started moments ago); `
        + "this first answer takes a few seconds more.");
    }
  }).catch(() => {});
  $("why-panel").hidden = true;
  hideHeatmap();
  document.querySelectorAll(".bar-row").forEach((r) => r.classList.toggle("chosen", r.dataset.label === String(lab.id)));
  try {
    const why = await post("explain", inputsForm({ label: String(lab.id) }), signal);
    if (ticket !== state.ticket) return;   // a newer prediction or "why" was asked for since
    renderWhy(why);
    setMessage("");
    $("why-panel").scrollIntoView({ block: "start", behavior: "smooth" });
  } catch (err) {
    if (ticket !== state.ticket || err.name === "AbortError") return;
    $("why-panel").hidden = true;
    setMessage(err.message, true);
  } finally {
    if (ticket === state.ticket) setBusy(null);
  }
}

const HEAD_NAMES = { image: "photo head", text: "caption head", early: "joint head" };

function renderHeads(why) {
  const list = $("why-heads");
  const items = Object.entries(why.label.parts).map(([part, p]) => {
    const li = document.createElement("li");
    li.dataset.part = part;
    const used = part === "image" ? why.inputs.includes("image") : part === "text" ? why.inputs.includes("caption") : true;
    li.textContent = `${HEAD_NAMES[part] || part}: ${used ? percent(p) : "not used (no input)"}`;
    return li;
  });
  const fused = document.createElement("li");
  fused.className = "fused";
  fused.textContent = `combined: ${percent(why.label.probability)} (threshold ${percent(why.label.threshold)}) → `
    + (why.label.predicted ? "predicted" : "not predicted");
  list.replaceChildren(...items, fused);
  $("why-rule").textContent = `How the heads combine: ${why.fusion.rule}.`;
}

function renderWhy(why) {
  $("why-panel").hidden = false;
  $("why-label").textContent = why.label.name;
  renderHeads(why);
  $("why-heat").hidden = !why.heatmap;
  if (why.heatmap) {
    $("heatmap").src = `data:image/png;base64,${why.heatmap.png_base64}`;
    $("heatmap").hidden = !$("show-heatmap").checked;
    // The same heatmap beside the words, over a small copy of the photo: on a phone the photo is far above.
    $("why-photo").src = state.photoUrl;
    $("why-heatmap").src = $("heatmap").src;
    $("why-heatmap").hidden = $("heatmap").hidden;
    const imageHead = why.label.parts.image;
    const strength = imageHead === undefined ? "" : ` The photo head gives this label ${percent(imageHead)}.`;
    const how = why.method === "occlusion"
      ? `Each of 7 × 7 parts of the photo covered in turn: warm parts are those whose covering lowered the `
        + `${why.heatmap.target} most.`
      : `Grad-CAM of the ${why.heatmap.target}: warm areas raised it.`;
    $("heat-target").textContent = `${how} The shading is relative: its strongest spot is always full strength, `
      + `however weak the evidence.${strength}`;
  } else {
    hideHeatmap();
  }
  $("why-words").hidden = !why.words;
  if (why.words) renderWords(why.words, why.method);
}

function renderWords(words, method) {
  const scale = Math.max(1e-6, ...words.items.map((w) => Math.abs(w.score || 0)));
  const caption = state.sent.caption;
  const parts = [];
  let at = 0;
  for (const w of words.items) {
    if (w.start > at) parts.push(document.createTextNode(caption.slice(at, w.start)));
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w.text;
    if (w.score === null) {
      span.classList.add("unread");
      span.title = "past the model's token limit: not read";
    } else {
      const strength = Math.min(1, Math.abs(w.score) / scale);
      const colour = w.score >= 0 ? "220, 50, 32" : "40, 90, 220";
      span.style.backgroundColor = `rgba(${colour}, ${(0.08 + 0.72 * strength).toFixed(3)})`;
      span.dataset.score = w.score.toFixed(4);
      span.title = `${w.score >= 0 ? "+" : ""}${w.score.toFixed(2)} on the ${words.target}`;
    }
    parts.push(span);
    at = w.end;
  }
  if (at < caption.length) parts.push(document.createTextNode(caption.slice(at)));
  $("words").replaceChildren(...parts);
  const read = words.items.filter((w) => w.score !== null).length;
  $("words-target").textContent = (method === "occlusion"
    ? `Each word left out in turn, and how far the ${words.target} fell without it: `
    : `Each word's share of the ${words.target} above an empty caption (integrated gradients): `)
    + "red raised the label, blue lowered it; shading relative to the strongest word."
    + (read < words.items.length
      ? ` The model read ${read} of the caption's ${words.items.length} words: struck-through words were past its `
        + "token limit and not read."
      : "");
}

async function showModel() {
  try {
    const health = await (await fetch("health")).json();
    $("key-row").hidden = !health.key_required;
    $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
    const response = await fetch("info", { headers: keyHeaders() });
    if (!response.ok) return;  // no key yet: the model's name waits for it
    const info = await response.json();
    if (info.limits) state.limits = info.limits;
    // A figure names its basis: the macro F1 beside the mean, and the validation rows both come from.
    const v = info.validation || {};
    let figure = "";
    if (v.mean_f1 != null) {
      const basis = [];
      if (v.macro_f1 != null) basis.push(`macro ${v.macro_f1.toFixed(3)}`);
      if (v.rows) basis.push(`on ${v.rows.toLocaleString("en")} rows`);
      figure = ` · validation mean F1 ${v.mean_f1.toFixed(3)}` + (basis.length ? ` (${basis.join(", ")})` : "");
    }
    $("model-id").textContent = info.model + figure;
  } catch (err) { /* the page works without it */ }
}

function wire() {
  $("photo-input").addEventListener("change", (e) => choosePhoto(e.target.files[0]));
  $("clear-photo").addEventListener("click", () => { clearResults(); clearPhoto(); setMessage(""); });
  $("caption").addEventListener("input", () => {
    countCaption();
    if (state.sent) { clearResults(); setMessage(""); }
  });
  $("label-filter").addEventListener("input", drawBars);
  $("predict-button").addEventListener("click", predict);
  $("caption").addEventListener("keydown", (e) => {
    // Enter predicts; Shift+Enter is a new line (and Enter while an input method composes is its own).
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); predict(); }
  });
  $("api-key").addEventListener("change", (e) => {
    const key = e.target.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    showModel();
  });
  $("show-heatmap").addEventListener("change", (e) => {
    $("heatmap").hidden = !e.target.checked || !$("heatmap").getAttribute("src");
    $("why-heatmap").hidden = $("heatmap").hidden;
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) choosePhoto(e.dataTransfer.files[0]);
  });
  showModel();
}

wire();
