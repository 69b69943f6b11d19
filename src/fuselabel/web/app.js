// The fuselabel page: one photo and/or caption -> every label's bar, and a "why" view for one label.
// Plain DOM code against the service's JSON (POST predict, POST explain, GET info); no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, photoUrl: null, result: null, sent: null };

function setMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "muted";
}

function choosePhoto(file) {
  if (!file) return;
  state.file = file;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  $("photo-frame").hidden = false;
  $("drop-hint").hidden = true;
  $("clear-photo").hidden = false;
  hideHeatmap();
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

async function post(path, form) {
  const response = await fetch(path, { method: "POST", body: form });
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON: reported below */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function predict() {
  const caption = $("caption").value.trim();
  if (!state.file && !caption) {
    setMessage("Choose a photo or type a caption first.", true);
    return;
  }
  state.sent = { file: state.file, caption };
  $("predict-button").disabled = true;
  setMessage("Predicting…");
  try {
    state.result = await post("predict", inputsForm());
    renderResult(state.result);
    setMessage("");
  } catch (err) {
    setMessage(err.message, true);
  } finally {
    $("predict-button").disabled = false;
  }
}

const STATUS_TEXT = { ok: "from the photo and the caption", caption_only: "from the caption only",
                      image_only: "from the photo only" };

function percent(p) { return `${(100 * p).toFixed(1)}%`; }

function renderResult(result) {
  $("result-panel").hidden = false;
  $("why-panel").hidden = true;
  hideHeatmap();
  $("status").textContent = STATUS_TEXT[result.status] || result.status;
  const chips = $("predicted");
  chips.replaceChildren(...result.predicted.map((lab) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = lab.name;
    return chip;
  }));
  const rows = [...result.labels].sort((a, b) => b.probability - a.probability);
  $("bars").replaceChildren(...rows.map(barRow));
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
  fill.style.width = percent(lab.probability);
  const tick = document.createElement("span");
  tick.className = "bar-threshold";
  tick.style.left = percent(lab.threshold);
  track.append(fill, tick);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(lab.probability);
  const why = document.createElement("button");
  why.type = "button";
  why.className = "why-button link";
  why.dataset.label = lab.id;
  why.textContent = "why";
  why.addEventListener("click", () => explain(lab));
  row.append(name, track, value, why);
  return row;
}

async function explain(lab) {
  setMessage(`Explaining ${lab.name}…`);
  document.querySelectorAll(".bar-row").forEach((r) => r.classList.toggle("chosen", r.dataset.label === String(lab.id)));
  try {
    const why = await post("explain", inputsForm({ label: String(lab.id) }));
    renderWhy(why);
    setMessage("");
  } catch (err) {
    setMessage(err.message, true);
  }
}

function renderWhy(why) {
  $("why-panel").hidden = false;
  $("why-label").textContent = why.label.name;
  $("why-summary").textContent = `probability ${percent(why.label.probability)}, threshold `
    + `${percent(why.label.threshold)}: ${why.label.predicted ? "predicted" : "not predicted"}`;
  $("why-heat").hidden = !why.heatmap;
  if (why.heatmap) {
    $("heatmap").src = `data:image/png;base64,${why.heatmap.png_base64}`;
    $("heatmap").hidden = !$("show-heatmap").checked;
    $("heat-target").textContent = `Grad-CAM of the ${why.heatmap.target}: warm areas raised it.`;
  } else {
    hideHeatmap();
  }
  $("why-words").hidden = !why.words;
  if (why.words) renderWords(why.words);
}

function renderWords(words) {
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
      span.title = `${w.score >= 0 ? "+" : ""}${w.score.toFixed(3)} on the ${words.target}`;
    }
    parts.push(span);
    at = w.end;
  }
  if (at < caption.length) parts.push(document.createTextNode(caption.slice(at)));
  $("words").replaceChildren(...parts);
  $("words-target").textContent = `Each word's share of the ${words.target} above an empty caption `
    + "(integrated gradients): red raised the label, blue lowered it.";
}

async function showModel() {
  try {
    const info = await (await fetch("info")).json();
    const f1 = info.validation && info.validation.mean_f1;
    $("model-id").textContent = info.model + (f1 ? ` · validation mean F1 ${f1.toFixed(3)}` : "");
  } catch (err) { /* the page works without it */ }
}

function wire() {
  $("photo-input").addEventListener("change", (e) => choosePhoto(e.target.files[0]));
  $("clear-photo").addEventListener("click", clearPhoto);
  $("predict-button").addEventListener("click", predict);
  $("show-heatmap").addEventListener("change", (e) => {
    $("heatmap").hidden = !e.target.checked || !$("heatmap").getAttribute("src");
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
